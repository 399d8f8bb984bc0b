"""The compiled replay (vramcalc.memory.allocator._replay, built by setup.py where a C
compiler is found) and the pure-Python one give the same numbers; `vramcalc --version`
says which one runs.

With VRAMCALC_NO_EXTENSIONS=1 (.ci/run runs these tests so too) the package runs as an
install without the compiled replay: the tests of the compiled side are skipped and the
rest run on the Python one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.memory.allocator import replay as allocator_replay
from vramcalc.memory.allocator.replay import ENGINE, replay_program
from vramcalc.memory.program.load import load_requests
from vramcalc.memory.program.step import program_peaks, step_program
from vramcalc.memory.program.templates import StepProgram
from vramcalc.models.spec import depth_cut, get_spec
from vramcalc.plans import TrainPlan

compiled = pytest.mark.skipif(
    ENGINE != "compiled",
    reason="the compiled replay is not built here (no C compiler at install, or "
           "VRAMCALC_NO_EXTENSIONS set)")

PLANS = [
    ("llama-3.2-1b", {}),
    ("llama-3.2-1b", {"expandable_segments": True}),
    ("qwen2.5-0.5b", {"method": "lora", "batch_size": 8, "gradient_checkpointing": False,
                      "attn": "eager", "expandable_segments": True}),
    ("mixtral-8x7b", {"method": "full", "optimizer": "adamw_torch", "layers": 8}),
    ("mixtral-8x7b", {"quant": "int8", "expandable_segments": True, "layers": 8}),
    ("gemma-2-2b", {"quant": "int8", "loop": "trainer-plain-outputs", "seq_len": 4096,
                    "layers": 8}),
    ("phi-3-mini", {"method": "full", "weights_dtype": "fp32", "layers": 8,
                    "expandable_segments": True}),
    ("qwen3-8b", {"quant": "fp4", "double_quant": False, "batch_size": 4}),
]


def _case(name: str, options: dict[str, object]) -> tuple[object, TrainPlan]:
    opts = dict(options)
    layers = opts.pop("layers", None)
    spec = get_spec(name)
    if isinstance(layers, int):
        spec = depth_cut(spec, layers)
    return spec, TrainPlan(**opts)  # type: ignore[arg-type]


@compiled
@pytest.mark.parametrize(("name", "options"), PLANS)
def test_both_replays_give_the_same_peaks(name: str, options: dict[str, object]) -> None:
    spec, plan = _case(name, options)
    py = program_peaks(spec, plan, engine="python")  # type: ignore[arg-type]
    c = program_peaks(spec, plan, engine="compiled")  # type: ignore[arg-type]
    assert c == py


@compiled
@pytest.mark.parametrize(("name", "options"), PLANS)
def test_both_replays_give_the_same_peaks_with_descending_segments(
        name: str, options: dict[str, object]) -> None:
    spec, plan = _case(name, options)
    py = program_peaks(spec, plan, engine="python", descending=True)  # type: ignore[arg-type]
    c = program_peaks(spec, plan, engine="compiled", descending=True)  # type: ignore[arg-type]
    assert c == py


def _tie_program() -> list[tuple[int, int]]:
    """Two free 40 MiB blocks tie for a 20 MiB request: the front of a 60 MiB segment (its
    back still held) and a whole 40 MiB segment made after it. Where the request lands
    decides whether a 60 MiB request then fits in the first segment, freed whole."""
    mib = 1 << 20
    return [(0, 60 * mib), (0, 0), (1, 40 * mib), (2, 20 * mib), (3, 40 * mib),
            (1, 0), (3, 0), (4, 20 * mib), (2, 0), (5, 60 * mib)]


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_descending_segments_break_a_tie_toward_the_newest(engine: str) -> None:
    """Best fit takes the lower address among equal free blocks (c10 BlockComparatorSize):
    the old segment's with rising addresses, the new one's with descending ones."""
    if engine == "compiled" and ENGINE != "compiled":
        pytest.skip("the compiled replay is not built here")
    mib = 1 << 20
    blocks = StepProgram.plain(_tie_program(), []).blocks
    rising = replay_program([], blocks, [0], False, engine=engine)  # type: ignore[arg-type]
    falling = replay_program([], blocks, [0], False, engine=engine,  # type: ignore[arg-type]
                             descending=True)
    assert rising.peak_reserved == 160 * mib
    assert falling.peak_reserved == 100 * mib


@compiled
def test_both_replays_give_the_same_peaks_on_a_plain_program() -> None:
    """A program of one block (no template) and a load that empties the cache (QLoRA)."""
    spec, plan = _case("llama-3.2-1b", {"expandable_segments": True})
    full = step_program(spec, plan).requests()
    plain = StepProgram.plain(full, [("forward", 0), ("backward", len(full) // 2)])
    load = load_requests(spec, plan)
    bounds = [k for _, k in plain.phases]
    for expandable in (False, True):
        for descending in (False, True):
            py = replay_program(load, plain.blocks, bounds, expandable, engine="python",
                                descending=descending)
            c = replay_program(load, plain.blocks, bounds, expandable, engine="compiled",
                               descending=descending)
            assert c == py


@compiled
def test_the_compiled_replay_refuses_a_free_of_nothing() -> None:
    with pytest.raises(KeyError):
        replay_program([], StepProgram.plain([(1, 4096), (2, 0)], []).blocks, [0], False,
                       engine="compiled")


def test_the_python_replay_runs_where_asked() -> None:
    spec, plan = _case("llama-3.2-1b", {})
    peaks = program_peaks(spec, plan, engine="python")
    assert peaks.peak_reserved >= peaks.peak_allocated > 0


def test_asking_for_a_compiled_replay_that_is_not_built_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator_replay, "_COMPILED", None)
    with pytest.raises(RuntimeError, match="not built"):
        replay_program([], [], [], False, engine="compiled")


def test_version_says_which_replay_runs() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip().endswith(f"(replay: {ENGINE})")


def test_no_extensions_runs_the_python_replay() -> None:
    env = {**os.environ, "VRAMCALC_NO_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-c",
         "from vramcalc.memory.allocator.replay import ENGINE; print(ENGINE)"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "python"


@pytest.mark.parametrize(("name", "options"), PLANS[:5])
def test_requested_peaks_come_from_either_replay(name: str, options: dict[str, object]) -> None:
    """The requested peaks (the rounded request bytes alive, step_requests.requested_peaks)
    that both replays track equal the reference over the expanded program."""
    from vramcalc.memory.program.step import requested_peaks

    spec, plan = _case(name, options)
    program = step_program(spec, plan)
    want = requested_peaks(load_requests(spec, plan), program.requests(), program.phases)
    engines = ["python", "compiled"] if ENGINE == "compiled" else ["python"]
    for engine in engines:
        assert program_peaks(spec, plan, engine=engine).requested == want  # type: ignore[arg-type]
