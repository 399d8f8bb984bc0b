"""Verdicts at the edge: emulated-card boundary runs (issue 11) against the fit rule.

    python bench/boundary.py calibration/h200/run7-boundary-sweep.jsonl [--margin GIB]

An emulated card of limit L (torch.cuda.set_per_process_memory_fraction) offers
L + the CUDA context + paged state to the rule (calibration/design_boundary.py). Each run's
verdict (plan/check's certainty, same margin) is set against what happened; wrong: "fits"
that ran out of memory, "does not fit" that ran. "tight" is counted with its outcomes.
Prints one line per case x loop x allocator and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.calibrate.matrix import emulated_card_bytes  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan, current_loop_names  # noqa: E402
from vramcalc.sizing.verdict import certainty  # noqa: E402
from vramcalc.units import GiB  # noqa: E402


def verdict_of(rec: dict[str, Any], margin: int) -> tuple[str, float, float]:
    """(certainty, required low - offered, required - offered) in GiB for one run."""
    est = estimate(get_spec(rec["spec"]), TrainPlan.model_validate(
        current_loop_names(rec["plan"], rec.get("loop_names", 1))))
    offered = emulated_card_bytes(est, rec["measurement"]["memory_limit_bytes"])
    c = certainty(offered, est.required_device_bytes, margin, est.required_low)
    return c, (est.required_low - offered) / GiB, (est.required_device_bytes - offered) / GiB


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run .jsonl files")
    parser.add_argument("--margin", type=float, default=0.0, help="check's margin, GiB")
    args = parser.parse_args(argv)
    margin = args.margin
    rows: list[tuple[str, str, bool]] = []
    by_case: dict[str, list[str]] = defaultdict(list)
    for path in args.runs:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            m = rec.get("measurement") or {}
            if m.get("memory_limit_bytes") is None or rec.get("status") not in ("ok", "oom"):
                continue
            if m.get("error") or m.get("cannot_start"):
                continue
            ran = not m.get("oom")
            c, lo, hi = verdict_of(rec, int(margin * GiB))
            rows.append((rec["id"], c, ran))
            case = rec["id"].rsplit("-o", 1)[0].rsplit("-r", 1)[0]
            by_case[case].append(f"{'ran' if ran else 'OOM'}:{c}({lo:+.2f}/{hi:+.2f})")
    for case, outs in by_case.items():
        print(case, " ".join(outs))
    sug = [(i, ran) for i, _, ran in rows if i.startswith("bs-")]
    if sug:  # suggestion runs (calibration/design_boundary.py holdout): must all run
        print(f"\nsuggestions run: {len(sug)}, out of memory: {[i for i, r in sug if not r]}")
    rows = [r for r in rows if not r[0].startswith("bs-")]
    wrong = [i for i, c, ran in rows if (c == "fits" and not ran) or (c == "does_not_fit" and ran)]
    tight = [ran for _, c, ran in rows if c == "tight"]
    print(f"\n{len(rows)} runs (margin {margin} GiB): wrong {len(wrong)} "
          f"(fits but out of memory: {sum(c == 'fits' and not r for _, c, r in rows)}, "
          f"does not fit but ran: {sum(c == 'does_not_fit' and r for _, c, r in rows)}); "
          f"tight {len(tight)} ({sum(tight)} ran, {len(tight) - sum(tight)} out of memory)")
    for i in wrong:
        print("  wrong:", i)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
