"""How fast the engine answers, against the targets of issue 26 (Deliver 2).

    python bench/engine_speed.py [--runs N] [--cold-runs N] [--baseline SRC]

In-process: the median time of one full estimate (`vramcalc.api.plan`, the allocator
replay on) for llama-3.1-8b, llama-2-70b and llama-3.1-405b, in child processes on this
checkout's src/ (three per model, each after one warm-up call; the shapes of the cuts
that step_templates keeps for the next estimate of a search or a sweep are dropped before
each call, and so are the load requests and the traces that program.step keeps, so each
is a whole estimate, as a cold `plan` makes it): wall
time (what the targets are), and the process's CPU time, which other processes on the
machine disturb less.
Cold processes: each command's median wall time over N runs, as a ratio to the median
of `python -c pass` measured in the same rounds (the commands and the baseline take
turns, so a change in the machine's load reaches both), and the median CPU time of the
process (user + system, os.wait4), which other processes disturb less, with its ratio
to `python -c pass`'s. Prints PASS or MISS (on the wall ratio) for each
target, the replay that ran (`vramcalc --version`) and the load average before and after:
other processes on the machine slow every number here, so run it when the load is low.

The cold processes read their bytecode from a cache, as an installed package does (pip
writes the .pyc files at install): one untimed run of each command writes it into a
temporary PYTHONPYCACHEPREFIX (no source tree is written to), and every timed run,
`python -c pass` included, reads from there. `--compile-sources` times them in the
environment as it is, as this bench did before: with PYTHONDONTWRITEBYTECODE set (as on
the dev machine) a source checkout compiles vramcalc's modules at every start, ~60 ms of
a cold plan there (2026-12-07).
`--installed VENV` times the cold commands as a user's install runs them: VENV/bin/vramcalc
against VENV/bin/python -c pass, with neither PYTHONPATH nor a bytecode prefix (the .pyc
files pip wrote, and the code_cache tables the untimed first run writes beside them). A
source checkout's editable install adds its path finder to every interpreter start,
`python -c pass` included, and the dev venv's other .pth files more: there `python -c
pass` took 25-32 ms, in a fresh venv holding only the wheel 12.2 ms, so the ratios from a
checkout read about half a wheel's (2026-12-08: a cold `plan` 185-198 ms, 5.7-6.1x, from
the checkout at 02:00 UTC; 167-197 ms, 13.6-16.1x, from the wheel at 02:19).
`--baseline /other/checkout/src` times that checkout's code in the same rounds (each
in-process model and each command takes turns between the two, the commands with
PYTHONPATH set to each src/), for a before/after table under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


SRC = Path(__file__).resolve().parents[1] / "src"

# One child process per (checkout, model, round): warm-up call, then `runs` timed calls of
# `vramcalc.api.plan(model)`; prints the wall and CPU seconds of each as JSON.
_IN_PROCESS_CHILD = """
import json, sys, time
import vramcalc.memory.program.templates as templates
from vramcalc.api import plan
model, runs = sys.argv[1], int(sys.argv[2])
plan(model)  # warm-up: imports, the catalog, the corrections
shapes = getattr(templates, "_SHAPES", {})  # the cut shapes seen: none kept between calls
import vramcalc.memory.program.step as step
loads = getattr(step, "_LOADS", {})  # nor the load requests, nor the traces (symbolic.py)
traces = getattr(step, "STEP_CACHE", None)
wall, cpu = [], []
for _ in range(runs):
    shapes.clear()
    loads.clear()
    if traces is not None:
        traces.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    plan(model)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps([wall, cpu]))
"""


def in_process(model: str, runs: int, src: Path) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `runs` estimates of `model` in one process on `src`'s code."""
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS_CHILD, model, str(runs)],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, "PYTHONPATH": str(src)})
    if done.returncode:
        raise SystemExit(f"in-process {model} on {src}: {done.stderr.strip()}")
    wall_s, cpu_s = json.loads(done.stdout)
    return wall_s, cpu_s


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds of `cmd` and its process's CPU seconds (user + system)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - t0
    # (communicate waited for it: its rusage is read off the children's total)
    if proc.returncode not in (0, 3):  # 3: estimated not to fit
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err.decode().strip()}")
    return elapsed, _last_child_cpu()


_CHILDREN_CPU = [0.0]


