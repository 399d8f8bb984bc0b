"""Accuracy of the estimator on the H200 runs, per regime, fit set and holdout apart.

    python bench/accuracy_h200.py [--points]

Replays calibration/h200/run1-design.jsonl (the design matrix the model was traced and
corrected on: the fit set) and run2-holdout.jsonl (36 points on 6 architectures never used
before, whose predictions were committed before the run: calibration/matrices/
h200-holdout-predictions.json). For the holdout both the pre-registered predictions and
the current estimator are shown; only the first is a holdout result.

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

from vramcalc.estimate import estimate  # noqa: E402

GiB = 2**30


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


def collect(run: str, preregistered: dict[str, dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
    rows = []
    for rec, spec, plan in records(run):
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
            "ckpt": plan.gradient_checkpointing, "attn": plan.attn,
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
    print(f"    {'eager attention':24s} "
          f"{summary([r['alloc'] for r in rows if r['attn'] == 'eager'])}")
    if show_points:
        for r in sorted(rows, key=lambda r: -abs(r["alloc"])):
            dev = "" if r["device"] is None else f" device {r['device']:+6.2f}%"
            print(f"    {r['id']:28s} alloc {r['alloc']:+7.2f}%{dev}")


def main(argv: list[str]) -> None:
    show = "--points" in argv
    pre_path = ROOT / "calibration" / "matrices" / "h200-holdout-predictions.json"
    pre = {p["id"]: p for p in json.loads(pre_path.read_text())["points"]}
    report("design matrix (fit set: traced and corrected on these), current estimator",
           collect("run1-design.jsonl"), show)
    report("holdout, PRE-REGISTERED predictions (committed before run 2)",
           collect("run2-holdout.jsonl", pre), show)
    report("holdout, current estimator (not a holdout any more: seen since)",
           collect("run2-holdout.jsonl"), show)
    pre2_path = ROOT / "calibration" / "matrices" / "h200-holdout2-predictions.json"
    pre2 = {p["id"]: p for p in json.loads(pre2_path.read_text())["points"]}
    rows = [r for r in collect("run4-holdout2.jsonl", pre2) if not r["id"].startswith("snap")]
    report("holdout 2 (run 4, fresh draws over all 22 architectures after the corrections), "
           "PRE-REGISTERED predictions", rows, show)
    rows = [r for r in collect("run4-holdout2.jsonl") if not r["id"].startswith("snap")]
    report("holdout 2, current estimator (seen since)", rows, show)
    pre3_path = ROOT / "calibration" / "matrices" / "h200-holdout3-predictions.json"
    pre3 = {p["id"]: p for p in json.loads(pre3_path.read_text())["points"]}
    report("holdout 3 (run 6, fresh draws over 25 architectures after the run-5 traces), "
           "PRE-REGISTERED predictions", collect("run6-holdout3.jsonl", pre3), show)
    report("holdout 3, current estimator (seen since)", collect("run6-holdout3.jsonl"), show)
    pre4_path = ROOT / "calibration" / "matrices" / "h200-holdout4-predictions.json"
    pre4 = {p["id"]: p for p in json.loads(pre4_path.read_text())["points"]}
    report("holdout 4 (run 9, fresh draws over 29 architectures after effective.py), "
           "PRE-REGISTERED predictions", collect("run9-holdout4.jsonl", pre4), show)
    report("holdout 4, current estimator (seen since)", collect("run9-holdout4.jsonl"), show)
    pre5_path = ROOT / "calibration" / "matrices" / "h200-holdout5-predictions.json"
    pre5 = {p["id"]: p for p in json.loads(pre5_path.read_text())["points"]}
    report("holdout 5 (run 11, fresh draws over 32 architectures after the run-9 fixes), "
           "PRE-REGISTERED predictions", collect("run11-holdout5.jsonl", pre5), show)
    report("holdout 5, current estimator (seen since)", collect("run11-holdout5.jsonl"), show)
    pre6_path = ROOT / "calibration" / "matrices" / "h200-eager-holdout-predictions.json"
    pre6 = {p["id"]: p for p in json.loads(pre6_path.read_text())["points"]}
    report("eager holdout (run 13, fresh eager draws after the run-12 traces), "
           "PRE-REGISTERED predictions", collect("run13-eager-holdout.jsonl", pre6), show)


if __name__ == "__main__":
    main(sys.argv[1:])
