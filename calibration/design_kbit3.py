"""Pre-registered points for issue 29: QLoRA as axolotl and LLaMA-Factory prepare a 4/8-bit
base (planned `--no-kbit-prep --adapter-dtype fp32`: trainers.AXOLOTL_KBIT,
training_config._axolotl_kbit / _llama_factory), at full depth, each beside its
kbit-prepared twin (the default peft recipe: prepare_model_for_kbit_training, fp32 norms,
embeddings and lm_head), same batch and sequence.

    python calibration/design_kbit3.py calibration/matrices/h100-kbit3-predictions.json \
        > calibration/matrices/h100-kbit3.json

The worker prepares each point with that trainer's own calls (`"prep"`: calibrate/run.py
`_axolotl_prepare`, `_llama_factory_prepare`). Both trainers checkpoint reentrant by default
(axolotl 067b021 normalize_config, LLaMA-Factory ff6d4d1 use_reentrant_gc); the estimator
models non-reentrant checkpointing only. So each case has three points:
- `-base`: the kbit-prepared twin (peft recipe, non-reentrant);
- `-axolotl` / `-llamafactory`: the trainer's preparation with `gc_reentrant: false` (their
  configs' `gradient_checkpointing_kwargs: {use_reentrant: false}` / `use_reentrant_gc:
  false`): what the plan models, its effect scored against `-base`;
- `-axolotlre` / `-llamafactoryre`: the trainer's default (reentrant), `base` the
  non-reentrant point: the same plan, so the same prediction; the measured difference is
  what reentrant checkpointing does, which vramcalc does not model (predicted 0).
The int8 case has no reentrant point (8 points in the 300 s of one call).

Budget (run 38, one H100 80 GB): three checkpoints, 15.0 + 13.5 + 5.8 = 34.2 GiB of bf16
weights on disk; every predicted peak allocated under LIMIT_GIB; the matrix driver admits
points while their estimated device bytes (+30 % + 2 GiB) stay under --gpu-budget-gib 76,
at most 3 at once (run 35 measured such points in 19-24 s each).
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.calibrate.run import prep_error  # noqa: E402
from vramcalc.calibrate.store import Prediction  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.trainers import AXOLOTL_KBIT  # noqa: E402

GiB = 2**30
LIMIT_GIB = 24.0  # predicted peak allocated of each point
NAME = "h100-kbit3"
# what every point shares: the Trainer loop both trainers run, checkpointing on (their
# QLoRA examples), nf4 with double quantization (both trainers' default), 2048 tokens
SHARED = {"loop": "trainer", "optimizer": "adamw_torch_fused", "gradient_checkpointing": True,
          "compute_dtype": "bf16", "seq_len": 2048, "double_quant": True}
# (model, plan fields, prep, with a reentrant point): 128k / 32k / 152k vocabularies; qwen2.5's
# q/k/v biases (axolotl leaves them fp32 until bitsandbytes casts them in the first forward)
CASES: list[tuple[str, dict[str, Any], str, bool]] = [
    ("llama-3.1-8b", {"quant": "nf4", "batch_size": 2}, "axolotl", True),
    ("mistral-7b", {"quant": "nf4", "batch_size": 8}, "llama-factory", True),
    ("qwen2.5-3b", {"quant": "int8", "batch_size": 2}, "axolotl", False),
]
TAG = {"axolotl": "axolotl", "llama-factory": "llamafactory"}


def _prediction(pid: str, est: Any) -> dict[str, Any]:
    return {"id": pid, **Prediction.of(est).model_dump(mode="json"),
            "required_device_bytes": est.required_device_bytes,
            "host_bytes": est.host_bytes,
            # the peak allocated of each phase (the forward's: the worker's fwd_peak)
            "phase_peaks": dict(est.phases)}


def points() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    n = 0
    for model, fields, prep, reentrant_point in CASES:
        spec = get_spec(model)
        twin = TrainPlan.model_validate({**SHARED, **fields})
        trainer = TrainPlan.model_validate({**SHARED, **fields, **AXOLOTL_KBIT})
        variants: list[tuple[str, TrainPlan, dict[str, Any], str | None]] = [
            ("base", twin, {}, None),
            (TAG[prep], trainer, {"prep": prep, "gc_reentrant": False}, "base"),
        ]
        if reentrant_point:
            variants.append((TAG[prep] + "re", trainer, {"prep": prep, "gc_reentrant": True},
                             TAG[prep]))
        ids: dict[str, str] = {}
        for tag, plan, extra, base in variants:
            assert prep_error(plan, extra.get("prep", "peft"), extra.get("gc_reentrant")) is None
            est = estimate(spec, plan)
            assert est.peak_allocated_bytes <= LIMIT_GIB * GiB, (model, tag,
                                                                  est.peak_allocated_bytes / GiB)
            pid = f"q{n:03d}-{model}-{tag}"
            n += 1
            ids[tag] = pid
            point: dict[str, Any] = {"id": pid, "spec": model,
                                     "plan": plan.model_dump(mode="json", exclude_defaults=True),
                                     **extra, "steps": 3}
            if base is not None:
                point["base"] = ids[base]
            out.append(point)
            preds.append(_prediction(pid, est))
    return out, preds


def main(argv: list[str]) -> int:
    pts, preds = points()
    note = ("issue 29: QLoRA as axolotl (067b021) and LLaMA-Factory (ff6d4d1) prepare a 4/8-bit "
            "base (kbit_prep false, fp32 adapters; the worker's prep), full depth, 3 "
            "architectures (nf4 and int8), each with its kbit-prepared twin (`base`), and the "
            "trainers' default reentrant checkpointing beside the non-reentrant point "
            f"(unmodelled: the same prediction); predictions in {NAME}-predictions.json, "
            "committed before any run")
    json.dump({"note": note, "points": pts}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            json.dump({"note": f"raw estimator predictions (no correction) of {NAME}.json, "
                       "written by calibration/design_kbit3.py before any run", "points": preds},
                      f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
