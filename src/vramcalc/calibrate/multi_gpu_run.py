"""Measure one multi-GPU training point: `accelerate launch --num_processes N`, every rank's
peaks in one JSON (calibration/MULTI_GPU.md has the commands and the matrix).

The driver (`run_point`) writes an accelerate config (DDP, or FSDP FULL_SHARD with PEFT's
FSDP-QLoRA settings, optionally CPU offload), launches this module once per GPU with
`--rank-main`, and merges the per-rank files into OUT/merged.json. device-map runs in one
process without accelerate launch. Each rank records torch's max_memory_allocated /
max_memory_reserved and NVML's used memory of its own device (polled) after a few steps of
random tokens, and its own peak resident host memory (getrusage), which is what CPU
offload moves to the host.

`device="cpu"` is a smoke test of everything but the GPU readings (config, launch, one
process per rank, gloo process group, DDP wrapping, per-rank files, merge): the launcher
is the same (torch elastic through `accelerate launch`), each rank builds
`Accelerator(cpu=True)`, so accelerate picks MULTI_CPU and gloo (accelerate/state.py
PartialState._prepare_backend). FSDP cannot run that way: accelerate turns
ACCELERATE_USE_FSDP into an FSDP state only for GPU-like process groups (state.py,
AcceleratorState.__init__), so `fsdp` on cpu is refused instead of silently running DDP.

The pure pieces (config, command, environment, merge) import nothing heavy and are tested
on CPU; torch, transformers, bitsandbytes, peft and accelerate load inside `rank_main`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from vramcalc.memory.multi_gpu import ParallelPlan
from vramcalc.plans import TrainPlan
from vramcalc.user_files import check_writable, write_text

Device = Literal["cuda", "cpu"]
LAUNCHED_STRATEGIES = ("ddp", "fsdp", "device-map")
# Every process this driver starts: no NVLink SHARP / multicast (the lent machines forbid it).
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# What every rank file holds (merge_ranks checks it; tests assert it).
RANK_FIELDS = ("rank", "local_rank", "world_size", "device", "distributed_type", "backend",
               "wrapper", "steps", "losses", "step_seconds", "max_allocated", "max_reserved",
               "per_device", "nvml_peak_used", "nvml_process_peak_used", "host_peak_rss",
               "wall_s", "env", "versions", "point")


class LaunchError(RuntimeError):
    """`accelerate launch` failed or a rank wrote no file; the message names the log."""


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(SAFE_ENV)
    return env


def check_launchable(parallel: ParallelPlan, device: Device) -> None:
    """ValueError (one line) for what the driver cannot launch."""
    if parallel.strategy not in LAUNCHED_STRATEGIES:
        raise ValueError(f"calibrate multi launches {', '.join(LAUNCHED_STRATEGIES)}, not "
                         f"{parallel.strategy} (DeepSpeed ZeRO is estimated, not measured yet)")
    if parallel.nodes > 1:
        raise ValueError("calibrate multi measures one machine; drop --gpus-per-node")
    if device == "cpu" and parallel.strategy != "ddp":
        raise ValueError(f"--device cpu runs ddp only: accelerate enables {parallel.strategy} "
                         "for GPU process groups only")


def free_port() -> int:
    """A free TCP port for the rendezvous (so two launches never share 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_config(parallel: ParallelPlan, mixed_precision: str = "bf16",
                      port: int | None = None) -> dict[str, Any]:
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
    if port is not None:
        cfg["main_process_port"] = port
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


def write_config(parallel: ParallelPlan, path: Path, port: int | None = None) -> Path:
    import yaml

    write_text(path, yaml.safe_dump(accelerate_config(parallel, port=port), sort_keys=True),
               "accelerate config")
    return path


def launch_command(config: Path, parallel: ParallelPlan, point: Path, out_dir: Path,
                   python: str = sys.executable) -> list[str]:
    """`accelerate launch` one process per GPU running `rank_main` (device-map: plain python).

    The launch stays `MULTI_GPU` / `FSDP` on cpu as well: that is the launcher that starts
    N processes (torch elastic); the ranks then choose the device (`point.json`)."""
    tail = ["-m", "vramcalc.calibrate.multi_gpu_run", "--rank-main", str(point), str(out_dir)]
    if parallel.strategy == "device-map":
        return [python, *tail]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(parallel.gpus), *tail]


def _busiest_key(r: dict[str, Any]) -> int:
    return int(r.get("nvml_peak_used") or r.get("max_reserved") or r.get("host_peak_rss") or 0)


