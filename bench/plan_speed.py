"""Cold-process wall time of `vramcalc plan`, and the inverse search's speed.

    python bench/plan_speed.py [--runs 15]

Target (issue 3): median wall <= 0.25 s for a cold `vramcalc plan` on the 2-core dev
machine; the inverse search over thousands of candidates well under a second.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def cold_plan_seconds(runs: int) -> list[float]:
    exe = shutil.which("vramcalc")
    cmd = [exe] if exe else [sys.executable, "-m", "vramcalc.cli"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*cmd, "plan", "--model", "llama-7b", "--rank", "16", "--batch", "4"],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def search_seconds() -> tuple[float, int]:
    from vramcalc.memory.estimate import estimate
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.search import largest_fitting

    spec = get_spec("llama-3.1-8b")
    t0 = time.perf_counter()
    n = 0
    for gib in (8, 12, 16, 24, 40, 48, 80, 141):
        for what in ("batch", "seq-len"):
            largest_fitting(spec, TrainPlan(), what, gib * 2**30, 2**29)
    # and a brute-force sweep of 2,000 candidate settings
    for batch in range(1, 41):
        for seq in range(256, 256 * 51, 256):
            estimate(spec, TrainPlan(batch_size=batch, seq_len=seq))
            n += 1
    return time.perf_counter() - t0, n


def main(argv: list[str]) -> int:
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 15
    times = cold_plan_seconds(runs)
    print(f"cold `vramcalc plan`: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s over {runs} runs (target <= 0.25 s)")
    secs, n = search_seconds()
    print(f"16 inverse searches + {n} estimates: {secs:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
