"""A light command ends its process without the interpreter's teardown (cli._exit_now):
the same stdout, stderr and exit status as the normal exit, in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# the command line as `vramcalc` runs it (its console script: `main()`), and the same with
# the normal exit (`main(exit_now=False)`: click's SystemExit ends the interpreter)
_RUN = ("import sys; sys.argv = ['vramcalc', *sys.argv[1:]]; import vramcalc.cli as cli; "
        "cli.main({})")


@pytest.mark.parametrize("argv", [
    ["plan", "-m", "llama-3.1-8b", "--gpu", "rtx-4090", "--batch", "16"],  # exit 3
    ["plan", "-m", "llama-3.1-8b", "--json"],
    ["plan", "-m", "no-such-model"],  # an Error: line
    ["plan", "--batch", "zero"],  # a usage error (click)
    ["models"],
])
def test_a_light_command_exits_as_before(argv: list[str]) -> None:
    fast = subprocess.run([sys.executable, "-c", _RUN.format(""), *argv],
                          capture_output=True, text=True)
    normal = subprocess.run([sys.executable, "-c", _RUN.format("exit_now=False"),
                             *argv], capture_output=True, text=True)
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        normal.returncode, normal.stdout, normal.stderr)
    assert fast.stdout or fast.stderr


def test_a_light_command_skips_the_teardown_and_another_does_not() -> None:
    """A light command ends by os._exit (here told apart by a marker on it); no command
    (`--version`) exits normally."""
    probe = ("import os\nreal_exit = os._exit\n"
             "def marked(code):\n    os.write(2, b'os._exit')\n    real_exit(code)\n"
             "os._exit = marked\n" + _RUN.format(""))
    light = subprocess.run([sys.executable, "-c", probe, "models"], capture_output=True,
                           text=True)
    other = subprocess.run([sys.executable, "-c", probe, "--version"], capture_output=True,
                           text=True)
    assert light.returncode == other.returncode == 0
    assert light.stderr.endswith("os._exit")
    assert "os._exit" not in other.stderr


def test_a_profiled_command_exits_normally(tmp_path: Path) -> None:
    """Under a profiler (python -m cProfile writes its stats once the program returns)
    a light command takes the normal exit."""
    stats = tmp_path / "models.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), "-m",
                           "vramcalc", "models"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert stats.is_file() and stats.stat().st_size > 0
