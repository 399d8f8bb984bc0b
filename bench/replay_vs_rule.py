"""Peak reserved / device on the pre-registered allocator-replay holdouts (runs 15-16):
the predictions committed before each run against what the linear slack rule
(`allocator.allocator_slack`, `estimate(..., replay=False)`) gives on the
same points, dense and MoE apart (MoE keeps the rule).

    python bench/replay_vs_rule.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from h200_points import ROOT, records  # noqa: E402

from vramcalc.memory.estimate import estimate  # noqa: E402

SETS = [("run15-holdout6.jsonl", "h200-holdout6-predictions.json"),
        ("run16-holdout7.jsonl", "h200-holdout7-predictions.json")]


def summary(errors: list[float]) -> str:
    e = sorted(errors)
    return (f"median {statistics.median(e):5.2f} %  p90 {e[int(0.9 * (len(e) - 1))]:5.2f} %"
            f"  worst {e[-1]:5.2f} %")


def main() -> None:
    rows: list[tuple[str, bool, float, float]] = []
    for run, predictions in SETS:
        pre = {p["id"]: p for p in json.loads(
            (ROOT / "calibration" / "matrices" / predictions).read_text())["points"]}
        for rec, spec, plan in records(run):
            m = rec.get("measurement") or {}
            dev = m.get("peak_device_bytes")
            if (rec["status"] != "ok" or m.get("num_alloc_retries") or not dev
                    or m.get("nvml_process_source") != "process"):
                continue
            p = pre[rec["id"]]
            rule = estimate(spec, plan, replay=False)
            rows.append((run, spec.is_moe,
                         100 * abs(p["peak_device_bytes"] - p["paged_bytes"] - dev) / dev,
                         100 * abs(rule.peak_device_bytes - rule.paged_bytes - dev) / dev))
    for label, pick in (("all", lambda r: True), ("dense", lambda r: not r[1]),
                        ("MoE (rule in both)", lambda r: r[1])):
        sub = [r for r in rows if pick(r)]
        print(f"{label:20s} n={len(sub):3d}  peak device, replay (pre-registered): "
              f"{summary([r[2] for r in sub])}")
        print(f"{'':20s}        peak device, linear rule:               "
              f"{summary([r[3] for r in sub])}")


if __name__ == "__main__":
    main()
