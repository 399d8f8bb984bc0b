"""Estimator vs the H100 measurements committed under calibration/raw/.

    python bench/accuracy.py [--verbose]

Prints one row per measured point (estimated and measured peak allocated, reserved and
device memory, and the relative errors) and a summary: median and worst |error|.
No fitted correction is applied: this is the raw analytic estimate. Points where the
allocator hit the card's memory (alloc retries > 0) count for allocated only: their
reserved and device peaks were capped by the card. The fits/out-of-memory calls of every
point, OOM ones included, are checked last.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.corrections.points import fit_calls, load_raw_points  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

CAPPED_NOTE = "  (capped by the card: reserved/device not compared)"


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1] / "calibration" / "raw"
    rows = []
    for point in load_raw_points(root):
        if point.oom or point.peak_allocated_bytes is None:
            continue
        est = estimate(get_spec(point.model), point.plan)
        rows.append((point, est))
    errs = {"alloc": [], "reserved": [], "device": []}
    print(f"{'model':14} {'b':>2} {'seq':>5} {'r':>3} gc {'attn':5} {'optimizer':18} "
          f"{'est GiB':>8} {'meas GiB':>8} {'err%':>6} {'res%':>6} {'dev%':>6} phase")
    for point, est in rows:
        p = point.plan
        e_a = est.peak_allocated_bytes / point.peak_allocated_bytes - 1
        e_r = est.peak_reserved_bytes / point.peak_reserved_bytes - 1
        e_d = est.peak_device_bytes / point.peak_device_bytes - 1
        errs["alloc"].append(e_a)
        if not point.memory_capped:  # a capped reserved/device peak measures the card
            errs["reserved"].append(e_r)
            errs["device"].append(e_d)
        print(f"{point.model:14} {p.batch_size:>2} {p.seq_len:>5} {p.rank:>3} "
              f"{int(p.gradient_checkpointing):>2} {p.attn:5} {p.optimizer:18} "
              f"{est.peak_allocated_bytes / GiB:8.2f} {point.peak_allocated_bytes / GiB:8.2f} "
              f"{100 * e_a:6.1f} {100 * e_r:6.1f} {100 * e_d:6.1f} {est.peak_phase}"
              f"{CAPPED_NOTE if point.memory_capped else ''}")
    print()
    for name, vals in errs.items():
        if vals:
            a = sorted(abs(x) for x in vals)
            med = a[len(a) // 2] if len(a) % 2 else (a[len(a) // 2 - 1] + a[len(a) // 2]) / 2
            print(f"peak {name:9}: n={len(a)} median |err| {100 * med:.2f}%  "
                  f"worst {100 * a[-1]:.2f}%")
    print()
    print(fit_call_summary(root))
    return 0


def fit_call_summary(root: Path, free_bytes: int = int(79.18 * GiB)) -> str:
    """Do the verdicts (no margin) call fits / out-of-memory right on every H100 point?
    Wrong: "fits" that ran out of memory, or "does not fit" that ran; "tight" (the
    allocator band) is counted apart with what happened."""
    calls = fit_calls(root, free_bytes)
    wrong = sum((c == "fits" and not ran) or (c == "does_not_fit" and ran)
                for _, c, ran in calls)
    tight = [ran for _, c, ran in calls if c == "tight"]
    ooms = sum(not ran for _, _, ran in calls)
    return (f"fits / out-of-memory calls on the H100 (79.18 GiB free): {len(calls) - wrong} "
            f"of {len(calls)} right or tight ({ooms} measured out-of-memory); tight: "
            f"{len(tight)} ({sum(tight)} ran, {len(tight) - sum(tight)} out of memory)")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
