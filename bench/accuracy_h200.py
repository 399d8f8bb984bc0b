"""Accuracy of the estimator on the H200 runs, per regime, fit set and holdouts apart.

    python bench/accuracy_h200.py [--points] [--all]

Replays calibration/h200/run1-design.jsonl (the design matrix the model was traced and
corrected on: the fit set) and every holdout in `HOLDOUTS`, whose predictions were
committed before its run (calibration/matrices/h200-*-predictions.json). For each holdout
both the pre-registered predictions and the current estimator are shown; only the first is
a holdout result. `--all` adds every training point of every run (current estimator; seen).

Device: the runs read NVML per process (several points ran side by side), which does not
count bitsandbytes' paged (managed) optimizer memory, so the measured device peak is
compared with the predicted peak device less the predicted resident paged bytes.
Points run under an emulated smaller card (memory_limit_gib) or whose allocator retried
are left out of reserved and device.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from h200_points import ROOT, records  # noqa: E402

from vramcalc.memory.estimate import estimate  # noqa: E402


def regime(spec: Any, plan: Any) -> str:
    method = {"qlora": f"qlora-{plan.quant}", "lora": "lora-16bit", "full": "full"}[plan.method]
    if plan.method == "full":
        method += "-fp32master" if plan.load_dtype == "fp32" else "-bf16"
    if spec.is_moe:
        method += " MoE"
    return method


def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def summary(errors: list[float]) -> str:
    if not errors:
        return "n=0"
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, int(round(0.9 * (len(a) - 1))))]
    med = statistics.median(a)
    return f"n={len(a):3d} median {med:5.2f}%  p90 {p90:5.2f}%  worst {a[-1]:6.2f}%"


def collect(run: str | tuple[str, ...] | None,
            preregistered: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of one run, of several runs of one matrix (a tuple), or of every run (None)."""
    runs: tuple[str | None, ...] = run if isinstance(run, tuple) else (run,)
    rows = []
    for rec, spec, plan in (r for one in runs for r in records(one)):
        m = rec.get("measurement") or {}
        if rec["status"] != "ok" or not m.get("peak_allocated_bytes"):
            continue
        est = estimate(spec, plan)
        pred_alloc = est.peak_allocated_bytes
        if preregistered is not None:
            pre = preregistered[rec["id"]]
            pred_alloc = pre["peak_allocated_bytes"]
            pred_res, pred_dev = pre["peak_reserved_bytes"], pre["peak_device_bytes"]
        else:
            pred_res, pred_dev = est.peak_reserved_bytes, est.peak_device_bytes
        clean = not (m.get("num_alloc_retries") or m.get("memory_limit_bytes"))
        row = {
            "id": rec["id"], "regime": regime(spec, plan),
            "ckpt": plan.gradient_checkpointing, "attn": plan.attn, "loop": plan.loop,
            "full_depth": "@" not in str(rec.get("spec", "")),
            "alloc": pct(pred_alloc, m["peak_allocated_bytes"]),
            "reserved": pct(pred_res, m["peak_reserved_bytes"]) if clean else None,
            "device": None,
        }
        dev = m.get("peak_device_bytes")
        if clean and dev and m.get("nvml_process_source") == "process":
            row["device"] = pct(pred_dev - est.paged_bytes, dev)
        rows.append(row)
    return rows


def report(title: str, rows: list[dict[str, Any]], show_points: bool) -> None:
    print(f"\n== {title}")
    for key in ("alloc", "reserved", "device"):
        print(f"  peak {key:9s} {summary([r[key] for r in rows if r[key] is not None])}")
    print("  peak allocated by regime:")
    for reg in sorted({r["regime"] for r in rows}):
        sub = [r for r in rows if r["regime"] == reg]
        print(f"    {reg:24s} {summary([r['alloc'] for r in sub])}")
    for label, pick in (("checkpointing on", True), ("checkpointing off", False)):
        print(f"    {label:24s} {summary([r['alloc'] for r in rows if r['ckpt'] is pick])}")
    for label, full in (("full depth", True), ("depth cut", False)):
        print(f"    {label:24s} {summary([r['alloc'] for r in rows if r['full_depth'] is full])}")
    print(f"    {'eager attention':24s} "
          f"{summary([r['alloc'] for r in rows if r['attn'] == 'eager'])}")
    loops = sorted({r["loop"] for r in rows})
    if len(loops) > 1:
        print("  by loop (peak allocated; peak device):")
        for loop in loops:
            sub = [r for r in rows if r["loop"] == loop]
            print(f"    {loop:24s} {summary([r['alloc'] for r in sub])}")
            print(f"    {'':24s} {summary([r['device'] for r in sub if r['device'] is not None])}")
    if show_points:
        for r in sorted(rows, key=lambda r: -abs(r["alloc"])):
            dev = "" if r["device"] is None else f" device {r['device']:+6.2f}%"
            print(f"    {r['id']:28s} alloc {r['alloc']:+7.2f}%{dev}")


