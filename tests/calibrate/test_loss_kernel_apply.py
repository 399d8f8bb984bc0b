"""Which loops the worker puts Liger on itself (calibrate/run.py apply_loss_kernel).

transformers 5.x applies `use_liger_kernel=True` in `Trainer.train()`, not in
`Trainer.__init__`, so a loop that only builds a Trainer (trainer-plain*) or none (plain)
must apply it itself: run 31's k-g-liger-gemma-2-2b (trainer-plain) measured the torch
loss's peak to the byte because it did not (calibration/h100/run31-loss1a.jsonl).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from vramcalc.calibrate.run import apply_loss_kernel
from vramcalc.plans import TrainPlan


@pytest.fixture
def liger_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model: calls.append(model)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    return calls


class _Peft:
    """A peft wrapper: the CausalLM is its base model."""

    def __init__(self, lm: object) -> None:
        self.lm = lm

    def get_base_model(self) -> object:
        return self.lm


@pytest.mark.parametrize("loop, applied", [
    ("trainer", False),  # Trainer.train applies it from TrainingArguments
    ("trainer-plain", True),
    ("trainer-plain-outputs", True),
    ("plain", True),
])
def test_liger_is_applied_by_every_loop_that_does_not_call_train(
        liger_calls: list[Any], loop: str, applied: bool) -> None:
    lm = object()
    apply_loss_kernel(_Peft(lm), TrainPlan(loss_kernel="liger", loop=loop))
    assert liger_calls == ([lm] if applied else [])


def test_the_torch_loss_is_left_alone(liger_calls: list[Any]) -> None:
    apply_loss_kernel(_Peft(object()), TrainPlan(loss_kernel="torch", loop="plain"))
    assert liger_calls == []


def test_trl_fused_runs_trls_own_head_in_the_trainer_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--loss-kernel trl-fused: the worker puts trl's add_fused_lm_head on the CausalLM
    and computes the loss as SFTTrainer.compute_loss does (fused_lm_head=True): trl's
    ChunkedLogProbFunction scores the step's rows (on CPU every shifted position: trl
    scores only the labelled ones on Triton devices)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(utils, "add_fused_lm_head"):
        pytest.skip("trl < 1.15 has no add_fused_lm_head")
    from vramcalc.calibrate.run import measure_point
    from vramcalc.models.spec import ModelSpec

    rows: list[tuple[int, ...]] = []
    inner = utils._ChunkedLogProbFunction.apply

    def spy(*a: Any, **k: Any) -> Any:
        rows.append(tuple(a[0].shape))
        return inner(*a, **k)

    monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", spy)
    spec = ModelSpec(name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
                     intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    plan = TrainPlan(method="lora", batch_size=2, seq_len=16, optimizer="adamw_torch",
                     loss_kernel="trl-fused")
    result = measure_point(spec, plan, None, steps=2, device="cpu")
    assert "error" not in result, result.get("error")
    assert rows == [(2 * 15, 128)] * 2  # one call per step, B x (S - 1) rows


def test_trl_chunked_runs_trls_own_patch_in_the_trainer_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--loss-kernel trl-chunked: the worker puts trl 1.4-1.14's _patch_chunked_ce_lm_head
    on the CausalLM (trl 1.14.0 sft_trainer.py SFTTrainer.__init__, loss_type
    "chunked_nll"); each step's B x (S - 1) = 598 labelled rows run as ceil(598 / 256) = 3
    checkpointed `_chunk` calls in forward and 3 again in backward's recomputation, last
    chunk first (autograd reaches the last chunk's loss add first). Skipped
    where trl is 1.15+ (the patch is gone): run with trl 1.14 first on PYTHONPATH."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    if not hasattr(sft, "_patch_chunked_ce_lm_head"):
        pytest.skip("trl >= 1.15 has no _patch_chunked_ce_lm_head")
    from vramcalc.calibrate.run import measure_point
    from vramcalc.models.spec import ModelSpec

    rows: list[int] = []
    inner = sft._chunk

    def spy(h: Any, *a: Any) -> Any:
        rows.append(int(h.shape[0]))
        return inner(h, *a)

    monkeypatch.setattr(sft, "_chunk", spy)
    spec = ModelSpec(name="tiny-llama", model_type="llama", vocab_size=512, hidden_size=128,
                     intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    plan = TrainPlan(method="lora", batch_size=2, seq_len=300, optimizer="adamw_torch",
                     loss_kernel="trl-chunked", gradient_checkpointing=True)
    result = measure_point(spec, plan, None, steps=2, device="cpu")
    assert "error" not in result, result.get("error")
    # per step: forward 256, 256, 86 (598 rows), then the three recomputed in reverse
    assert rows == [256, 256, 86, 86, 256, 256] * 2
