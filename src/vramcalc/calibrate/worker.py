"""`python -m vramcalc.calibrate.worker JOB`: measure one training point in this process.

JOB is a JSON object or the path of a file holding one: {"spec": ModelSpec fields, "plan":
TrainPlan fields, "weights_dir", "steps", "device", "snapshot", "trace_file", "trust_remote_code",
"prep", "gc_reentrant"} (prep: how the model is prepared, calibrate/run.py TRAINER_PREPS;
"unsloth" imports unsloth first, calibrate/unsloth_prep.py).
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
    if job.get("prep") == "unsloth":
        # before transformers / peft / trl, for its patches (calibrate/unsloth_prep.py); a
        # failed import is the point's result, one line
        failed = import_unsloth_first()
        if failed is not None:
            sys.stdout.write("\n" + json.dumps(failed) + "\n")
            return 0
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


def import_unsloth_first() -> dict[str, Any] | None:
    """`import unsloth` offline, its compile cache in a folder of this worker; None when it
    imports, else the point's result: cannot_start and the error in one line."""
    import atexit
    import shutil
    import tempfile

    from vramcalc.calibrate.unsloth_prep import import_unsloth

    compile_dir = tempfile.mkdtemp(prefix="vramcalc-unsloth-compile-")
    atexit.register(shutil.rmtree, compile_dir, True)  # removed when the worker exits
    try:
        import_unsloth(compile_dir)
    except Exception as err:  # ImportError, or unsloth's own NotImplementedError / RuntimeError
        line = " ".join(f"{type(err).__name__}: {err}".split())[:800]
        return {"error": f"import unsloth failed: {line}", "cannot_start": True,
                "error_phase": "import", "prep": "unsloth", "oom": False}
    return None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
