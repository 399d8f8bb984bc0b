"""Measured points: the raw JSON lines a GPU campaign writes, read back as typed points.

A raw line is what `vramcalc.calibrate.run.measure_point` returned, plus the model name
and the plan. Peaks are derived here from the phase readings, so that lines recorded
before a field existed read the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vramcalc.plans import TrainPlan


class MeasuredPoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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


# Why a raw line was skipped, in the order `SkipLog.summary` lists them.
NOT_UTF8 = "not UTF-8 text"
TRUNCATED = "truncated JSON"
NOT_JSON = "not JSON"
NOT_OBJECT = "not a JSON object"
MISSING = "no model or plan"
BAD_NUMBER = "NaN, infinite, negative or non-numeric peak"
BAD_RECORD = "invalid fields"
UNREADABLE_FILE = "unreadable file"
ERROR_RECORD = "a recorded measurement error"  # a run that failed: data, not damage
SHOWN_LINES = 3  # line numbers named per reason


class SkipLog:
    """The lines and files `load_raw_points` / the calibrate commands left out, by reason."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}
        self.read = 0  # units (lines, run files) that gave points

    def add(self, reason: str, where: str) -> None:
        self.by_reason.setdefault(reason, []).append(where)

    def unreadable(self) -> int:
        """Skipped units that are damaged (recorded measurement errors are not)."""
        return sum(len(v) for k, v in self.by_reason.items() if k != ERROR_RECORD)

    def summary(self) -> str | None:
        """'skipped 3 of 10 ... : 2 not JSON (a.jsonl:4, a.jsonl:9), ...', or None."""
        if not self.by_reason:
            return None
        total = sum(len(v) for v in self.by_reason.values())
        parts = []
        for reason, where in self.by_reason.items():
            shown = ", ".join(where[:SHOWN_LINES]) + (", ..." if len(where) > SHOWN_LINES else "")
            parts.append(f"{len(where)} {reason} ({shown})")
        return (f"skipped {total} of {total + self.read} measurement lines/files: "
                + "; ".join(parts))


def _number_ok(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _peak_values(rec: dict[str, Any]) -> list[Any]:
    """Every reading `peaks_from_record` takes a peak of (TypeError on a wrong shape)."""
    marks = rec.get("marks", {})
    steps = rec.get("steps", [])
    if not isinstance(marks, dict) or not isinstance(steps, list):
        raise TypeError("marks / steps of the wrong type")
    values: list[Any] = []
    for m in marks.values():
        values += [m["max_allocated"], m["reserved"], m["max_reserved"]]
    for step in steps:
        values += [v for k, v in step.items() if k.endswith(("_peak", "_peak_reserved"))]
    for key in ("nvml_peak_used_minus_baseline", "context_bytes"):
        if rec.get(key) is not None:
            values.append(rec[key])
    return values


def bad_peaks(rec: dict[str, Any]) -> str | None:
    """Why the readings of a measurement record cannot be used (BAD_NUMBER, BAD_RECORD),
    or None when they can. An out-of-memory record's readings are not used."""
    if rec.get("oom"):
        return None
    try:
        return None if all(_number_ok(v) for v in _peak_values(rec)) else BAD_NUMBER
    except (TypeError, KeyError, AttributeError):
        return BAD_RECORD


def _why_skipped(raw: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(reason, None) for a line that gives no point, else (None, record)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8, None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        # a line cut short: an object that opens and then ends mid-value or mid-string
        ran_out = line.lstrip().startswith("{") and (
            err.pos >= len(line.rstrip()) - 1 or err.msg.startswith("Unterminated string"))
        return (TRUNCATED if ran_out else NOT_JSON), None
    if not isinstance(rec, dict):
        return NOT_OBJECT, None
    if "error" in rec:
        return ERROR_RECORD, None
    if "model" not in rec or "plan" not in rec:
        return MISSING, None
    bad = bad_peaks(rec)
    return (bad, None) if bad is not None else (None, rec)


def load_raw_points(root: Path, skipped: SkipLog | None = None) -> Iterator[MeasuredPoint]:
    """Every point of every `*.jsonl` under `root`. A line that gives no point (not UTF-8,
    not JSON, truncated, NaN / negative peaks, missing fields, a recorded error) is left
    out and, with `skipped`, logged there with its reason and `file:line`."""
    log = skipped if skipped is not None else SkipLog()
    for path in sorted(root.glob("*.jsonl")):
        try:
            data = path.read_bytes()
        except OSError as err:
            log.add(UNREADABLE_FILE, f"{root.name}/{path.name}: {err.strerror or err}")
            continue
        for n, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            where = f"{path.name}:{n}"
            reason, rec = _why_skipped(raw)
            if rec is None:
                log.add(reason or BAD_RECORD, f"{root.name}/{where}")
                continue
            try:
                point = point_from_record(rec, where)
            except (KeyError, TypeError, ValueError, ValidationError):
                log.add(BAD_RECORD, f"{root.name}/{where}")
                continue
            log.read += 1
            yield point


def fit_calls(root: Path, free_bytes: int) -> list[tuple[str, str, bool]]:
    """For every measured record under `root`, out-of-memory ones included:
    (source, certainty with no margin: fits / tight / does_not_fit, actually ran)."""
    from vramcalc.memory.estimate import estimate
    from vramcalc.models.spec import get_spec
    from vramcalc.sizing.verdict import certainty

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
