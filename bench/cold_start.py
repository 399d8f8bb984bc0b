"""Cold-process start of `vramcalc plan` against the floor set by its own dependencies.

    python bench/cold_start.py [--runs 21]

Median wall time of a cold `vramcalc plan --model llama-7b` (the installed console script,
else `python -m vramcalc`) vs (a) a cold `python -c "import typer, rich, pydantic, yaml"`
(the libraries any command needs) and (b) a cold `python -c pass` (the interpreter alone).
Targets (issue 9): plan <= 1.6x (a) and <= 6x (b). Runs are interleaved, so a busy
machine slows all three alike; the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_DEPS = 1.6
TARGET_PYTHON = 6.0


def commands() -> dict[str, list[str]]:
    exe = shutil.which("vramcalc")
    plan = [exe] if exe else [sys.executable, "-m", "vramcalc"]
    return {
        "plan": [*plan, "plan", "--model", "llama-7b"],
        "deps": [sys.executable, "-c", "import typer, rich, pydantic, yaml"],
        "python": [sys.executable, "-c", "pass"],
    }


def measure(runs: int) -> dict[str, float]:
    cmds = commands()
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for cmd in cmds.values():  # warm the OS file cache once, untimed
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(runs):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    med = measure(args.runs)
    r_deps, r_py = med["plan"] / med["deps"], med["plan"] / med["python"]
    print(f"median of {args.runs} cold runs:")
    print(f"  vramcalc plan --model llama-7b   {1000 * med['plan']:7.1f} ms")
    print(f"  import typer, rich, pydantic, yaml {1000 * med['deps']:5.1f} ms"
          f"   plan / deps   = {r_deps:.2f}x (target <= {TARGET_DEPS}x)")
    print(f"  python -c pass                   {1000 * med['python']:7.1f} ms"
          f"   plan / python = {r_py:.2f}x (target <= {TARGET_PYTHON}x)")
    return 0 if r_deps <= TARGET_DEPS and r_py <= TARGET_PYTHON else 1


if __name__ == "__main__":
    sys.exit(main())
