"""`python -m vramcalc.calibrate.worker JOB`: measure one training point in this process.

JOB is a JSON object or the path of a file holding one: {"spec": ModelSpec fields, "plan":
TrainPlan fields, "weights_dir", "steps", "device", "snapshot", "trace_file", "trust_remote_code",
"prep", "gc_reentrant"} (prep: how the model is prepared, calibrate/run.py TRAINER_PREPS).
Run once per point by the matrix driver, so every peak starts from a clean process.
Prints one JSON object on the last line of stdout.

Imports on this path before torch: vramcalc.models.spec and vramcalc.plans (pydantic,
pyyaml). `expandable_segments` is put into PYTORCH_CUDA_ALLOC_CONF here too, before torch
is imported, in case the caller did not.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan


def read_job(arg: str) -> dict[str, Any]:
    text = arg if arg.lstrip().startswith("{") else Path(arg).read_text(encoding="utf-8")
    job = json.loads(text)
    if not isinstance(job, dict):
        raise ValueError("a job is a JSON object")
    return job


def main(argv: list[str]) -> int:
    job = read_job(argv[0])
    spec = ModelSpec.model_validate(job["spec"])
    plan = TrainPlan.model_validate(job["plan"])
    if plan.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from vramcalc.calibrate.run import measure_point

    result = measure_point(
        spec,
        plan,
        job.get("weights_dir"),
        steps=job.get("steps", 3),
        device=job.get("device", "cuda"),
        trust_remote_code=bool(job.get("trust_remote_code", False)),
        snapshot=bool(job.get("snapshot", False)),
        memory_limit_gib=job.get("memory_limit_gib"),
        trace_file=job.get("trace_file"),
        prep=str(job.get("prep", "peft")),
        gc_reentrant=job.get("gc_reentrant"),
    )
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
