"""Pre-registered parallel matrix for sharded full fine-tuning (issue 27): FSDP and ZeRO
points whose per-GPU peaks test the mechanisms of multi_gpu.py (the step on the shard or on
the host, the root unit's gradient, the unsharded unit gradients, MixedPrecision casts,
growth with layer size, quant_storage), with the predictions of the commit that writes them.

    python calibration/design_shard.py > calibration/matrices/multi-shard-h100.json

Each point carries the `vramcalc calibrate multi` command that measures it (calibration/
MULTI_GPU.md: one merged.json + plan.json per point), the plan and parallel settings, and
the prediction: the busiest GPU's peak allocated / reserved / device, required free memory,
busiest phase and peak terms. Points marked `launchable: false` need a DeepSpeed launcher
that `calibrate multi` does not have yet (it launches ddp, fsdp and device-map).
Cards: H100 80GB (nvidia-h100-x2 / x4 / x8); nothing here has been run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.memory.multi_gpu import ParallelPlan, estimate_parallel  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402

FULL = {"method": "full", "optimizer": "adamw_torch", "loop": "plain"}
QLORA = {"method": "qlora", "quant": "nf4", "optimizer": "adamw_torch", "loop": "plain"}
# (id, model, plan, parallel, why)
POINTS: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    ("s01", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 2, "strategy": "fsdp"}, "full bf16 FULL_SHARD: step on the 1/2 shard, root grad"),
    ("s02", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 4, "strategy": "fsdp"}, "same at 4 GPUs: shard terms 1/4, per-unit terms equal"),
    ("s03", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 8, "strategy": "fsdp"}, "same at 8 GPUs"),
    ("s04", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 2, "strategy": "fsdp", "offload": "cpu"},
     "CPUOffload: no optimizer step on the GPU, forward (logits) the busiest phase"),
    ("s05", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048, "weights_dtype": "fp32"},
     {"gpus": 4, "strategy": "fsdp"},
     "fp32 weights, MixedPrecision(bf16): bf16 units gathered, no autocast copies"),
    ("s06", "qwen2.5-14b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 8, "strategy": "fsdp"}, "larger layers than s03: per-unit terms grow"),
    ("s07", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 2, "strategy": "fsdp", "sharding_strategy": "SHARD_GRAD_OP"},
     "params unsharded from forward to backward"),
    ("s08", "llama-2-70b", {**QLORA, "batch_size": 4, "seq_len": 4096},
     {"gpus": 2, "strategy": "fsdp"},
     "issue 27: planned to fit on 2 x A100-80, ran out of memory there"),
    ("s09", "llama-2-70b", {**QLORA, "rank": 8, "lora_dropout": 0.1, "batch_size": 2,
                            "seq_len": 2048, "attn": "flash_attention_2"},
     {"gpus": 2, "strategy": "fsdp"}, "PEFT docs' FSDP-QLoRA point (35.6 GB/GPU published)"),
    ("s10", "mistral-7b", {**QLORA, "batch_size": 8, "seq_len": 2048},
     {"gpus": 2, "strategy": "fsdp"}, "quant_storage bf16 flat parameter, small model"),
    ("s11", "llama-3.1-70b", {**FULL, "batch_size": 1, "seq_len": 512},
     {"gpus": 8, "strategy": "zero3", "offload": "cpu"},
     "issue 27: ZeRO-3 + CPU offload must fit 8 x 80 GB; the step on the host"),
    ("s12", "llama-3.1-8b", {**FULL, "batch_size": 1, "seq_len": 2048},
     {"gpus": 8, "strategy": "zero3"}, "ZeRO-3 step: fp32 grad + foreach sqrt of a sub-group"),
]


def _command(model: str, plan: dict[str, Any], par: dict[str, Any]) -> str:
    flags = [f"-m {model}", f"--gpus {par['gpus']}", f"--strategy {par['strategy']}"]
    if par.get("offload", "none") != "none":
        flags.append(f"--offload {par['offload']}")
    if "sharding_strategy" in par:
        flags.append(f"--sharding-strategy {par['sharding_strategy']}")
    names = {"batch_size": "--batch", "seq_len": "--seq-len", "weights_dtype": "--weights-dtype",
             "lora_dropout": "--lora-dropout"}
    for k, v in plan.items():
        flags.append(f"{names.get(k, '--' + k.replace('_', '-'))} {v}")
    return "vramcalc calibrate multi " + " ".join(flags) + " --steps 3"


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    points = []
    for pid, model, plan, par, why in POINTS:
        tp = TrainPlan(**plan)
        pp = ParallelPlan(**par)
        pe = estimate_parallel(get_spec(model), tp, pp)
        b = pe.busiest
        points.append({
            "id": f"{pid}-{model}", "model": model, "why": why,
            "plan": tp.model_dump(mode="json", exclude_defaults=True),
            "parallel": pp.model_dump(mode="json", exclude_defaults=True),
            "launchable": pp.strategy in ("ddp", "fsdp", "device-map"),
            "command": _command(model, plan, par),
            "prediction": {
                "peak_allocated_bytes": b.peak_allocated_bytes,
                "peak_reserved_bytes": b.peak_reserved_bytes,
                "peak_device_bytes": b.peak_device_bytes,
                "required_device_bytes": b.required_device_bytes,
                "peak_phase": b.peak_phase,
                "phases": b.phases,
                "peak_terms": [t.model_dump(mode="json") for t in pe.peak_terms],
                "host_offload_bytes": pe.host_offload_bytes,
            },
        })
    json.dump({"note": f"pre-registered sharded full fine-tuning matrix (issue 27), predictions "
                       f"of commit {commit}, committed before any run; H100 80GB, "
                       "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                       "NVSHMEM_DISABLE_NVLS=1",
               "points": points}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
