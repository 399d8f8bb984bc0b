"""Peak allocated two ways on every H200 training point: the phase formula (the quick
estimate, `estimate(..., replay=False)`, the searches' first guess), and the replayed step
program (load_requests + three steps of step_requests, what `estimate` reports where
`estimate.step_program_covers` the plan, since ad8e7e7).

    python bench/program_vs_formula.py [--points]

Prints both errors per regime and per model family (several minutes: one replay per
point). Written after run 23 to decide whether the program should give the peak (see
docs/memory-model.md, "The step program as the peak").
"""

from __future__ import annotations

import collections
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from h200_points import records  # noqa: E402

from vramcalc.memory.effective import effective_train_plan  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.memory.program.step import program_peaks  # noqa: E402


def program_peak(spec: Any, plan: Any) -> int:
    eff, _, _ = effective_train_plan(spec, plan)
    return program_peaks(spec, eff).peak_allocated


def summary(errors: list[float]) -> str:
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, int(round(0.9 * (len(a) - 1))))]
    return (f"n={len(a):3d} median {statistics.median(a):5.2f}%  p90 {p90:5.2f}%  "
            f"worst {a[-1]:6.2f}%")


def main(argv: list[str]) -> None:
    rows = []
    for rec, spec, plan in records():
        m = rec.get("measurement") or {}
        if (rec["status"] != "ok" or not m.get("peak_allocated_bytes")
                or rec["id"].startswith("snap")):
            continue
        meas = m["peak_allocated_bytes"]
        formula = estimate(spec, plan, replay=False).peak_allocated_bytes
        rows.append({"id": rec["id"], "family": spec.model_type,
                     "regime": f"{plan.method}-{plan.quant}{' MoE' if spec.is_moe else ''}",
                     "formula": 100 * (formula / meas - 1),
                     "program": 100 * (program_peak(spec, plan) / meas - 1)})
    for title, key in (("all", None), ("by regime", "regime"), ("by family", "family")):
        groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for r in rows:
            groups[r[key] if key else "all"].append(r)
        print(f"== {title}")
        for name, sub in sorted(groups.items()):
            print(f"  {name:18s} formula {summary([r['formula'] for r in sub])} | "
                  f"program {summary([r['program'] for r in sub])}")
    if "--points" in argv:
        for r in sorted(rows, key=lambda r: -abs(r["program"]))[:40]:
            print(f"  {r['id']:28s} formula {r['formula']:+7.2f}%  program {r['program']:+7.2f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
