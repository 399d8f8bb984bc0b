"""Measured points: the raw JSON lines a GPU campaign writes, read back as typed points.

A raw line is what `vramcalc.calibrate.run.measure_point` returned, plus the model name
and the plan. Peaks are derived here from the phase readings, so that lines recorded
before a field existed read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vramcalc.plan_settings import TrainPlan


class MeasuredPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    model: str
    plan: TrainPlan
    oom: bool
    gpu: str = "NVIDIA H100 80GB HBM3"
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_device_bytes: int | None = None
    context_bytes: int | None = None
    wall_s: float | None = None
    versions: dict[str, str | None] = {}  # torch, transformers, ... of the measuring run
    # > 0: the allocator hit the card's memory and freed its cache to retry, so reserved
    # and device peaks were capped by the card, not by the plan.
    alloc_retries: int = 0

    @property
    def memory_capped(self) -> bool:
        return self.alloc_retries > 0


def peaks_from_record(rec: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(allocated, reserved, device) peaks of one raw record; None where not measured."""
    if rec.get("oom") or rec.get("error"):
        return None, None, None
    marks = rec.get("marks", {})
    steps = rec.get("steps", [])
    alloc = [m["max_allocated"] for m in marks.values()]
    alloc += [v for s in steps for k, v in s.items() if k.endswith("_peak")]
    reserved = [m["reserved"] for m in marks.values()] + [m["max_reserved"] for m in marks.values()]
    reserved += [v for s in steps for k, v in s.items() if k.endswith("_peak_reserved")]
    device = rec.get("nvml_peak_used_minus_baseline")
    return (max(alloc) if alloc else None, max(reserved) if reserved else None, device)


def point_from_record(rec: dict[str, Any], source: str) -> MeasuredPoint:
    alloc, reserved, device = peaks_from_record(rec)
    return MeasuredPoint(
        source=source,
        model=rec["model"],
        plan=TrainPlan.model_validate(rec["plan"]),
        oom=bool(rec.get("oom")),
        gpu=rec.get("gpu", "NVIDIA H100 80GB HBM3"),
        peak_allocated_bytes=alloc,
        peak_reserved_bytes=reserved,
        peak_device_bytes=device,
        context_bytes=rec.get("context_bytes"),
        wall_s=rec.get("process_wall_s"),
        versions=rec.get("versions") or {},
        alloc_retries=int(rec.get("num_alloc_retries") or 0),
    )


def load_raw_points(root: Path) -> Iterator[MeasuredPoint]:
    """Every point of every `*.jsonl` under `root`; unreadable lines are skipped."""
    for path in sorted(root.glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "error" in rec:
                    continue
                yield point_from_record(rec, f"{path.name}:{n}")
            except (json.JSONDecodeError, KeyError, ValidationError):
                continue


def fit_calls(root: Path, free_bytes: int) -> list[tuple[str, str, bool]]:
    """For every measured record under `root`, out-of-memory ones included:
    (source, certainty with no margin: fits / tight / does_not_fit, actually ran)."""
    from vramcalc.estimate import estimate
    from vramcalc.specs import get_spec
    from vramcalc.verdict import certainty

    calls: list[tuple[str, str, bool]] = []
    for path in sorted(root.glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            rec = json.loads(line)
            if "error" in rec:
                continue
            est = estimate(get_spec(rec["model"]), TrainPlan.model_validate(rec["plan"]))
            calls.append((f"{path.name}:{n}", certainty(free_bytes, est.required_device_bytes, 0,
                                                         est.required_low), not rec["oom"]))
    return calls
