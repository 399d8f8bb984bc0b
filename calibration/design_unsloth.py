"""Pre-registered points for issue 29: Unsloth itself (FastLanguageModel, its kernels, its
offloading gradient checkpointing, its 4-bit load), measured against `vramcalc plan
--trainer unsloth`, never measured with Unsloth so far.

    python calibration/design_unsloth.py calibration/matrices/h100-unsloth-predictions.json \
        > calibration/matrices/h100-unsloth.json

Each point's plan is the one `python -m vramcalc plan --model M --trainer unsloth --batch B
--json` prints (read from that command, so the preset, its loss kernel and every default
are the CLI's), its prediction the estimator's for that plan (checked equal to the CLI's
peak). The worker prepares each point with Unsloth's own calls (`"prep": "unsloth"`,
calibrate/unsloth_prep.py: FastLanguageModel.from_pretrained load_in_4bit, get_peft_model
r 16 / alpha 16 / dropout 0 / the seven projections / use_gradient_checkpointing
"unsloth") and steps under transformers' Trainer, with the preset's max_seq_length 2048.

Five full-depth points, four architectures Unsloth 2026.10.9 loads with its own model
code (models/loader.py: llama, qwen2, gemma2, mistral), vocabularies 32k-256k: llama-3.2-1b
at batch 4 and 8, qwen2.5-1.5b b4, gemma-2-2b b2, mistral-7b b4. Weights cache (bf16):
2.5 + 3.1 + 5.2 + 14.5 GB = 23.6 GiB. Every predicted peak allocated under LIMIT_GIB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = __file__.rsplit("/calibration/", 1)[0]
sys.path.insert(0, ROOT + "/src")

from vramcalc.calibrate.run import prep_error  # noqa: E402
from vramcalc.calibrate.store import Prediction  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402

GiB = 2**30
LIMIT_GIB = 16.0
NAME = "h100-unsloth"
CASES: list[tuple[str, int]] = [("llama-3.2-1b", 4), ("llama-3.2-1b", 8), ("qwen2.5-1.5b", 4),
                                 ("gemma-2-2b", 2), ("mistral-7b", 4)]


def cli_plan(model: str, batch: int) -> dict[str, Any]:
    """`vramcalc plan --model MODEL --trainer unsloth --batch BATCH --json`, parsed."""
    out = subprocess.run(
        [sys.executable, "-m", "vramcalc", "plan", "--model", model, "--trainer", "unsloth",
         "--batch", str(batch), "--json"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": ROOT + "/src"})
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def points() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    for n, (model, batch) in enumerate(CASES):
        cli = cli_plan(model, batch)
        plan = TrainPlan.model_validate(cli["plan"])
        assert prep_error(plan, "unsloth", None) is None, (model, prep_error(plan, "unsloth", None))
        est = estimate(get_spec(model), plan)
        assert est.peak_allocated_bytes == cli["peak_allocated_bytes"], model
        assert est.peak_allocated_bytes <= LIMIT_GIB * GiB, (model, est.peak_allocated_bytes / GiB)
        pid = f"u{n:03d}-{model}-b{batch}"
        out.append({"id": pid, "spec": model,
                    "plan": plan.model_dump(mode="json", exclude_defaults=True),
                    "prep": "unsloth", "steps": 3})
        preds.append({"id": pid, **Prediction.of(est).model_dump(mode="json"),
                      "required_device_bytes": est.required_device_bytes,
                      "host_bytes": est.host_bytes,
                      "phase_peaks": dict(est.phases),
                      "command": f"vramcalc plan --model {model} --trainer unsloth "
                                 f"--batch {batch}"})
    return out, preds


def main(argv: list[str]) -> int:
    pts, preds = points()
    note = ("issue 29: Unsloth itself (FastLanguageModel.from_pretrained load_in_4bit, "
            "get_peft_model with use_gradient_checkpointing='unsloth', its kernels and "
            "fused loss; the worker's prep 'unsloth'), full depth, 4 architectures, against "
            "`vramcalc plan --trainer unsloth`; predictions in "
            f"{NAME}-predictions.json, committed before any run")
    json.dump({"note": note, "points": pts}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            json.dump({"note": f"raw estimator predictions (no correction) of {NAME}.json, "
                       "written by calibration/design_unsloth.py before any run",
                       "points": preds}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
