"""The calibration run file: one JSON document per `vramcalc calibrate run`.

Schema (version 1)::

    {"schema_version": 1, "kind": "vramcalc-calibration-run", "created": "...Z",
     "environment": {"gpu_name", "gpu_memory_bytes", "driver_version", "cuda_version",
                     "torch", "transformers", "peft", "bitsandbytes", "vramcalc"},
     "points": [{"model", "plan": {TrainPlan}, "steps",
                 "prediction": {"components": {...}, "peak_allocated_bytes", ...},
                 "measurement": {what run.measure_point returned, or {"error": ...}}}]}

The file is rewritten after every point, atomically (temporary file in the same folder,
then `os.replace`), so an interrupted run keeps every point measured so far. Reading never
fails: a corrupt or foreign file is reported on stderr and skipped.

No torch here: `environment` is filled by the command from NVML and package metadata.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vramcalc.corrections.factors import write_json_atomic
from vramcalc.corrections.points import (
    ERROR_RECORD,
    MeasuredPoint,
    SkipLog,
    bad_peaks,
    peaks_from_record,
)
from vramcalc.memory.estimate import Estimate
from vramcalc.plans import TrainPlan

SCHEMA_VERSION = 1
RUN_KIND = "vramcalc-calibration-run"
RUNS_DIR = "runs"  # under the calibration folder


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    torch: str | None = None
    transformers: str | None = None
    peft: str | None = None
    bitsandbytes: str | None = None
    vramcalc: str | None = None


class Prediction(BaseModel):
    """The raw estimate of the point when it was measured (before corrections)."""

    model_config = ConfigDict(extra="forbid")

    components: dict[str, int]
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_device_bytes: int
    paged_bytes: int

    @classmethod
    def of(cls, est: Estimate) -> Prediction:
        return cls(
            components=dict(est.components.items()),
            peak_phase=est.peak_phase,
            peak_allocated_bytes=est.peak_allocated_bytes,
            peak_reserved_bytes=est.peak_reserved_bytes,
            peak_device_bytes=est.peak_device_bytes,
            paged_bytes=est.paged_bytes,
        )


class RunPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    plan: TrainPlan
    steps: int
    prediction: Prediction | None = None
    measurement: dict[str, Any]  # run.measure_point's readings (oom: true is a result)

    @property
    def oom(self) -> bool:
        return bool(self.measurement.get("oom"))

    @property
    def error(self) -> str | None:
        return self.measurement.get("error")


class RunFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: str = RUN_KIND
    created: str
    environment: Environment
    points: list[RunPoint] = []


def new_run(environment: Environment) -> RunFile:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return RunFile(created=stamp, environment=environment)


def run_file_name(run: RunFile) -> str:
    from vramcalc.corrections.factors import gpu_family

    fam = gpu_family(run.environment.gpu_name or "gpu").lower().replace(" ", "")
    stamp = run.created.replace(":", "").replace("-", "")
    return f"{fam}-{stamp}.json"


def write_run(path: Path, run: RunFile) -> None:
    """Atomic: the old file stays whole if anything fails before the rename."""
    write_json_atomic(path, run.model_dump(mode="json"), "calibration run file")


def read_run(path: Path) -> RunFile | None:
    """The run in `path`, or None after one line on stderr saying why it was skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        print(f"warning: skipping {path}: not readable JSON ({err})", file=sys.stderr)
        return None
    return run_from_text(text, path)


def run_from_text(text: str, path: Path) -> RunFile | None:
    """The run file `path` holds as `text`, or None after one line on stderr saying why it
    was skipped (not JSON, not a calibration run, another schema version, a bad field)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        print(f"warning: skipping {path}: not readable JSON ({err})", file=sys.stderr)
        return None
    if not isinstance(data, dict) or data.get("kind") != RUN_KIND:
        print(f"warning: skipping {path}: not a vramcalc calibration run", file=sys.stderr)
        return None
    if data.get("schema_version") != SCHEMA_VERSION:
        print(
            f"warning: skipping {path}: schema_version {data.get('schema_version')!r} "
            f"(this vramcalc reads {SCHEMA_VERSION})",
            file=sys.stderr,
        )
        return None
    try:
        return RunFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        print(f"warning: skipping {path}: {loc}: {first['msg']}", file=sys.stderr)
        return None


def load_runs(folder: Path) -> list[tuple[Path, RunFile]]:
    """Every readable run file in `folder` (sorted by name); others reported and skipped."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        run = read_run(path)
        if run is not None:
            out.append((path, run))
    return out


def measured_points(path: Path, run: RunFile,
                    skipped: SkipLog | None = None) -> list[MeasuredPoint]:
    """The run's points as calibration_data.MeasuredPoint (OOMs kept); points that recorded
    an error or whose readings are NaN / negative are left out and logged in `skipped`."""
    log = skipped if skipped is not None else SkipLog()
    out = []
    for n, p in enumerate(run.points, start=1):
        where = f"{path.parent.name}/{path.name}:point {n}"
        if p.error:
            log.add(ERROR_RECORD, where)
            continue
        bad = bad_peaks(p.measurement)
        if bad is not None:
            log.add(bad, where)
            continue
        alloc, reserved, device = peaks_from_record(p.measurement)
        log.read += 1
        out.append(
            MeasuredPoint(
                source=f"{path.name}:{n}",
                model=p.model,
                plan=p.plan,
                oom=p.oom,
                gpu=run.environment.gpu_name or "unknown",
                peak_allocated_bytes=alloc,
                peak_reserved_bytes=reserved,
                peak_device_bytes=device,
                context_bytes=p.measurement.get("context_bytes"),
                wall_s=p.measurement.get("process_wall_s"),
                versions={"torch": run.environment.torch,
                          "transformers": run.environment.transformers},
            )
        )
    return out
