"""Compute time of `vramcalc fit`: every catalog model x method on one GPU.

    python bench/fit_speed.py [--runs 5] [--gpu rtx-4090 --gpu h200 ...]

Target: the whole catalog (every model x full, lora, qlora, int8, with the largest batch
and the longest sequence of each that fits) in under 1 s of compute on the 2-core dev
machine. Prints, per GPU, the median and worst of `--runs` timings of
`comparison.fit_rows` (specs loaded and cached before timing: the catalog load is the
same for every command), the number of estimate calls, and a cold `vramcalc fit` wall
time (interpreter start and imports included).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.hardware.catalog import resolve_gpu  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.memory.result import Estimate  # noqa: E402
from vramcalc.models.spec import ModelSpec, catalog  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.sizing.comparison import fit_rows  # noqa: E402

MARGIN = 2**29


def time_fit(gpu: str, runs: int) -> tuple[list[float], int, int]:
    specs, card, plan = catalog(), resolve_gpu(gpu), TrainPlan()
    calls = 0

    def counted(spec: ModelSpec, p: TrainPlan) -> Estimate:
        nonlocal calls
        calls += 1
        return estimate(spec, p)

    rows = fit_rows(specs, plan, card, MARGIN, estimate_fn=counted)
    n_calls = calls
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fit_rows(specs, plan, card, MARGIN)
        times.append(time.perf_counter() - t0)
    return times, n_calls, len(rows)


def cold_fit_seconds(gpu: str) -> float:
    exe = shutil.which("vramcalc")
    cmd = [exe] if exe else [sys.executable, "-m", "vramcalc"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "fit", "--gpu", gpu, "--json"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gpu", action="append", default=None)
    args = ap.parse_args()
    for gpu in args.gpu or ["t4", "rtx-4090", "a100-sxm4-80gb", "h200", "b200"]:
        times, calls, rows = time_fit(gpu, args.runs)
        print(f"{gpu:16} {rows} pairs, {calls:5d} estimates: compute median "
              f"{statistics.median(times):.3f} s, worst {max(times):.3f} s; cold "
              f"`vramcalc fit --json` {cold_fit_seconds(gpu):.2f} s wall")


if __name__ == "__main__":
    main()
