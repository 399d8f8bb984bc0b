"""The searches and suggestions read the raw estimate's required bytes without the allocator
replay (sizing.search.raw_probes: estimate.required_bytes): on random plans, check's
suggestions, `plan --max`'s searches, compare's smallest GPU and the larger-GPU answer are
the same with the shortcut and without it (the same estimate behind a function the
shortcut does not recognize), and with it no replay runs for them."""

from __future__ import annotations

import random
from typing import Any

import pytest

from vramcalc.corrections.planning import Memoized, is_raw, memoized
from vramcalc.hardware.catalog import catalog as gpu_catalog
from vramcalc.memory import estimate as estimate_module
from vramcalc.memory.estimate import Estimate, estimate
from vramcalc.models.spec import ModelSpec, depth_cut, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing import advice
from vramcalc.sizing.comparison import method_plan, smallest_gpu
from vramcalc.sizing.search import largest_fitting, raw_probes
from vramcalc.units import GiB

pytestmark = pytest.mark.replay  # the replayed numbers: the shortcut must give them

# models of each kind of block, cut to 6 layers (the step program's template still applies)
MODELS = ("qwen2.5-0.5b", "llama-3.1-8b", "gemma-2-2b", "phi-3-mini")


def opaque(spec: ModelSpec, plan: TrainPlan) -> Estimate:
    """The raw estimate behind a function the shortcut does not recognize (is_raw False):
    every probe is the full estimate, as before the shortcut."""
    return estimate(spec, plan)


def _random_case(rng: random.Random) -> tuple[ModelSpec, TrainPlan]:
    spec = depth_cut(get_spec(rng.choice(MODELS)), 6)
    plan = method_plan(TrainPlan(), rng.choice(("qlora", "lora", "full", "int8")))
    changes: dict[str, Any] = {
        "batch_size": rng.choice((1, 2, 3, 8, 16)),
        "seq_len": rng.choice((256, 1000, 2048, 4096)),
        "gradient_checkpointing": rng.random() < 0.5,
        "attn": rng.choice(("sdpa", "eager")),
        "expandable_segments": rng.random() < 0.3,
    }
    if plan.method != "full":
        changes["rank"] = rng.choice((8, 16, 64, 128))
    return spec, plan.model_copy(update=changes)


def _dumps(found: list[advice.Suggestion]) -> list[dict[str, Any]]:
    return [s.model_dump() for s in found]


def test_is_raw() -> None:
    assert is_raw(estimate) and is_raw(memoized(estimate))
    assert not is_raw(opaque) and not is_raw(memoized(opaque))
    assert raw_probes(opaque) is None
    m = memoized(estimate)
    assert raw_probes(m) is raw_probes(m)  # one memo for the command's searches


@pytest.mark.parametrize("seed", range(6))
def test_suggestions_and_searches_the_same_without_the_replay(seed: int) -> None:
    rng = random.Random(seed)
    spec, plan = _random_case(rng)
    need = estimate(spec, plan).required_device_bytes
    margin = rng.choice((0, GiB // 2))
    # a card that the plan does not fit (suggestions), and one it fits (tight or not)
    for memory in (int(need * rng.uniform(0.3, 0.9)), int(need * rng.uniform(1.0, 1.3))):
        want = _dumps(advice.suggest(spec, plan, memory, margin, opaque))
        assert _dumps(advice.suggest(spec, plan, memory, margin, memoized(estimate))) == want
        assert _dumps(advice.suggest(spec, plan, memory, margin, estimate)) == want
        for what in ("batch", "seq-len"):
            full = largest_fitting(spec, plan, what, memory, margin, estimate_fn=opaque)
            assert largest_fitting(spec, plan, what, memory, margin) == full, what
        a = advice.allocator_suggestion(spec, plan, memory, margin, opaque)
        b = advice.allocator_suggestion(spec, plan, memory, margin, memoized(estimate))
        assert (a is None and b is None) or (a is not None and b is not None
                                             and a.model_dump() == b.model_dump())


@pytest.mark.parametrize("seed", range(3))
def test_smallest_gpus_the_same_without_the_replay(seed: int) -> None:
    rng = random.Random(100 + seed)
    spec, plan = _random_case(rng)
    gpus = gpu_catalog()
    margin = GiB // 2
    assert (smallest_gpu(spec, plan, margin, gpus, lambda _g: memoized(estimate))
            == smallest_gpu(spec, plan, margin, gpus, lambda _g: opaque))
    raw = advice.smallest_fitting_gpu(spec, plan, margin, gpus)
    full = advice.smallest_fitting_gpu(spec, plan, margin, gpus, lambda _g: opaque)
    assert (raw is None) == (full is None)
    if raw is not None and full is not None:
        assert raw.gpu.name == full.gpu.name
        assert ((raw.suggestion is None and full.suggestion is None)
                or (raw.suggestion is not None and full.suggestion is not None
                    and raw.suggestion.model_dump() == full.suggestion.model_dump()))


def test_no_replay_for_the_raw_estimates_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the raw estimate, check's suggestions (offloading's host bytes included) and
    the searches replay nothing; through `opaque` they replay every probe."""
    replays = 0
    real = estimate_module.program_peaks

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal replays
        replays += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(estimate_module, "program_peaks", counted)
    spec = depth_cut(get_spec("llama-3.1-8b"), 6)
    plan = method_plan(TrainPlan(), "lora").model_copy(
        update={"batch_size": 16, "seq_len": 4096, "gradient_checkpointing": False})
    memory = estimate(spec, plan, replay=False).required_device_bytes // 2
    replays = 0
    fn = memoized(estimate)
    assert isinstance(fn, Memoized)
    found = advice.suggest(spec, plan, memory, GiB // 2, fn)
    assert found and replays == 0
    assert advice.suggest(spec, plan, memory, GiB // 2, opaque) == found
    assert replays > 0