def _last_child_cpu() -> float:
    """CPU seconds of the child reaped last: the growth of RUSAGE_CHILDREN since the call
    before (each command is waited for before the next starts)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ru.ru_utime + ru.ru_stime
    cpu, _CHILDREN_CPU[0] = total - _CHILDREN_CPU[0], total
    return cpu


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    return timed(cmd, env)[0]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="in-process runs per model")
    parser.add_argument("--cold-runs", type=int, default=11, help="cold runs per command")
    parser.add_argument("--compile-sources", action="store_true",
                        help="cold runs without a bytecode cache (see the module docstring)")
    parser.add_argument("--installed", type=Path, metavar="VENV",
                        help="time the cold commands of this venv's install (e.g. the "
                        "wheel's), against its own python -c pass; no in-process part")
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="another checkout's src/ (e.g. /work/main/src), timed in the "
                        "same rounds, taking turns with this one")
    args = parser.parse_args()
    if args.installed is not None:
        installed(args.installed.resolve(), args.cold_runs)
        return
    exe = shutil.which("vramcalc", path=str(Path(sys.executable).parent)) or "vramcalc"
    trees = {"this": SRC}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), "this": SRC}
    for name, src in trees.items():
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(src)}).stdout.strip()
        print(f"{name}: {src}: {version}")
    print(f"python {sys.version.split()[0]}; load average before "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    rounds = 3  # each checkout's runs in three turns, so a change in load reaches both
    print(f"\nin-process, one full estimate (vramcalc.api.plan), median of {args.runs} "
          "(CPU: the process's CPU time, which other processes disturb less):")
    for model, target in IN_PROCESS:
        times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in trees}
        for r in range(rounds):
            for name, src in trees.items():
                w, c = in_process(model, args.runs // rounds + (r < args.runs % rounds), src)
                times[name][0].extend(w)
                times[name][1].extend(c)
        for name in trees:
            ms = 1e3 * statistics.median(times[name][0])
            cpu = 1e3 * statistics.median(times[name][1])
            goal = "" if target is None else (f"  target <= {target:.0f} ms  "
                                              f"{verdict(ms <= target)}")
            print(f"  {name:<8} {model:<16} {ms:7.1f} ms (CPU {cpu:5.1f} ms){goal}")

    cache = tempfile.TemporaryDirectory(prefix="vramcalc-pyc-")
    env: dict[str, str] = dict(os.environ)
    if not args.compile_sources:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache.name
    envs = {name: {**env, "PYTHONPATH": str(src)} for name, src in trees.items()}
    if not args.compile_sources:  # untimed: writes the bytecode cache
        wall([sys.executable, "-c", "pass"], env)
        for name in trees:
            for _, argv, _ in COLD:
                wall([exe, *argv], envs[name])
    print(f"\ncold processes, median of {args.cold_runs}, ratio to `python -c pass` "
          f"({'sources compiled at every start' if args.compile_sources else 'bytecode cached'}"
          "):")
    base: list[tuple[float, float]] = []
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {
        (n, label): [] for n in trees for label, _, _ in COLD}
    _last_child_cpu()  # (the untimed runs' CPU left out)
    for _ in range(args.cold_runs):
        for label, argv, _ in COLD:
            for name in trees:
                base.append(timed([sys.executable, "-c", "pass"], env))
                runs[name, label].append(timed([exe, *argv], envs[name]))
    cache.cleanup()
    cold_table(base, [(f"{name:<8} {label:<30}", runs[name, label], target)
                      for label, _, target in COLD for name in trees])
    print(f"\nload average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def cold_table(base: list[tuple[float, float]],
               rows: list[tuple[str, list[tuple[float, float]], float]]) -> None:
    """The cold table: `python -c pass`'s median (wall, CPU) from `base`, then each row's
    (label, its (wall, CPU) samples, its target ratio) against it."""
    b = statistics.median(w for w, _ in base)
    bc = statistics.median(c for _, c in base)
    print(f"  {'python -c pass':<39} {1e3 * b:8.1f} ms (CPU {1e3 * bc:6.1f} ms)")
    for label, samples, target in rows:
        m = statistics.median(w for w, _ in samples)
        mc = statistics.median(c for _, c in samples)
        print(f"  {label:<39} {1e3 * m:8.1f} ms  {m / b:5.1f}x  target <= {target:.0f}x  "
              f"{verdict(m / b <= target)}  (CPU {1e3 * mc:7.1f} ms, {mc / bc:5.1f}x)")


def installed(venv: Path, cold_runs: int) -> None:
    """The cold table of an installed vramcalc (`--installed`, module docstring)."""
    py, exe = venv / "bin" / "python", venv / "bin" / "vramcalc"
    if not exe.exists():
        raise SystemExit(f"{exe}: no vramcalc installed in {venv}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONPYCACHEPREFIX")}
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             env=env).stdout.strip()
    print(f"installed: {venv}: {version}; load average before "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    wall([str(py), "-c", "pass"], env)  # untimed: the tables code_cache writes
    for _, argv, _ in COLD:
        wall([str(exe), *argv], env)
    base: list[tuple[float, float]] = []
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in COLD}
    _last_child_cpu()
    for _ in range(cold_runs):
        for label, argv, _ in COLD:
            base.append(timed([str(py), "-c", "pass"], env))
            runs[label].append(timed([str(exe), *argv], env))
    print(f"\ncold processes of the install, median of {cold_runs}, ratio to its "
          "`python -c pass`:")
    cold_table(base, [(label, runs[label], target) for label, _, target in COLD])
    print(f"\nload average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
