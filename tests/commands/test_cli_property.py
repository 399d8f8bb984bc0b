"""Every command, driven with random values: no traceback, no hang, no stray writes.

Hypothesis draws a command (plan, check, compare, fit, sweep, models, gpus, calibrate
report), a model, and a few options with huge, negative, NaN, random-text or special-path
values (/dev/null, /proc/self/mem, a directory, a FIFO, a binary file, a missing path).
Each run, in-process through CliRunner, must end with a documented exit code (0 ok, 1
error, 2 usage, 3 does not fit, 4 no GPU) and no exception other than the exit; a SIGALRM
watchdog turns a run past 10 s into a failure; and the scratch folder's tree (names, sizes,
mtimes) must be unchanged apart from the outputs the command was told to write (--plot).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vramcalc.cli import app

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and SIGALRM")

runner = CliRunner()
DOCUMENTED = {0, 1, 2, 3, 4}
HANG_S = 10


class Hang(Exception):
    """A command ran past HANG_S seconds."""


def _scratch(root: Path) -> dict[str, Path]:
    """The special paths a user can hand to a command, made once per test."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "a-folder"
    folder.mkdir(exist_ok=True)
    binary = root / "binary.json"
    binary.write_bytes(bytes(range(256)) * 4)
    readonly = root / "readonly.yaml"
    readonly.write_text("base_model: llama-7b\n")
    readonly.chmod(0o444)
    fifo = root / "a-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return {"dir": folder, "binary": binary, "readonly": readonly, "fifo": fifo,
            "missing": root / "missing.json"}


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root -> (mode, size, mtime_ns), without following links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            size = st_.st_size if stat.S_ISREG(st_.st_mode) else 0
            out[str(p.relative_to(root))] = (st_.st_mode, size, st_.st_mtime_ns)
    return out


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"a command ran past {HANG_S} s")


NUMBERS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.sampled_from(["0", "-1", "1", "99999999999", "1e308", "nan", "inf", "-inf", "0.5",
                     "2", "16", "4096", "65537", "16777217"]),
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
SPECIAL = st.sampled_from(["/dev/null", "/proc/self/mem", "DIR", "FIFO", "BINARY", "READONLY",
                           "MISSING", "", " ", "-", "~", ".", "..", "/"])
VALUES = st.one_of(NUMBERS, TEXT, SPECIAL)
MODELS = st.one_of(st.sampled_from(["llama-7b", "qwen2.5-0.5b", "mixtral-8x7b", "phi-2",
                                    "gemma-2-2b", "no-such-model"]), SPECIAL, TEXT)

PLAN_OPTS = ["--batch", "--seq-len", "--rank", "--alpha", "--lora-dropout", "--targets",
             "--method", "--quant", "--optimizer", "--compute-dtype", "--attn", "--loop",
             "--weights-dtype", "--moe-experts", "--margin", "--gpu-memory", "--max", "--gpus",
             "--strategy", "--task", "--prompt-len", "--new-tokens", "--cache",
             "--adapter-dtype", "--dtype", "--on", "--from-config", "--gpu", "--offload",
             "--sharding-strategy", "--device-map", "--gpus-per-node"]
FLAGS = ["--json", "--dora", "--no-double-quant", "--no-gradient-checkpointing",
         "--merged", "--expandable-segments", "--no-calibration", "--use-orig-params"]
