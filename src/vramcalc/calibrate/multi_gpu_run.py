"""Measure one multi-GPU training point: `accelerate launch --num_processes N`, every rank's
peaks in one JSON (calibration/MULTI_GPU.md has the commands and the matrix).

The driver (`run_point`) writes an accelerate config (DDP, or FSDP FULL_SHARD with PEFT's
FSDP-QLoRA settings, optionally CPU offload), launches this module once per GPU with
`--rank-main`, and merges the per-rank files. device-map runs in one process without
accelerate launch. Each rank records torch's max_memory_allocated / max_memory_reserved
and NVML's used memory of its own device (polled) after a few steps of random tokens.

The pure pieces (config, command, environment, merge) import nothing heavy and are tested
on CPU; torch, transformers, bitsandbytes, peft and accelerate load inside `rank_main`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vramcalc.multi_gpu import ParallelPlan
from vramcalc.plan_settings import TrainPlan

# Every process this driver starts: no NVLink SHARP / multicast (the lent machines forbid it).
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(SAFE_ENV)
    return env


def accelerate_config(parallel: ParallelPlan, mixed_precision: str = "bf16") -> dict[str, Any]:
    """The accelerate config file for `parallel` (keys as `accelerate config` writes them).

    FSDP follows PEFT's FSDP-QLoRA example (docs/source/accelerate/fsdp.md):
    TRANSFORMER_BASED_WRAP, BACKWARD_PRE, cpu_ram_efficient_loading, sync_module_states,
    use_orig_params false, SHARDED_STATE_DICT."""
    if parallel.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"multi_gpu_run launches ddp and fsdp, not {parallel.strategy}")
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "MULTI_GPU" if parallel.strategy == "ddp" else "FSDP",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed_precision,
        "num_machines": parallel.nodes,
        "num_processes": parallel.gpus,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if parallel.strategy == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": parallel.cpu_ram_efficient_loading,
            "fsdp_forward_prefetch": False,
            "fsdp_offload_params": parallel.offload == "cpu",
            "fsdp_sharding_strategy": parallel.sharding_strategy,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": parallel.use_orig_params,
            "fsdp_version": 1,
        }
    return cfg


def write_config(parallel: ParallelPlan, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(accelerate_config(parallel), sort_keys=True))
    return path


def launch_command(config: Path, parallel: ParallelPlan, point: Path, out_dir: Path,
                   python: str = sys.executable) -> list[str]:
    """`accelerate launch` one process per GPU running `rank_main` (device-map: plain python)."""
    tail = ["-m", "vramcalc.calibrate.multi_gpu_run", "--rank-main", str(point), str(out_dir)]
    if parallel.strategy == "device-map":
        return [python, *tail]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(parallel.gpus), *tail]


def merge_ranks(out_dir: Path) -> dict[str, Any]:
    """One record from every rank's file: per-rank peaks and the busiest rank."""
    ranks = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")),
                   key=lambda r: r["rank"])
    if not ranks:
        raise FileNotFoundError(f"no rank*.json in {out_dir}")
    busiest = max(ranks, key=lambda r: r.get("nvml_peak_used", 0) or r["max_reserved"])
    return {
        "point": ranks[0]["point"],
        "versions": ranks[0].get("versions", {}),
        "ranks": ranks,
        "busiest_rank": busiest["rank"],
        "max_allocated": max(r["max_allocated"] for r in ranks),
        "max_reserved": max(r["max_reserved"] for r in ranks),
        "nvml_peak_used": max(r.get("nvml_peak_used", 0) for r in ranks),
    }


def run_point(model_id: str, plan: TrainPlan, parallel: ParallelPlan, out_dir: Path,
              steps: int = 3, timeout_s: int = 1800) -> dict[str, Any]:
    """Write the config and point, launch, merge (raises CalledProcessError on failure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    point = out_dir / "point.json"
    point.write_text(json.dumps({"model_id": model_id, "plan": plan.model_dump(mode="json"),
                                 "parallel": parallel.model_dump(mode="json"), "steps": steps}))
    config = write_config(parallel, out_dir / "accelerate.yaml")
    cmd = launch_command(config, parallel, point, out_dir)
    subprocess.run(cmd, env=child_env(), check=True, timeout=timeout_s)
    merged = merge_ranks(out_dir)
    (out_dir / "merged.json").write_text(json.dumps(merged, indent=2))
    return merged


# ---- inside each launched process (heavy imports) ----------------------------------------


def rank_main(point_path: Path, out_dir: Path) -> None:  # pragma: no cover - needs GPUs
    import torch
    import transformers
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vramcalc.calibrate.run import NvmlPoller

    point = json.loads(point_path.read_text())
    plan = TrainPlan(**point["plan"])
    parallel = ParallelPlan(**point["parallel"])
    device_map = parallel.strategy == "device-map"
    accelerator = None if device_map else Accelerator()
    rank = 0 if accelerator is None else accelerator.process_index
    local = 0 if accelerator is None else accelerator.local_process_index
    if not device_map:
        torch.cuda.set_device(local)
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
        plan.load_dtype])
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": plan.attn}
    sharded = parallel.strategy == "fsdp" and plan.method == "qlora"
    if plan.method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=plan.quant,
            bnb_4bit_use_double_quant=plan.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
    if device_map:
        kwargs["device_map"] = "auto" if parallel.device_map_balance == "balanced" else "sequential"
    elif not sharded:
        kwargs["device_map"] = {"": local}
    poller = NvmlPoller(index=local)
    poller.start()
    model = transformers.AutoModelForCausalLM.from_pretrained(point["model_id"], **kwargs)
    if plan.method == "qlora" and not sharded:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing)
    elif plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if plan.is_lora:
        model = get_peft_model(model, LoraConfig(
            r=plan.rank, lora_alpha=plan.alpha, lora_dropout=plan.lora_dropout,
            target_modules=plan.targets if plan.targets == "all-linear" else plan.target_list(),
            task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if accelerator is not None:
        if parallel.strategy == "fsdp" and plan.is_lora:
            from peft.utils.other import fsdp_auto_wrap_policy

            accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        model, optimizer = accelerator.prepare(model, optimizer)
    first = next(model.parameters()).device if device_map else torch.device("cuda", local)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(point["steps"]):
        ids = torch.randint(0, model.config.vocab_size if hasattr(model, "config") else 1000,
                            (plan.batch_size, plan.seq_len), device=first)
        loss = model(input_ids=ids, labels=ids).loss
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    poller.stop()
    devices = range(torch.cuda.device_count()) if device_map else [local]
    record = {
        "rank": rank, "point": point,
        "max_allocated": max(torch.cuda.max_memory_allocated(d) for d in devices),
        "max_reserved": max(torch.cuda.max_memory_reserved(d) for d in devices),
        "per_device": {str(d): {"max_allocated": torch.cuda.max_memory_allocated(d),
                                "max_reserved": torch.cuda.max_memory_reserved(d)}
                       for d in devices},
        "nvml_peak_used": poller.peak_used,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python -m vramcalc.calibrate.multi_gpu_run --rank-main POINT OUT_DIR")
