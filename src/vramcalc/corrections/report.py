"""Measured points replayed against the estimator: the raw estimate, the estimate corrected
with factors fitted without the point's model (leave-one-architecture-out), and the
measured peaks, for every point under a calibration folder (raw/*.jsonl, runs/*.json).
`vramcalc.api.calibration_report` and `fit_corrections` are its front door; the
`calibrate report` and `calibrate fit` commands render them. No GPU, no torch.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from vramcalc.errors import CalibrationError, UnknownModelError


def listable(folder: Path) -> bool:
    """Whether `folder` is there to read; CalibrationError when it cannot be listed (a
    locked folder would otherwise read as an empty one)."""
    import os
    import stat

    from vramcalc.user_files import probe

    found = probe(folder, str(folder), CalibrationError)
    if found is None:
        return False
    if not stat.S_ISDIR(found.st_mode):
        raise CalibrationError(f"{folder}: not a folder; the calibration folder holds "
                               "raw/*.jsonl and runs/*.json")
    try:
        os.listdir(folder)
    except OSError as err:
        raise CalibrationError(f"{folder}: cannot read the folder: "
                               f"{err.strerror or err}") from None
    return True


def measured_points(data: Path, skipped: Any = None) -> list[Any]:
    """Every measured point under DATA (raw/*.jsonl, runs/*.json); what is left out is
    logged in `skipped` (a corrections.points.SkipLog)."""
    from vramcalc.calibrate import store
    from vramcalc.corrections.points import SkipLog, load_raw_points

    log = skipped if skipped is not None else SkipLog()
    points = list(load_raw_points(data / "raw", log)) if listable(data / "raw") else []
    runs_dir = data / store.RUNS_DIR
    if listable(runs_dir):
        runs = store.load_runs(runs_dir)
        for path in sorted(set(runs_dir.glob("*.json")) - {p for p, _ in runs}):
            log.add("unusable run file (above)", f"{runs_dir.name}/{path.name}")
        for path, run_doc in runs:
            points += store.measured_points(path, run_doc, log)
    return points


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def replay_points(data: Path, skipped: Any = None,
                  warnings: list[str] | None = None) -> dict[str, Any]:
    """Every committed point: raw estimate, corrected estimate (factors fitted without
    the point's model: leave-one-architecture-out) and measured peaks. No GPU, no torch.
    Lines and files left out are logged in `skipped` (a corrections.points.SkipLog); points
    whose model cannot be resolved are left out with a line in `warnings`."""
    warnings = warnings if warnings is not None else []
    from vramcalc.corrections.factors import (
        PEAKS,
        corrected,
        fit,
        match,
        observation,
        stack_key,
        validation_of,
    )
    from vramcalc.memory.estimate import estimate
    from vramcalc.models.resolve import resolve_model

    rows: list[dict[str, Any]] = []
    usable: list[tuple[Any, Any, Any]] = []  # (point, estimate, observation)
    for point in measured_points(data, skipped):
        try:
            spec = resolve_model(point.model)
        except (UnknownModelError, CalibrationError) as err:
            warnings.append(f"warning: skipping {point.source}: {err}")
            continue
        est = estimate(spec, point.plan)
        stack = stack_key(point.versions.get("torch"), point.versions.get("transformers"))
        obs = None
        if not point.oom and point.peak_allocated_bytes:
            obs = observation(
                est, model=point.model, gpu=point.gpu, stack=stack,
                meas_alloc=point.peak_allocated_bytes,
                # a peak capped by the card (allocator retries) says nothing of the slack
                meas_reserved=None if point.memory_capped else point.peak_reserved_bytes,
                meas_device=None if point.memory_capped else point.peak_device_bytes,
            )
        usable.append((point, est, obs))

    all_obs = [o for _, _, o in usable if o is not None]
    entries = fit(all_obs)
    held_out: dict[str, Any] = {}
    for model in sorted({o.model for o in all_obs}):
        held_out[model] = fit([o for o in all_obs if o.model != model])

    errs: dict[str, dict[str, list[float]]] = {
        k: {p: [] for p in PEAKS} for k in ("raw", "corrected")
    }
    # per entry key: (raw, held-out corrected) errors on the points that had a correction
    by_key: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]] = {}
    for point, est, obs in usable:
        c = match(held_out.get(point.model, entries), point.gpu, obs.stack if obs else None)
        cor = corrected(est, c) if c is not None else est
        row: dict[str, Any] = {
            "source": point.source,
            "gpu": point.gpu,
            "model": point.model,
            **point.plan.model_dump(mode="json"),
            "oom": point.oom,
            "memory_capped": point.memory_capped,
            "corrections_from": list(c.models) if c else [],
        }
        for kind, attr in (("allocated", "peak_allocated_bytes"),
                           ("reserved", "peak_reserved_bytes"), ("device", "peak_device_bytes")):
            meas = getattr(point, attr)
            raw, fixed = getattr(est, attr), getattr(cor, attr)
            row[f"measured_{attr}"] = meas
            row[f"estimated_{attr}"] = {"raw": raw, "corrected": fixed}
            capped = point.memory_capped and kind != "allocated"
            if meas and not point.oom and not capped:
                e_raw, e_cor = raw / meas - 1, fixed / meas - 1
                row[f"error_{kind}"] = {"raw": round(e_raw, 6), "corrected": round(e_cor, 6)}
                errs["raw"][kind].append(abs(e_raw))
                if c is not None:
                    errs["corrected"][kind].append(abs(e_cor))
                    raw_k, cor_k = by_key.setdefault(
                        c.key, ({p: [] for p in PEAKS}, {p: [] for p in PEAKS}))
                    raw_k[kind].append(abs(e_raw))
                    cor_k[kind].append(abs(e_cor))
        rows.append(row)

    def stats(kind: str) -> dict[str, Any]:
        return {
            k: {"n": len(v), "median_abs_error": _median(v),
                "worst_abs_error": max(v, default=None)}
            for k, v in errs[kind].items()
        }

    corrected_stats = stats("corrected")
    judged = []
    for e in entries:
        helps, validation = validation_of(*by_key.get(e.key, ({}, {})))
        judged.append(e.model_copy(update={"helps": helps, "validation": validation}))
    return {
        "points": rows,
        "summary": {
            "n_points": len(rows),
            "n_measured": len(all_obs),
            "models": sorted({o.model for o in all_obs}),
            "median_abs_error": corrected_stats["allocated"]["median_abs_error"],
            "validation": "leave-one-architecture-out",
            "corrected": corrected_stats,
            "raw": stats("raw"),
        },
        "corrections": [e.model_dump(mode="json") for e in judged],
    }
