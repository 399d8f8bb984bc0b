"""The step program repeated from a 6-layer cut (vramcalc.memory.program.templates) is the request
sequence of the full generation (step_requests), tensor ids renumbered in allocation order:
for every catalog model and for each loop, method and attention the generator knows."""

from __future__ import annotations

import itertools

import pytest

from vramcalc.memory.program import templates
from vramcalc.memory.program.step import step_program, step_requests
from vramcalc.memory.program.templates import TEMPLATE_LAYERS, canonical, template_program
from vramcalc.models.spec import ModelSpec, catalog, depth_cut, get_spec
from vramcalc.plans import TrainPlan

SHORT = {"batch_size": 1, "seq_len": 256}


def _same_as_generated(spec: ModelSpec, plan: TrainPlan, templated: bool = True) -> None:
    program = step_program(spec, plan)
    full = step_requests(spec, plan)
    assert (len(program.blocks) > 1) == templated
    requests = program.requests()
    assert len(requests) == program.length == len(full.requests)
    assert canonical(requests) == canonical(full.requests)
    assert program.phases == full.phases


def test_canonical_numbers_tensors_in_allocation_order() -> None:
    assert canonical([(7, 10), (3, 20), (7, 0), (9, 5), (3, 0)]) == [
        (1, 10), (2, 20), (1, 0), (3, 5), (2, 0)]


@pytest.mark.parametrize("name", sorted(s.name for s in catalog()))
def test_every_catalog_model_repeats_its_layers(name: str) -> None:
    """Each catalog architecture, cut to 9 layers (3 middle copies; the repetition is the
    same at any depth), QLoRA: the template gives the generated sequence."""
    _same_as_generated(depth_cut(get_spec(name), 9), TrainPlan(**SHORT))


@pytest.mark.parametrize("name", ["llama-3.2-1b", "mixtral-8x7b", "phi-3-mini", "gemma-2-2b",
                                  "qwen2.5-0.5b"])
@pytest.mark.parametrize("options", [
    {"method": "lora", "gradient_checkpointing": False, "attn": "eager"},
    {"method": "lora", "loop": "trainer-plain-outputs", "lora_dropout": 0.0},
    {"method": "qlora", "quant": "int8", "loop": "trainer-plain-outputs"},
    {"method": "qlora", "quant": "int8", "loop": "trainer-plain-outputs-del",
     "gradient_checkpointing": False},
    {"method": "full", "optimizer": "adamw_torch"},
    {"method": "full", "weights_dtype": "fp32", "optimizer": "adamw_8bit",
     "gradient_checkpointing": False},
    {"method": "qlora", "targets": "o_proj", "optimizer": "adamw_torch",
     "loop": "trainer-plain"},
    # the tutorial loop: use_cache's DynamicCache without checkpointing, the loss (and an
    # int8 graph) surviving into the next step, a directly built 8-bit optimizer
    {"method": "lora", "loop": "plain", "gradient_checkpointing": False},
    {"method": "full", "optimizer": "adamw_8bit", "loop": "plain",
     "gradient_checkpointing": False},
])
def test_every_loop_and_method_repeats_its_layers(name: str, options: dict[str, object]) -> None:
    _same_as_generated(depth_cut(get_spec(name), 8), TrainPlan(**SHORT, **options))


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_a_graph_kept_past_the_step_is_generated_whole(name: str) -> None:
    """The tutorial loop on an int8 base: the surviving loss keeps every layer's
    MatMul8bitLt ctx tensors into the next step, which frees them from a run of no layer
    (the backward's start), so the layers cannot be repeated from the cut: the program is
    generated whole, and is still the generated sequence."""
    _same_as_generated(depth_cut(get_spec(name), 8),
                       TrainPlan(**SHORT, method="qlora", quant="int8", loop="plain"),
                       templated=False)


def test_a_full_depth_model_repeats_its_layers() -> None:
    _same_as_generated(get_spec("llama-3.1-8b"), TrainPlan(batch_size=2, seq_len=1024))


def test_layers_that_differ_are_generated_whole() -> None:
    """gemma-2 past its sliding window: even layers get the window mask, odd ones not."""
    spec = depth_cut(get_spec("gemma-2-2b"), 8)
    _same_as_generated(spec, TrainPlan(batch_size=1, seq_len=4096), templated=False)


def test_a_cut_whose_middle_layers_differ_is_refused() -> None:
    """A middle layer that allocates other sizes than its neighbours: no template."""
    cut = step_requests(depth_cut(get_spec("llama-3.2-1b"), TEMPLATE_LAYERS),
                        TrainPlan(**SHORT))
    assert template_program(cut.requests, cut.phases, cut.runs, 16) is not None
    layer, start = next((layer, start) for layer, start in cut.runs if layer == 3)
    k = next(k for k in range(start, len(cut.requests)) if cut.requests[k][1] > 0)
    changed = list(cut.requests)
    changed[k] = (changed[k][0], changed[k][1] + 512)
    assert template_program(changed, cut.phases, cut.runs, 16) is None


