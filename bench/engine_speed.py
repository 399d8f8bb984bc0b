"""How fast the engine answers, against the targets of issue 26 (Deliver 2).

    python bench/engine_speed.py [--runs N] [--cold-runs N]

In-process: the median time of one full estimate (`vramcalc.api.plan`, the allocator
replay on) for llama-3.1-8b, llama-2-70b and llama-3.1-405b, after one warm-up call: wall
time (what the targets are), and the process's CPU time, which other processes on the
machine disturb less.
Cold processes: each command's median wall time over N runs, as a ratio to the median
of `python -c pass` measured in the same rounds (the commands and the baseline take
turns, so a change in the machine's load reaches both). Prints PASS or MISS for each
target, the replay that ran (`vramcalc --version`) and the load average before and after:
other processes on the machine slow every number here, so run it when the load is low.

The cold processes read their bytecode from a cache, as an installed package does (pip
writes the .pyc files at install): one untimed run of each command writes it into a
temporary PYTHONPYCACHEPREFIX (no source tree is written to), and every timed run,
`python -c pass` included, reads from there. `--compile-sources` times them in the
environment as it is, as this bench did before: with PYTHONDONTWRITEBYTECODE set (as on
the dev machine) a source checkout compiles vramcalc's modules at every start, ~60 ms of
a cold plan there (2026-12-07).
To time another checkout's code with the same bench in the same minute, run a copy of
this file from outside the repo with PYTHONPATH=/that/checkout/src: the in-process part
imports from PYTHONPATH, and the commands inherit it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

IN_PROCESS = [  # model, target median in ms (None: reported only)
    ("llama-3.1-8b", 15.0),
    ("llama-2-70b", None),
    ("llama-3.1-405b", 40.0),
]

COLD = [  # label, arguments to `vramcalc`, target ratio to `python -c pass`
    ("plan llama-3.1-8b", ["plan", "-m", "llama-3.1-8b"], 7.0),
    ("plan llama-2-70b", ["plan", "-m", "llama-2-70b"], 7.0),
    ("plan llama-3.1-405b", ["plan", "-m", "llama-3.1-405b"], 7.0),
    # does not fit an RTX 4090: check runs its suggestions
    ("check, suggestions", ["check", "-m", "llama-3.1-8b", "--gpu", "rtx-4090", "--batch", "16",
                            "--seq-len", "4096"], 9.0),
    ("compare llama-3.1-8b", ["compare", "-m", "llama-3.1-8b"], 10.0),
    ("fit --gpu rtx-4090 (catalog)", ["fit", "--gpu", "rtx-4090"], 25.0),
    ("sweep, 64 points", ["sweep", "-m", "llama-3.1-8b", "--over", "batch=1:64:+1", "--gpu",
                          "rtx-4090"], 15.0),
]


def median_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall and CPU time of `fn`, in ms."""
    fn()  # warm-up: imports, the catalog, the corrections
    wall_s, cpu_s = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall_s), 1e3 * statistics.median(cpu_s)


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode not in (0, 3):  # 3: estimated not to fit
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="in-process runs per model")
    parser.add_argument("--cold-runs", type=int, default=11, help="cold runs per command")
    parser.add_argument("--compile-sources", action="store_true",
                        help="cold runs without a bytecode cache (see the module docstring)")
    args = parser.parse_args()
    exe = shutil.which("vramcalc", path=str(Path(sys.executable).parent)) or "vramcalc"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; python {sys.version.split()[0]}; load average before "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    from vramcalc.api import plan

    print("\nin-process, one full estimate (vramcalc.api.plan), median of "
          f"{args.runs}:")
    for model, target in IN_PROCESS:
        ms, cpu = median_ms(lambda model=model: plan(model), args.runs)  # type: ignore[misc]
        goal = "" if target is None else (f"  target <= {target:.0f} ms  "
                                          f"{verdict(ms <= target)}")
        print(f"  {model:<16} {ms:7.1f} ms (CPU {cpu:5.1f} ms){goal}")

    cache = tempfile.TemporaryDirectory(prefix="vramcalc-pyc-")
    env: dict[str, str] | None = None
    if not args.compile_sources:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache.name
        wall([sys.executable, "-c", "pass"], env)  # untimed: writes the bytecode cache
        for _, argv, _ in COLD:
            wall([exe, *argv], env)
    print(f"\ncold processes, median of {args.cold_runs}, ratio to `python -c pass` "
          f"({'sources compiled at every start' if env is None else 'bytecode cached'}):")
    base: list[float] = []
    runs: dict[str, list[float]] = {label: [] for label, _, _ in COLD}
    for _ in range(args.cold_runs):
        for label, argv, _ in COLD:
            base.append(wall([sys.executable, "-c", "pass"], env))
            runs[label].append(wall([exe, *argv], env))
    cache.cleanup()
    b = statistics.median(base)
    print(f"  {'python -c pass':<30} {1e3 * b:7.1f} ms")
    for label, _, target in COLD:
        m = statistics.median(runs[label])
        print(f"  {label:<30} {1e3 * m:7.1f} ms  {m / b:5.1f}x  target <= {target:.0f}x  "
              f"{verdict(m / b <= target)}")
    print(f"\nload average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
