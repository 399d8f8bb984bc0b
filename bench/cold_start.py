"""Cold-process start of `vramcalc plan` against the floor set by its own dependencies.

    python bench/cold_start.py [--runs 21]

Median wall time of a cold `vramcalc plan --model llama-7b` (the installed console script,
else `python -m vramcalc`) vs (a) a cold `python -c "import typer, rich, pydantic, yaml"`
(the libraries any command needs) and (b) a cold `python -c pass` (the interpreter alone).
Targets (issue 9): plan <= 1.6x (a) and <= 6x (b). Runs are interleaved, so a busy
machine slows all three alike; the ratios are what to compare across machines.

    python bench/cold_start.py --breakdown [--runs 21]

also times, interleaved with the three above, the library floor under plan: cold processes
that do only what plan needs from its libraries, each step on top of the one before
(a pydantic model with a constrained field validated once; rich.console + rich.table
imported; a 16-row table printed), with the same process settings as `vramcalc.cli.main`
(gc.freeze, PYDANTIC_DISABLE_PLUGINS). plan minus the last step is vramcalc's own time.
The untimed warm-up run writes the .pyc files even under PYTHONDONTWRITEBYTECODE, so a
source tree is timed as an install is: with its bytecode cache.

Time what users run: the wheel in a fresh venv (an editable install adds its import
finder, ~10 ms; a source tree reads the same committed YAML indexes as the wheel,
models/catalog_index.py, so neither imports PyYAML since 2026-12-07):

    pip wheel --no-deps -w /tmp/whl . && python3 -m venv /tmp/wv
    /tmp/wv/bin/pip install /tmp/whl/*.whl
    PATH=/tmp/wv/bin:$PATH /tmp/wv/bin/python bench/cold_start.py --breakdown

Measured so (2026-12-01, this 2-core machine): plan 181 ms, deps 99 ms, python 11 ms;
the library floor (a validated pydantic model, rich imported, a table printed) 172 ms, of
which ~10 ms is the PyYAML that plan no longer imports: the floor alone is ~1.64x the deps
line and ~15x a bare interpreter, and vramcalc's own share is 9 ms. The deps line imports
`pydantic` lazily (no BaseModel, no validator, so no importlib.metadata for the plugin
loader): the targets lie below what the required libraries cost.
"""

from __future__ import annotations

import argparse
import os
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


_DEPS = "import typer, rich, pydantic, yaml"
_MAIN = "import gc, os; gc.freeze(); os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '__all__')"
_MODEL = """
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
class M(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)
    n: PositiveInt = 1
    f: float = Field(default=0.0, ge=0.0, lt=1.0)
M(n=2)
"""
_RICH = "\nimport rich.console, rich.table"
_TABLE = """
t = rich.table.Table(title='title', title_justify='left')
for c in ('component', 'GiB', 'share', ''):
    t.add_column(c, justify='right')
for i in range(16):
    t.add_row(f'component {i}', f'{i:.2f}', f'{i:.1f}%', '#' * i)
rich.console.Console(emoji=False).print(t)
"""
# Cumulative steps: each is the one before plus one more piece of plan's library work.
FLOOR = {
    "+ a validated pydantic model": _DEPS + "; " + _MAIN + _MODEL,
    "+ import rich.console, rich.table": _DEPS + "; " + _MAIN + _MODEL + _RICH,
    "+ print a 16-row rich table": _DEPS + "; " + _MAIN + _MODEL + _RICH + _TABLE,
}


def measure(runs: int, breakdown: bool = False) -> dict[str, float]:
    cmds = commands()
    if breakdown:
        cmds.update({k: [sys.executable, "-c", code] for k, code in FLOOR.items()})
    times: dict[str, list[float]] = {k: [] for k in cmds}
    # Warm the OS file cache once, untimed, and write the .pyc files a cold start reads (a
    # user's install has them): without PYTHONDONTWRITEBYTECODE, else every timed run would
    # compile vramcalc's sources again (~15 ms in a dev tree).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for cmd in cmds.values():
        subprocess.run(cmd, check=True, capture_output=True, env=env)
    for _ in range(runs):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the library floor under plan, step by step")
    args = parser.parse_args()
    med = measure(args.runs, args.breakdown)
    r_deps, r_py = med["plan"] / med["deps"], med["plan"] / med["python"]
    print(f"median of {args.runs} cold runs:")
    print(f"  vramcalc plan --model llama-7b   {1000 * med['plan']:7.1f} ms")
    print(f"  import typer, rich, pydantic, yaml {1000 * med['deps']:5.1f} ms"
          f"   plan / deps   = {r_deps:.2f}x (target <= {TARGET_DEPS}x)")
    print(f"  python -c pass                   {1000 * med['python']:7.1f} ms"
          f"   plan / python = {r_py:.2f}x (target <= {TARGET_PYTHON}x)")
    if args.breakdown:
        print("library floor under plan (each step adds to the one before):")
        prev = med["deps"]
        for name in FLOOR:
            print(f"  {name:34s} {1000 * med[name]:7.1f} ms   +{1000 * (med[name] - prev):5.1f} ms")
            prev = med[name]
        print(f"  {'vramcalc plan itself':34s} {1000 * med['plan']:7.1f} ms   "
              f"+{1000 * (med['plan'] - prev):5.1f} ms")
    return 0 if r_deps <= TARGET_DEPS and r_py <= TARGET_PYTHON else 1


if __name__ == "__main__":
    sys.exit(main())
