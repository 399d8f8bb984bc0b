"""A traced step program (vramcalc.memory.program.symbolic) is the generated one, byte for
byte, wherever its trace holds; the step cache answers what the generator answers."""

from __future__ import annotations

import math
from typing import Any

import pytest

from vramcalc.memory.estimate import estimate
from vramcalc.memory.program import step
from vramcalc.memory.program.step import StepRequests, step_requests
from vramcalc.memory.program.symbolic import StepCache, Sym, Trace, Untraceable, trace
from vramcalc.models.spec import depth_cut, get_spec
from vramcalc.plans import TrainPlan

# (model, plan fields): the methods, the loss kernels, layouts, offloading, attention and
# loops whose sizes the generator computes otherwise
CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama-3.1-8b", {"method": "qlora"}),
    ("llama-3.1-8b", {"method": "lora", "quant": "none"}),
    ("llama-3.1-8b", {"method": "full", "quant": "none", "optimizer": "adamw_torch_fused"}),
    ("qwen2.5-7b", {"method": "lora", "quant": "none", "gradient_checkpointing": False}),
    ("gemma-2-9b", {"method": "qlora", "attn": "eager"}),
    ("gemma-2-2b", {"method": "lora", "quant": "none", "loss_kernel": "liger"}),
    ("mistral-7b", {"method": "qlora", "loss_kernel": "cce"}),
    ("qwen3-1.7b", {"method": "lora", "quant": "none", "loss_kernel": "chunked"}),
    ("llama-3.2-1b", {"method": "full", "quant": "none", "optimizer": "adamw_torch_fused",
                      "loss_kernel": "trl-chunked"}),
    ("qwen2.5-0.5b", {"method": "qlora", "loss_kernel": "trl-fused"}),
    ("llama-3.2-1b", {"method": "qlora", "layout": "packed"}),
    ("llama-3.2-3b", {"method": "lora", "quant": "none", "offload_activations": "all"}),
    ("llama-3.2-3b", {"method": "qlora", "offload_activations": "checkpoints"}),
    ("mixtral-8x7b", {"method": "qlora"}),
    ("phi-2", {"method": "lora", "quant": "none", "loop": "plain"}),
    ("tinyllama-1.1b", {"method": "lora", "quant": "none", "compute_dtype": "fp16"}),
]
VALUES = {"batch_size": [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 32, 33, 64],
          "seq_len": [64, 100, 511, 512, 513, 1000, 2047, 2048, 2049, 4096, 8191, 8192]}
X0 = {"batch_size": 8, "seq_len": 1000}


def _as_ints(gen: StepRequests) -> tuple[Any, ...]:
    return gen.requests, gen.phases, gen.runs, gen.host_peak, gen.steps


@pytest.mark.parametrize("field", ["batch_size", "seq_len"])
@pytest.mark.parametrize(("name", "fields"), CASES)
def test_a_trace_reads_as_the_generator_where_it_holds(name: str, fields: dict[str, Any],
                                                       field: str) -> None:
    cut = depth_cut(get_spec(name), 6)
    plan = TrainPlan(**fields).model_copy(update={field: X0[field]})

    def generate(p: TrainPlan) -> StepRequests:
        return step_requests(cut, p, 3)

    traced = trace(generate, plan, field)
    if traced is None:  # a field the generator reads past a trace: nothing to compare
        pytest.skip("not traced")
    assert traced.trace.holds(X0[field])
    held = 0
    for x in VALUES[field]:
        p = plan.model_copy(update={field: x})
        if not traced.trace.holds(x):
            continue
        held += 1
        got = StepRequests(list(zip(traced.ids, traced.sizes(x), strict=True)),
                           **traced.fixed,
                           host_peak=sum(c * x**k for k, c in
                                         enumerate(traced.sym_fields["host_peak"])))
        assert _as_ints(got) == _as_ints(generate(p)), (name, field, x)
    assert held >= 1


def test_the_traced_plans_are_most_of_them() -> None:
    """The trace is not vacuous: it follows the common plans, and holds past its own
    value. Not followed: int8's outlier fraction (a float of the tokens), liger's chunk of
    rows and TRL's chunks (floor divisions of the tokens); cce and mixtral at batch 8 are
    traced but hold at 8 only (2026-12-07: 11 of the 15 hold at 9 and 16)."""
    reads = 0
    for name, fields in CASES:
        cut = depth_cut(get_spec(name), 6)
        plan = TrainPlan(**fields).model_copy(update={"batch_size": 8})
        t = trace(lambda p, c=cut: step_requests(c, p, 3), plan, "batch_size")
        reads += t is not None and t.trace.holds(9) and t.trace.holds(16)
    assert reads >= 11
    int8 = TrainPlan(method="qlora", quant="int8")
    cut = depth_cut(get_spec("llama-3.1-8b"), 6)
    assert trace(lambda p: step_requests(cut, p, 3), int8, "batch_size") is None


def test_a_sym_answers_decisions_at_its_value_and_keeps_them() -> None:
    t = Trace(8)
    x = Sym((0, 1), t)
    size = x * 16384
    assert isinstance(size, Sym) and size.poly == (0, 16384)
    assert size >= 65536 and not size < 65536
    assert (size - 2 * size + size) == 0  # the polynomial 0: a number
    assert (size * 3) // 3 is not None and ((size * 3) // size) == 3
    assert t.holds(5) and t.holds(1000) and not t.holds(4)  # 4 * 16384 == 65536
    for refuse in (int, float, hash, str, math.floor, lambda v: v % 3, lambda v: v // 3 + 0,
                   lambda v: v / 2, lambda v: v * 0.5, lambda v: range(v), lambda v: {v}):
        with pytest.raises((Untraceable, TypeError)):
            refuse(x + 1)


@pytest.mark.replay
def test_the_step_cache_answers_what_the_generator_does(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """A sweep of batch sizes and one of lengths through a cache that traces at once: every
    estimate is the one made without the cache."""
    spec = get_spec("llama-3.1-8b")
    plans = ([TrainPlan(method="lora", quant="none", batch_size=b) for b in (1, 2, 3, 6, 5, 4,
                                                                             9, 30, 31)]
             + [TrainPlan(seq_len=s) for s in (512, 700, 4000, 4001, 3000, 9000)])
    cache = StepCache(trace_after=1)
    monkeypatch.setattr(step, "STEP_CACHE", cache)
    cached = [estimate(spec, p) for p in plans]
    assert cache.counts["read"] >= 5 and cache.counts["traced"] >= 2, cache.counts

    class Off(StepCache):
        def get(self, owner: object, key: tuple[object, ...], plan: Any, generate: Any,
                build: Any) -> Any:
            return generate(plan)

    monkeypatch.setattr(step, "STEP_CACHE", Off())
    assert [estimate(spec, p) for p in plans] == cached