def _max_of(ranks: list[dict[str, Any]], key: str) -> int | None:
    values = [r[key] for r in ranks if r.get(key) is not None]
    return max(values) if values else None


def merge_ranks(out_dir: Path, expected: int | None = None) -> dict[str, Any]:
    """One record from every rank's file: per-rank peaks and the busiest rank.

    GPU readings are None on cpu (never 0 for unknown); `expected` ranks must all be there."""
    ranks = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")),
                   key=lambda r: r["rank"])
    if not ranks:
        raise FileNotFoundError(f"no rank*.json in {out_dir}")
    if expected is not None and [r["rank"] for r in ranks] != list(range(expected)):
        got = ", ".join(str(r["rank"]) for r in ranks)
        raise FileNotFoundError(f"{out_dir}: rank files of ranks {got}, expected 0..{expected - 1}")
    busiest = max(ranks, key=_busiest_key)
    return {
        "point": ranks[0]["point"],
        "versions": ranks[0].get("versions", {}),
        "device": ranks[0].get("device", "cuda"),
        "world_size": len(ranks),
        "ranks": ranks,
        "busiest_rank": busiest["rank"],
        "max_allocated": _max_of(ranks, "max_allocated"),
        "max_reserved": _max_of(ranks, "max_reserved"),
        "nvml_peak_used": _max_of(ranks, "nvml_peak_used"),
        "host_peak_rss": _max_of(ranks, "host_peak_rss"),
        # each step as long as its slowest rank's (the collectives make them wait for it)
        "step_seconds": [max(t) for t in zip(*(r["step_seconds"] for r in ranks), strict=True)]
        if all(r.get("step_seconds") for r in ranks) else None,
    }


def run_point(model_id: str, plan: TrainPlan, parallel: ParallelPlan, out_dir: Path,
              steps: int = 3, timeout_s: int = 1800, device: Device = "cuda",
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the config and point, launch, merge. `model_id`: a checkpoint folder or hub id.

    The launch's output goes to OUT/launch.log; LaunchError (naming it) when the launch
    fails, times out or a rank wrote nothing."""
    check_launchable(parallel, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    point = out_dir / "point.json"
    write_text(point, json.dumps({"model_id": model_id, "plan": plan.model_dump(mode="json"),
                                  "parallel": parallel.model_dump(mode="json"),
                                  "steps": steps, "device": device}), "point file")
    config = write_config(parallel, out_dir / "accelerate.yaml", port=free_port())
    cmd = launch_command(config, parallel, point, out_dir)
    log = check_writable(out_dir / "launch.log", "launch log")
    penv = child_env(env)
    if plan.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in penv:
        penv["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # as worker.py does
    # torch elastic (torch/distributed/elastic/multiprocessing/api.py) makes a
    # torchelastic_* folder in the temp folder per launch and leaves it: the launch gets a
    # temp folder of its own, removed after it.
    scratch = tempfile.mkdtemp(prefix="vramcalc-launch-")
    penv["TMPDIR"] = scratch
    try:
        with log.open("w") as fh:
            proc = subprocess.run(cmd, env=penv, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"launch timed out after {timeout_s} s; see {log}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        raise LaunchError(f"launch exited {proc.returncode}: {_last_error(log)}; see {log}")
    try:
        merged = merge_ranks(out_dir, expected=1 if parallel.strategy == "device-map"
                             else parallel.gpus)
    except FileNotFoundError as err:
        raise LaunchError(f"{err}; see {log}") from None
    write_text(out_dir / "merged.json", json.dumps(merged, indent=2), "merged file")
    return merged


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["no output"])[-1][:200]


# ---- inside each launched process (heavy imports) ----------------------------------------


def _optimizer(params: list[Any], name: str) -> Any:
    """The optimizer HF Trainer builds for `name` (transformers Trainer.get_optimizer_cls_and_
    kwargs: adamw_torch[_fused] -> torch AdamW, *adamw_8bit / paged_adamw_32bit ->
    bitsandbytes AdamW with optim_bits and is_paged), with Trainer's default betas / eps.
    Built here, not through TrainingArguments: that resets accelerate's shared state."""
    import torch

    lr = 1e-5
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=lr, fused=name == "adamw_torch_fused" or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, lr=lr, optim_bits=32 if name == "paged_adamw_32bit" else 8,
                           is_paged=name.startswith("paged"))