# (run, its pre-registered predictions, title): each holdout is reported with the
# predictions committed before it ran, then (but for the last) with the current estimator.
HOLDOUTS = [
    ("run2-holdout.jsonl", "h200-holdout-predictions.json",
     "holdout (run 2, 6 architectures never used before)"),
    ("run4-holdout2.jsonl", "h200-holdout2-predictions.json",
     "holdout 2 (run 4, fresh draws over all 22 architectures after the corrections)"),
    ("run6-holdout3.jsonl", "h200-holdout3-predictions.json",
     "holdout 3 (run 6, fresh draws over 25 architectures after the run-5 traces)"),
    ("run9-holdout4.jsonl", "h200-holdout4-predictions.json",
     "holdout 4 (run 9, fresh draws over 29 architectures after effective.py)"),
    ("run11-holdout5.jsonl", "h200-holdout5-predictions.json",
     "holdout 5 (run 11, fresh draws over 32 architectures after the run-9 fixes)"),
    ("run13-eager-holdout.jsonl", "h200-eager-holdout-predictions.json",
     "eager holdout (run 13, fresh eager draws after the run-12 traces)"),
    ("run15-holdout6.jsonl", "h200-holdout6-predictions.json",
     "holdout 6 (run 15, fresh draws over 36 architectures after the allocator replay)"),
    ("run16-holdout7.jsonl", "h200-holdout7-predictions.json",
     "holdout 7 (run 16, fresh draws over 36 architectures after the post-run-15 changes)"),
    ("run17-holdout8.jsonl", "h200-holdout8-predictions.json",
     "holdout 8 (run 17, 10 small points, half eager, after the post-run-16 changes)"),
    ("run19-holdout9.jsonl", "h200-holdout9-predictions.json",
     "holdout 9 (run 19, one draw per architecture over 40, 4 never measured, after the "
     "load programs and the run-17/18 traces)"),
    ("run20-holdout10.jsonl", "h200-holdout10-predictions.json",
     "holdout 10 (run 20, a replication of holdout 9 with another seed, estimator unchanged)"),
    ("run21-holdout11.jsonl", "h200-holdout11-predictions.json",
     "holdout 11 (run 21, 20 points, after the post-run-20 review fixes)"),
    ("run22-holdout12.jsonl", "h200-holdout12-predictions.json",
     "holdout 12 (run 22, 48 points, after the int8 outlier fraction and the held graph)"),
    ("run24-holdout13.jsonl", "h200-holdout13-predictions.json",
     "holdout 13 (run 24, 52 points, after the step program became the peak where it "
     "covers the plan)"),
    ("run26-holdout14.jsonl", "h200-holdout14-predictions.json",
     "holdout 14 (run 26, 30 points, after the reserved peak took in loading and preparing)"),
    (("run27-holdout15.jsonl", "run28-holdout15.jsonl"), "h200-holdout15-predictions.json",
     "holdout 15 (runs 27 + 28 on an H100, 36 points, issue 27: the tutorial loop three ways, "
     "Trainer draws)"),
    (("run29-holdout16.jsonl", "run29b-holdout16.jsonl"), "h200-holdout16-predictions.json",
     "holdout 16 (run 29 on an H100, 26 points, after the run-28 gemma-2 traces; the points "
     "that could not start for a full disk ran in the same session's second call)"),
]


def _no_snaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r["id"].startswith("snap")]


def main(argv: list[str]) -> None:
    """Every holdout with its pre-registered predictions, then the current estimator."""
    show = "--points" in argv
    report("design matrix (fit set: traced and corrected on these), current estimator",
           collect("run1-design.jsonl"), show)
    for run, predictions, title in HOLDOUTS:
        path = ROOT / "calibration" / "matrices" / predictions
        pre = {p["id"]: p for p in json.loads(path.read_text())["points"]}
        report(f"{title}, PRE-REGISTERED predictions", _no_snaps(collect(run, pre)), show)
        report(f"{title}, current estimator (seen since)", _no_snaps(collect(run)), show)
    if "--all" in argv:
        report("every H200 training point of every run, current estimator (seen)",
               collect(None), show)


if __name__ == "__main__":
    main(sys.argv[1:])
