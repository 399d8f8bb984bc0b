"""Pre-registered points for issue 29: TRL >= 1.15 SFTTrainer's fused LM head
(`--loss-kernel trl-fused`, `--trainer trl`'s loss), at full depth, on five architectures
(vocabulary 32k to 256k), QLoRA nf4 (TRL's common use) and 16-bit LoRA.

    python calibration/design_trl.py calibration/matrices/h100-trl2-predictions.json \
        > calibration/matrices/h100-trl2.json

Each trl-fused point has its torch-loss twin (`base`: the same plan, the model's own
lm_head + ForCausalLMLoss): the measured difference is the head's. The plans are TRL's
defaults where they fit (--trainer trl: adamw_torch_fused, gradient checkpointing, bf16,
max_length 1024, batch 8; trl 1.16.0 sft_config.py / TrainingArguments), with smaller
batches where the twin's full logits would pass the budget. Every predicted peak allocated
stays under LIMIT_GIB so that four points run side by side on an 80 GB H100. The
predictions (the raw estimate at the commit that writes this file) are committed before
any run. The worker applies trl's own add_fused_lm_head and SFTTrainer.compute_loss
(calibrate/run.py apply_loss_kernel, _sft_loss_trainer): the device needs trl 1.16.0 and
what it imports (`.whl/trl`).

    python calibration/design_trl.py --trl3 calibration/matrices/h100-trl3-predictions.json \
        > calibration/matrices/h100-trl3.json

`--trl3`: the same five CASES with TRL 1.4-1.14's chunked_nll (`--loss-kernel
trl-chunked`, ids t3NN-<model>-chunked), each naming as `base` its torch twin of
h100-trl2 (t000, t002, ..., t008, measured in run 35: calibration/h100/run35-trl2.jsonl,
run35b-trl2.jsonl), plus EXTRA points without a twin: 16-bit LoRA at batch 1, where the
head's chunk is the predicted peak and trl 1.14's `(h @ w.to(h.dtype).t()).float()`
differs most from 1.4-1.12's `h.float() @ w.float().t()` (no fp32 copy of the weight
per chunk). The worker applies trl's own `_patch_chunked_ce_lm_head` (calibrate/run.py
apply_loss_kernel): the device needs trl 1.14.0 in place of 1.16.0 (`.whl/trl14`,
calibration/DEVICE.md).
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.calibrate.store import Prediction  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402

GiB = 2**30
LIMIT_GIB = 30.0  # predicted peak allocated of each point
NAME = "h100-trl2"
NAME3 = "h100-trl3"
# TRL's defaults (vramcalc/trainers.py _TRL) the points share
TRL = {"optimizer": "adamw_torch_fused", "gradient_checkpointing": True,
       "compute_dtype": "bf16", "loop": "trainer", "seq_len": 1024}
# Mostly the layers' recomputed backward is the fused point's predicted peak: the point
# tests that the fused head adds nothing above it (its twin's peak is the full logits').
# For llama-3.1-8b at batch 1 the fused head's backward (QLoRA: the fp32 head's
# 32768-column casts, two alive at a time, mm_buf, grad_hidden) and forward are the
# predicted peaks: it tests the head's requests. (gemma-2-2b at batch 1 x 1024 would too,
# but its predicted load peak is above the step's.)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("mistral-7b", {"method": "qlora", "batch_size": 8}),  # 32k, TRL's batch
    ("llama-3.1-8b", {"method": "qlora", "batch_size": 1}),  # 128k, the head's peak
    ("qwen2.5-3b", {"method": "lora", "weights_dtype": "bf16", "batch_size": 4}),  # 152k
    ("llama-3.2-3b", {"method": "lora", "weights_dtype": "bf16", "batch_size": 8}),  # 128k
    ("gemma-2-2b", {"method": "qlora", "batch_size": 1, "seq_len": 2048, "attn": "eager"}),  # 256k
]

# trl3's extra points (no measured twin): 16-bit LoRA at batch 1, the chunk's requests the
# predicted peak (gemma-2's 256k vocabulary with its capping; llama-3.2's 128k)
EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("gemma-2-2b", {"method": "lora", "weights_dtype": "bf16", "batch_size": 1,
                    "seq_len": 2048, "attn": "eager"}),
    ("llama-3.2-3b", {"method": "lora", "weights_dtype": "bf16", "batch_size": 1}),
]


def _prediction(pid: str, est: Any) -> dict[str, Any]:
    return {"id": pid, **Prediction.of(est).model_dump(mode="json"),
            "required_device_bytes": est.required_device_bytes,
            "host_bytes": est.host_bytes,
            # the peak allocated of each phase (the forward's: what the worker's forward
            # hook reads as fwd_peak)
            "phase_peaks": dict(est.phases)}


def points_trl3() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """trl-chunked on CASES (base: the trl2 torch twin, t{2i:03d}) and EXTRA."""
    out: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    for i, (model, base) in enumerate([*CASES, *EXTRA]):
        spec = get_spec(model)
        plan = TrainPlan.model_validate({**TRL, **base, "loss_kernel": "trl-chunked"})
        est = estimate(spec, plan)
        assert est.peak_allocated_bytes <= LIMIT_GIB * GiB, (model, est.peak_allocated_bytes)
        tag = "-lora-b1" if i >= len(CASES) else ""
        pid = f"t{300 + 2 * i:03d}-{model}{tag}-chunked"
        point: dict[str, Any] = {"id": pid, "spec": model,
                                 "plan": plan.model_dump(mode="json", exclude_defaults=True),
                                 "steps": 3}
        if i < len(CASES):
            point["base"] = f"t{2 * i:03d}-{model}-torch"
        out.append(point)
        preds.append(_prediction(pid, est))
    return out, preds


def points() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    for i, (model, base) in enumerate(CASES):
        spec = get_spec(model)
        twin_id = ""
        for kernel in ("torch", "trl-fused"):
            plan = TrainPlan.model_validate({**TRL, **base, "loss_kernel": kernel})
            est = estimate(spec, plan)
            assert est.peak_allocated_bytes <= LIMIT_GIB * GiB, (
                model, kernel, est.peak_allocated_bytes / GiB)
            suffix = "torch" if kernel == "torch" else "fused"
            pid = f"t{2 * i + (kernel != 'torch'):03d}-{model}-{suffix}"
            point: dict[str, Any] = {"id": pid, "spec": model,
                                     "plan": plan.model_dump(mode="json", exclude_defaults=True),
                                     "steps": 3}
            if kernel == "torch":
                twin_id = pid
            else:
                point["base"] = twin_id
            out.append(point)
            preds.append(_prediction(pid, est))
    return out, preds


def main(argv: list[str]) -> int:
    name = NAME
    if argv[:1] == ["--trl3"]:
        argv = argv[1:]
        name = NAME3
        pts, preds = points_trl3()
        note = ("issue 29: TRL 1.4-1.14 SFTTrainer's chunked_nll (trl-chunked, trl 1.14.0 "
                "on the device), full depth, the five h100-trl2 cases (vocab 32k-256k, QLoRA "
                "nf4 and 16-bit LoRA; `base`: their torch twins measured in run 35) and two "
                "16-bit LoRA points at batch 1 where the chunk is the predicted peak; "
                f"predictions in {name}-predictions.json, committed before any run")
    else:
        pts, preds = points()
        note = ("issue 29: TRL >= 1.15 SFTTrainer's fused LM head (trl-fused) against the "
                "torch loss, full depth, 5 architectures (vocab 32k-256k), QLoRA nf4 and "
                f"16-bit LoRA, each with its twin; predictions in {name}-predictions.json, "
                "committed before any run")
    json.dump({"note": note, "points": pts}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            json.dump({"note": f"raw estimator predictions (no correction) of {name}.json, "
                       "written by calibration/design_trl.py before any run", "points": preds},
                      f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
