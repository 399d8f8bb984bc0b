"""TrainPlan.kbit_prep / adapter_dtype on CPU with real peft and bitsandbytes: the worker's
preparation (calibrate/run.py `_wrap_for_method`, TRL SFTTrainer's order when kbit_prep is
off) leaves the parameter and residual-stream dtypes the step program assumes
(TrainPlan.param_dtype, activations.residual_bytes, trainable.trainable_tensors), and a
step runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vramcalc.memory.program.activations import residual_bytes
from vramcalc.memory.program.trainable import trainable_tensors
from vramcalc.memory.program.weights import DTYPE_BYTES
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

TINY = ModelSpec(
    name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TRL = {"kbit_prep": False, "adapter_dtype": "bf16"}


def _prepared(plan: TrainPlan, tmp_path: Path) -> Any:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramcalc.calibrate.run import _load_model, _wrap_for_method
    from vramcalc.calibrate.weights import save_random_weights

    save_random_weights(TINY, str(tmp_path), device="cpu")
    model = _load_model(TINY, plan, str(tmp_path), False, False)
    return _wrap_for_method(model, TINY, plan)


PLANS = [
    pytest.param({}, id="qlora-kbit-prep"),
    pytest.param(TRL, id="qlora-trl"),
    pytest.param({"quant": "int8", **TRL}, id="int8-trl"),
    pytest.param({"kbit_prep": False}, id="qlora-no-prep-fp32-adapters"),
    pytest.param({"method": "lora", "adapter_dtype": "bf16"}, id="lora-bf16-adapters"),
]


@pytest.mark.parametrize("fields", PLANS)
def test_prepared_dtypes_are_the_step_programs(fields: dict[str, Any], tmp_path: Path) -> None:
    import torch

    plan = TrainPlan(batch_size=1, seq_len=16, optimizer="adamw_torch", **fields)
    model = _prepared(plan, tmp_path)
    by_name = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    frozen16 = [(n, p.dtype) for n, p in model.named_parameters()
                if p.__class__.__name__ not in ("Params4bit", "Int8Params")
                and "lora_" not in n]
    adapters = [(n, p.dtype) for n, p in model.named_parameters() if "lora_" in n]
    assert frozen16 and adapters
    # the embeddings, norms, lm_head (and a LoRA plan's whole base) in TrainPlan.param_dtype
    assert {d for _, d in frozen16} == {by_name[plan.param_dtype]}, frozen16
    assert {d for _, d in adapters} == {by_name[plan.adapter_dtype]}, adapters
    # the trainable tensors the optimizer and the step program size
    assert {t.dtype_bytes for t in trainable_tensors(TINY, plan)} == {
        torch.empty(0, dtype=by_name[plan.adapter_dtype]).element_size()}
    # the residual stream: the hidden states a decoder layer receives
    seen: list[Any] = []
    layer = model.get_base_model().model.layers[1]
    hook = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    model.train()
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    out = model(input_ids=ids, labels=ids)
    hook.remove()
    assert torch.empty(0, dtype=seen[0]).element_size() == residual_bytes(plan)
    # the adapters get their gradients (in their own dtype)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.dtype == by_name[plan.adapter_dtype]
                         for g in grads)


def test_trl_plan_steps_on_cpu() -> None:
    """One step of the TRL-prepared QLoRA through measure_point: the adapters' bytes, and
    torch AdamW's states in the adapters' bf16 (zeros_like(param))."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramcalc.calibrate.run import measure_point

    plan = TrainPlan(batch_size=1, seq_len=16, optimizer="adamw_torch", **TRL)
    r = measure_point(TINY, plan, None, steps=1, device="cpu")
    assert r["oom"] is False and "error" not in r, r.get("error")
    st = r["static_after_peft"]
    assert st["lora"] == r["trainable_params"] * DTYPE_BYTES["bf16"]
    assert r["optimizer_state_bytes"]["device"] == 2 * st["lora"]


def test_no_kbit_prep_halves_the_unquantized_params_and_the_residual_stream() -> None:
    """The estimate side of the same decision (no torch): bf16 norms / embeddings / lm_head
    and a bf16 residual stream without kbit preparation; the default keeps fp32."""
    from vramcalc.memory.program.weights import weight_bytes

    spec = TINY
    prep = TrainPlan()
    trl = TrainPlan(**TRL)
    assert (prep.param_dtype, trl.param_dtype) == ("fp32", "bf16")
    assert (residual_bytes(prep), residual_bytes(trl)) == (4, 2)
    wp, wt = weight_bytes(spec, prep), weight_bytes(spec, trl)
    assert wt.base_weights == wp.base_weights
    assert wp.unquantized_params > wt.unquantized_params >= wp.unquantized_params // 2


@pytest.mark.parametrize("fields,word", [
    ({"method": "lora", "kbit_prep": False}, "kbit_prep"),
    ({"method": "full", "adapter_dtype": "bf16"}, "adapter_dtype"),
    ({"use_dora": True, "adapter_dtype": "bf16"}, "DoRA"),
])
def test_plan_refuses_what_does_not_apply(fields: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        TrainPlan(**fields)