def test_a_model_no_deeper_than_the_cut_is_generated_whole() -> None:
    _same_as_generated(depth_cut(get_spec("llama-3.2-1b"), TEMPLATE_LAYERS),
                       TrainPlan(**SHORT), templated=False)


def test_a_spec_the_cut_refuses_is_generated_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec whose cut does not validate (a config from the hub) still gets its program."""
    from vramcalc.errors import SpecError
    from vramcalc.memory.program import step as module

    def refuse(spec: ModelSpec, layers: int) -> ModelSpec:
        raise SpecError("no cut")

    monkeypatch.setattr(module, "depth_cut", refuse)
    _same_as_generated(depth_cut(get_spec("llama-3.2-1b"), 8), TrainPlan(**SHORT),
                       templated=False)


def _blocks(program: object) -> object:
    """A program's blocks, phases and length as plain lists (arrays compare by value)."""
    if program is None:
        return None
    return ([(list(ids), list(strides), list(sizes), count)
             for ids, strides, sizes, count in program.blocks],  # type: ignore[attr-defined]
            program.phases, program.length)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "mixtral-8x7b", "gemma-2-2b", "phi-2"])
@pytest.mark.parametrize("options", [{}, {"method": "qlora", "quant": "int8"},
                                     {"method": "full", "optimizer": "adamw_torch"}])
def test_a_shape_seen_before_gives_the_program_found_afresh(
        name: str, options: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """template_program keeps the shape of the cuts it has seen (step_templates._SHAPES):
    the cuts of one plan at other batch sizes and lengths, read through a kept shape, give
    the program found from nothing, and a cut whose middle layer allocates other sizes is
    still refused on a kept shape."""
    import vramcalc.memory.program.templates as st

    monkeypatch.setattr(st, "_SHAPES", {})
    spec = depth_cut(get_spec(name), TEMPLATE_LAYERS)
    reused = 0
    for batch, seq in [(1, 256), (2, 256), (3, 256), (1, 300), (5, 1000), (2, 256)]:
        cut = step_requests(spec, TrainPlan(batch_size=batch, seq_len=seq, **options))
        kept = dict(st._SHAPES)
        warm = template_program(cut.requests, cut.phases, cut.runs, 16)
        reused += len(st._SHAPES) == len(kept) and warm is not None and bool(kept)
        st._SHAPES.clear()
        fresh = template_program(cut.requests, cut.phases, cut.runs, 16)
        assert _blocks(warm) == _blocks(fresh), (batch, seq)
        st._SHAPES.clear()
        st._SHAPES.update(kept)
        template_program(cut.requests, cut.phases, cut.runs, 16)
        if fresh is not None:
            layer_start = next(start for layer, start in cut.runs if layer == 3)
            k = next(k for k in range(layer_start, len(cut.requests))
                     if cut.requests[k][1] > 0)
            changed = list(cut.requests)
            changed[k] = (changed[k][0], changed[k][1] + 512)
            assert template_program(changed, cut.phases, cut.runs, 16) is None
    assert reused >= 1  # the repeated (2, 256) at least


@pytest.mark.skipif(templates._OWNERS is None, reason="the compiled replay is not built")
@pytest.mark.parametrize("name", sorted(s.name for s in catalog()))
def test_the_compiled_pass_finds_the_tokens_the_python_one_does(name: str) -> None:
    """templates._tokens through the compiled replay's `owners` and through the Python
    loop: the same tokens and counts for each catalog architecture's cut (QLoRA, and a
    loop whose graph survives the step, which neither follows), and the same refusal of a
    request whose tensor no request before it allocated."""
    for options in ({}, {"method": "qlora", "quant": "int8", "loop": "plain"}):
        cut = step_requests(depth_cut(get_spec(name), TEMPLATE_LAYERS),
                            TrainPlan(**SHORT, **options))  # type: ignore[arg-type]
        bounds = [*cut.runs, (-2, len(cut.requests))]
        spans = [(layer, lo, hi) for (layer, lo), (_, hi) in itertools.pairwise(bounds)]
        sweep_of: list[tuple[int, int] | None] = []
        sweeps = 0
        for k, (layer, _, _) in enumerate(spans):
            if layer >= 0 and (k == 0 or spans[k - 1][0] < 0):
                sweeps += 1
            sweep_of.append(None if layer < 0 else (sweeps - 1, layer))
        n = TEMPLATE_LAYERS
        found = templates._tokens(cut.requests, spans, sweep_of, n)
        assert found == templates._tokens_python(cut.requests, spans, sweep_of, n)
        # (the int8 graph kept past the step is freed from a run of no layer: refused)
        assert (found is None) == ("loop" in options)
        k = next(k for k, (_, size) in enumerate(cut.requests) if size == 0)
        stray = list(cut.requests)
        stray[k] = (10**6, 0)  # a free of a tensor never allocated
        assert templates._tokens(stray, spans, sweep_of, n) is None
        assert templates._tokens_python(stray, spans, sweep_of, n) is None