COMMANDS: dict[str, tuple[list[str], list[str], bool]] = {
    # name -> (the command, the options it is driven with, whether it takes --model)
    "plan": (["plan"], PLAN_OPTS, True),
    "check": (["check", "--gpu", "a100-80gb"], [o for o in PLAN_OPTS if o != "--gpu"], True),
    "compare": (["compare"], ["--batch", "--seq-len", "--rank", "--optimizer", "--margin",
                              "--compute-dtype", "--targets", "--lora-dropout"], True),
    "fit": (["fit"], ["--gpu", "--batch", "--seq-len", "--rank", "--optimizer", "--margin"],
            False),
    "sweep": (["sweep"], ["--over", "--gpu", "--plot", "--batch", "--seq-len", "--rank",
                          "--from-config", "--method"], True),
    "models": (["models"], [], False),
    "gpus": (["gpus"], [], False),
    "calibrate report": (["calibrate", "report"], ["--data"], False),
}
CHOICES = {
    "--method": ["qlora", "lora", "full"], "--quant": ["nf4", "fp4", "int8", "none"],
    "--task": ["train", "infer", "merge"], "--max": ["batch", "seq-len", "prompt-len"],
    "--strategy": ["ddp", "fsdp", "zero2", "zero3", "device-map"],
    "--gpu": ["t4", "rtx-4090", "a100-80gb", "h100"], "--over": [
        "seq-len=512:4096", "batch=1:99999999999:+1", "rank=1:99999", "batch=0:4",
        "seq-len=1:99999999999:*1.0001"],
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-property")


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def _value(raw: str, paths: dict[str, Path]) -> str:
    named = {"DIR": "dir", "FIFO": "fifo", "BINARY": "binary", "READONLY": "readonly",
             "MISSING": "missing"}
    return str(paths[named[raw]]) if raw in named else raw


@st.composite
def _runs(draw: st.DrawFn, name: str) -> tuple[list[str], str | None]:
    head, options, takes_model = COMMANDS[name]
    args = list(head)
    if takes_model and draw(st.booleans() | st.just(True)):
        args += ["-m", draw(MODELS)]
    plot = None
    for opt in draw(st.lists(st.sampled_from(options), max_size=4, unique=True)) if options \
            else []:
        value = draw(st.sampled_from(CHOICES[opt]) | VALUES) if opt in CHOICES \
            else draw(VALUES)
        if opt == "--plot":
            value = draw(st.sampled_from(["out.png", "out.svg", "out.txt", "DIR", "/dev/null",
                                          "FIFO", "READONLY", "sub/out.png"]))
            plot = value
        args += [opt, value]
    args += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return args, plot


def _drive(scratch: Path, args: list[str], plot: str | None) -> None:
    paths = _scratch(scratch)
    args = [_value(a, paths) for a in args]
    named_output = None
    if plot is not None and plot in ("out.png", "out.svg", "sub/out.png"):
        named_output = scratch / plot
        args[args.index(plot)] = str(named_output)
    before = _tree(scratch)
    cwd = os.getcwd()
    os.chdir(scratch)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        r = runner.invoke(app, args, env={"COLUMNS": "80"})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.chdir(cwd)
    assert not isinstance(r.exception, Hang), args
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert "Traceback" not in r.output, (args, r.output)
    assert r.exit_code in DOCUMENTED, (args, r.exit_code, r.output)
    if r.exit_code == 1:
        assert r.stderr.strip().splitlines()[-1].startswith("Error: "), (args, r.stderr)
    after = _tree(scratch)
    allowed = set()
    if named_output is not None:
        rel = named_output.relative_to(scratch)
        allowed = {str(rel), *(str(p) for p in rel.parents if str(p) != ".")}
    changed = {k for k in before.keys() | after.keys()
               if before.get(k) != after.get(k)} - allowed
    assert not changed, (args, sorted(changed))


def _property(name: str) -> Any:
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(run=_runs(name))
    def test(scratch: Path, run: tuple[list[str], str | None]) -> None:
        _drive(scratch, *run)

    return test


test_plan_random = _property("plan")
test_check_random = _property("check")
test_compare_random = _property("compare")
test_fit_random = _property("fit")
test_sweep_random = _property("sweep")
test_models_random = _property("models")
test_gpus_random = _property("gpus")
test_calibrate_report_random = _property("calibrate report")


# Every special path in every place a command reads or writes one, once each (the random
# runs above may not draw them all).
PATH_PLACES = {
    "plan -m": ["plan", "-m"], "check -m": ["check", "--gpu", "t4", "-m"],
    "compare -m": ["compare", "-m"], "sweep -m": ["sweep", "-m"],
    "plan --from-config": ["plan", "--from-config"],
    "calibrate report --data": ["calibrate", "report", "--data"],
    "sweep --plot": ["sweep", "-m", "llama-7b", "--plot"],
}


@pytest.mark.parametrize("place", list(PATH_PLACES))
@pytest.mark.parametrize("path", ["/dev/null", "/proc/self/mem", "DIR", "FIFO", "BINARY",
                                  "READONLY", "MISSING"])
def test_special_paths_everywhere(scratch: Path, place: str, path: str) -> None:
    _drive(scratch, [*PATH_PLACES[place], path], None)
