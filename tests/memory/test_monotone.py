"""Required free memory never falls when the work grows (issue 27): a property test over
seeded random plans, each grown by one and doubled in batch, sequence length and rank.
Required free memory decides fit (`check`, `--max`, the suggestions), so a fall would let a
search jump over a plan that does not fit. Peak reserved may fall (the caching allocator's
placement depends on the sizes) and is not asserted here."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from vramcalc.errors import VramcalcError
from vramcalc.memory.estimate import Estimate, estimate
from vramcalc.models.spec import ModelSpec, catalog, depth_cut
from vramcalc.plans import LOOPS, TrainPlan

GROWTHS: list[tuple[str, Callable[[int], int]]] = [
    ("batch_size", lambda v: v + 1), ("seq_len", lambda v: v + 1), ("rank", lambda v: v + 1),
    ("batch_size", lambda v: 2 * v), ("seq_len", lambda v: 2 * v), ("rank", lambda v: 2 * v),
]


def _plans(seed: int, n: int) -> list[tuple[ModelSpec, dict[str, Any]]]:
    rng = random.Random(seed)
    specs = sorted((s for s in catalog() if s.num_params() < 80e9), key=lambda s: s.name)
    out = []
    for _ in range(n):
        spec = rng.choice(specs)
        if spec.num_hidden_layers > 2:
            spec = depth_cut(spec, rng.choice([2, 4]))
        method = rng.choice(["qlora", "lora", "full"])
        kw: dict[str, Any] = dict(
            method=method, batch_size=rng.choice([1, 2, 3]),
            seq_len=rng.choice([256, 512, 1000, 2048]), rank=rng.choice([8, 16, 64]),
            gradient_checkpointing=rng.random() < 0.5, loop=rng.choice(LOOPS),
            attn=rng.choice(["sdpa", "sdpa", "eager"]),
            optimizer=rng.choice(["adamw_torch", "paged_adamw_8bit", "adamw_8bit"]),
            lora_dropout=0.0 if spec.is_moe else 0.05,
            expandable_segments=rng.random() < 0.2)
        if method == "qlora":
            kw["quant"] = rng.choice(["nf4", "nf4", "int8"])
        out.append((spec, kw))
    return out


def _estimate(spec: ModelSpec, kw: dict[str, Any], replay: bool) -> Estimate | None:
    try:
        return estimate(spec, TrainPlan(**kw), replay=replay)
    except VramcalcError:  # e.g. LoRA that cannot start on this model
        return None


@pytest.mark.parametrize("replay", [pytest.param(True, marks=pytest.mark.replay, id="program"),
                                    pytest.param(False, id="required-only")])
def test_required_memory_never_falls_when_the_work_grows(replay: bool) -> None:
    falls = []
    checked = 0
    for spec, kw in _plans(seed=27, n=100):
        base = _estimate(spec, kw, replay)
        if base is None:
            continue
        for name, grow in GROWTHS:
            if name == "rank" and kw["method"] == "full":
                continue
            grown = {**kw, name: grow(kw[name])}
            e = _estimate(spec, grown, replay)
            if e is None:
                continue
            checked += 1
            for attr in ("required_device_bytes", "required_low"):
                if getattr(e, attr) < getattr(base, attr):
                    falls.append(f"{spec.name} {kw} {name}->{grown[name]}: {attr} "
                                 f"{getattr(base, attr)} -> {getattr(e, attr)}")
    assert checked > 400
    assert not falls, "\n".join(falls)