def _host_peak_rss() -> int:
    import resource

    # Linux reports ru_maxrss in KiB (getrusage(2)); macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def rank_main(point_path: Path, out_dir: Path) -> None:
    """One rank: load, wrap (LoRA / k-bit prep as the single-GPU recipe), prepare with
    accelerate, take `steps` steps on random tokens, write OUT/rank<R>.json."""
    t0 = time.perf_counter()
    point = json.loads(point_path.read_text())
    plan = TrainPlan(**point["plan"])
    parallel = ParallelPlan(**point["parallel"])
    on_gpu = point.get("device", "cuda") == "cuda"

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vramcalc.calibrate.run import NvmlPoller, quant_config, torch_dtype

    device_map = parallel.strategy == "device-map"
    accelerator = None
    if not device_map:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not on_gpu)
    rank = 0 if accelerator is None else accelerator.process_index
    local = 0 if accelerator is None else accelerator.local_process_index
    if on_gpu and not device_map:
        torch.cuda.set_device(local)
    dtype = torch_dtype(plan.load_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": plan.attn}
    sharded = parallel.strategy == "fsdp"
    if plan.method == "qlora":
        kwargs["quantization_config"] = qc = quant_config(
            plan.quant, plan.compute_dtype, plan.double_quant)
        if sharded and plan.quant in ("nf4", "fp4"):  # FSDP-QLoRA: bf16 storage (PEFT docs)
            qc.bnb_4bit_quant_storage = dtype
    if device_map:
        kwargs["device_map"] = "auto" if parallel.device_map_balance == "balanced" else "sequential"
    elif on_gpu and not sharded:
        kwargs["device_map"] = {"": local}
    poller = NvmlPoller(index=local) if on_gpu else None
    if poller is not None:
        poller.start()
    model = transformers.AutoModelForCausalLM.from_pretrained(point["model_id"], **kwargs)
    vocab = int(model.config.vocab_size)
    if plan.kbit_upcast and not sharded:
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
        from vramcalc.calibrate.run import cast_adapters

        cast_adapters(model, plan.adapter_dtype)  # TrainPlan.adapter_dtype (TRL: bf16)
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], plan.optimizer)
    if accelerator is not None:
        if sharded and plan.is_lora:
            from peft.utils.other import fsdp_auto_wrap_policy

            accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        model, optimizer = accelerator.prepare(model, optimizer)
    if device_map:
        first = next(model.parameters()).device
    else:
        first = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    # each step's wall time, synchronized on both ends: what timing/parallel_time.py
    # predicts for the step of several GPUs (the first step's includes warm-up)
    step_seconds = []
    for _ in range(point["steps"]):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        ids = torch.randint(0, vocab, (plan.batch_size, plan.seq_len), device=first)
        loss = model(input_ids=ids, labels=ids).loss
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_gpu:
            torch.cuda.synchronize()
        step_seconds.append(round(time.perf_counter() - started, 6))
    record: dict[str, Any] = {
        "rank": rank, "local_rank": local,
        "world_size": 1 if accelerator is None else accelerator.num_processes,
        "device": "cuda" if on_gpu else "cpu",
        "distributed_type": "device_map" if accelerator is None
        else str(accelerator.distributed_type).split(".")[-1],
        "backend": None if accelerator is None else accelerator.state.backend,
        "wrapper": type(model).__name__, "steps": point["steps"], "losses": losses,
        "step_seconds": step_seconds,
        "max_allocated": None, "max_reserved": None, "per_device": {},
        "nvml_peak_used": None, "nvml_process_peak_used": None,
    }
    if on_gpu:
        torch.cuda.synchronize()
        assert poller is not None
        poller.stop()
        devices = range(torch.cuda.device_count()) if device_map else [local]
        record.update(
            max_allocated=max(torch.cuda.max_memory_allocated(d) for d in devices),
            max_reserved=max(torch.cuda.max_memory_reserved(d) for d in devices),
            per_device={str(d): {"max_allocated": torch.cuda.max_memory_allocated(d),
                                 "max_reserved": torch.cuda.max_memory_reserved(d)}
                        for d in devices},
            nvml_peak_used=poller.peak_used or None,
            nvml_process_peak_used=poller.peak_process_used or None,
        )
    record.update(
        host_peak_rss=_host_peak_rss(),
        wall_s=round(time.perf_counter() - t0, 2),
        env={k: os.environ.get(k) for k in SAFE_ENV},
        versions={d: _version(d) for d in ("torch", "transformers", "accelerate", "peft",
                                           "bitsandbytes")},
        point=point,
    )
    write_text(out_dir / f"rank{rank}.json", json.dumps(record, indent=2), "rank file")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python -m vramcalc.calibrate.multi_gpu_run --rank-main POINT OUT_DIR")
