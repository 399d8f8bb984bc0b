"""The worker's `prep` "axolotl" / "llama-factory" (calibrate/run.py `_axolotl_prepare`,
`_llama_factory_prepare`) on CPU with real peft and bitsandbytes and tiny random models:
the trained state is the plan they map to (kbit_prep False, fp32 adapters: the estimator's
dtypes), each trainer's own calls ran (axolotl through peft's prepare_model_for_kbit_
training, LLaMA-Factory without it), checkpointing is set up as each sets it up, reentrant
or not, and the adapters of every layer get gradients through it. Points these preparations
do not apply to are refused."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest

from vramcalc.calibrate.run import TRAINER_PREPS, gc_reentrant_of, prep_error
from vramcalc.memory.program.activations import residual_bytes
from vramcalc.memory.program.trainable import trainable_tensors
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

TINY = ModelSpec(
    name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TINY_QWEN = ModelSpec(
    name="tiny-qwen2", model_type="qwen2", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    qkv_bias=True, tie_word_embeddings=True,
)
AXO = {"kbit_prep": False, "adapter_dtype": "fp32", "optimizer": "adamw_torch",
       "batch_size": 1, "seq_len": 16}


def _needs_stack() -> None:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")


def _prepared(spec: ModelSpec, plan: TrainPlan, prep: str, reentrant: bool,
              tmp_path: Path) -> Any:
    from vramcalc.calibrate.run import _load_model, _wrap_for_method
    from vramcalc.calibrate.weights import save_random_weights

    save_random_weights(spec, str(tmp_path), device="cpu")
    model = _load_model(spec, plan, str(tmp_path), False, False, prep)
    return _wrap_for_method(model, spec, plan, prep, reentrant)


def _forward_backward(model: Any, spec: ModelSpec) -> list[Any]:
    """One training forward and backward; the hidden-state dtypes each decoder layer got."""
    import torch

    seen: list[Any] = []
    layers = model.get_base_model().model.layers
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
        for layer in layers]
    model.train()
    ids = torch.randint(0, spec.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("prep", ["axolotl", "llama-factory"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_prepared_state_is_the_plans(prep: str, quant: str, reentrant: bool,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_stack()
    import peft
    import torch

    calls: list[dict[str, Any]] = []
    real = peft.prepare_model_for_kbit_training

    def spy(model: Any, **kw: Any) -> Any:
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    plan = TrainPlan(quant=quant, **AXO)
    assert prep_error(plan, prep, reentrant) is None
    model = _prepared(TINY, plan, prep, reentrant, tmp_path)
    # axolotl runs peft's kbit preparation (then casts back); LLaMA-Factory never does
    assert calls == ([{"use_gradient_checkpointing": True}] if prep == "axolotl" else [])
    frozen16 = {p.dtype for n, p in model.named_parameters()
                if p.__class__.__name__ not in ("Params4bit", "Int8Params") and "lora_" not in n}
    adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert frozen16 == {torch.bfloat16} and plan.param_dtype == "bf16"
    assert adapters == {torch.float32}
    assert {t.dtype_bytes for t in trainable_tensors(TINY, plan)} == {4}
    if quant == "nf4":  # both trainers store the packed weights in bf16
        assert {p.dtype for p in model.parameters()
                if p.__class__.__name__ == "Params4bit"} == {torch.bfloat16}
    # every decoder layer checkpointed as the trainer sets it up
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    func = layers[0]._gradient_checkpointing_func
    if prep == "axolotl":
        # peft's prepare_model_for_kbit_training enabled it last, with its own kwargs (none
        # in peft 0.21; peft 0.22 utils/other.py passes activation_checkpointing_kwargs=None
        # to transformers >= 5.23's activation_checkpointing_enable, whose default is
        # use_reentrant False); the Trainer enables it again with axolotl's (transformers
        # Trainer.train: activation_checkpointing_enable(args.gradient_checkpointing_kwargs))
        assert isinstance(func, partial) and func.keywords in ({}, {"use_reentrant": False})
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": reentrant})
        func = layers[0]._gradient_checkpointing_func
        assert isinstance(func, partial) and func.keywords == {"use_reentrant": reentrant}
    else:
        assert func.__name__ == "custom_gradient_checkpointing_func"
    assert model.get_base_model().config.use_cache is False or prep == "axolotl"
    seen = _forward_backward(model, TINY)
    # the residual stream the step program assumes without kbit preparation
    assert {torch.empty(0, dtype=d).element_size() for d in seen} == {residual_bytes(plan)}
    # every layer's adapters got a gradient (lora_B starts at zero: its gradient does not)
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.dtype == torch.float32 and bool(g.abs().sum())
                         for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert {n.split(".layers.")[1].split(".")[0] for n in grads} == {"0", "1"}


def test_axolotl_leaves_the_biases_fp32_until_the_first_forward(tmp_path: Path) -> None:
    """axolotl's second cast covers the norms and embeddings only: a quantized layer's
    bias stays fp32 after the preparation, and bitsandbytes casts it to its input's dtype in
    the first forward (bnb 0.50.2 nn/modules.py Linear4bit.forward)."""
    _needs_stack()
    import torch

    plan = TrainPlan(**AXO)
    model = _prepared(TINY_QWEN, plan, "axolotl", True, tmp_path)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    assert biases and {p.dtype for p in biases.values()} == {torch.float32}
    model.activation_checkpointing_enable(  # as the Trainer does (axolotl's kwargs)
        activation_checkpointing_kwargs={"use_reentrant": True})
    _forward_backward(model, TINY_QWEN)
    assert {p.dtype for p in biases.values()} == {torch.bfloat16}


def test_peft_recipe_unchanged_by_default(tmp_path: Path) -> None:
    """prep "peft" is the worker's recipe: uint8 packed weights, non-reentrant
    checkpointing installed by the Trainer (not by the preparation)."""
    _needs_stack()
    import torch

    plan = TrainPlan(**AXO)
    model = _prepared(TINY, plan, "peft", False, tmp_path)
    assert {p.dtype for p in model.parameters()
            if p.__class__.__name__ == "Params4bit"} == {torch.uint8}
    assert not any(layer.gradient_checkpointing
                   for layer in model.get_base_model().model.layers)


@pytest.mark.parametrize("prep,reentrant", [("axolotl", None), ("llama-factory", False)])
def test_measure_point_steps_with_prep(prep: str, reentrant: bool | None) -> None:
    """One Trainer step of each preparation through measure_point; what it used is in the
    result (the trainer's default use_reentrant when the job names none)."""
    _needs_stack()
    from vramcalc.calibrate.run import measure_point

    plan = TrainPlan(**AXO)
    r = measure_point(TINY, plan, None, steps=1, device="cpu", prep=prep,
                      gc_reentrant=reentrant)
    assert r["oom"] is False and "error" not in r, r.get("error")
    assert r["prep"] == prep
    assert r["gc_reentrant"] is (True if reentrant is None else reentrant)
    # bf16 norms / embeddings / lm_head, fp32 adapters (4 bytes each)
    st = r["static_after_peft"]
    assert st["lora"] == 4 * r["trainable_params"]
    assert st["unquantized"] == 2 * (2 * TINY.vocab_size * TINY.hidden_size
                                     + (2 * TINY.num_hidden_layers + 1) * TINY.hidden_size)


@pytest.mark.parametrize("fields,prep,reentrant,word", [
    ({}, "axolotl", None, "kbit_prep false"),  # a kbit-prepared plan
    ({"kbit_prep": False, "adapter_dtype": "bf16"}, "llama-factory", None, "adapter_dtype"),
    ({"method": "lora", "quant": "none"}, "axolotl", None, "method lora"),
    ({"kbit_prep": False, "loop": "plain"}, "axolotl", None, "loop trainer"),
    ({"kbit_prep": False, "loss_kernel": "liger"}, "llama-factory", None, "torch loss"),
    ({"kbit_prep": False, "gradient_checkpointing": False}, "axolotl", True,
     "needs gradient checkpointing"),
    ({}, "peft", True, "gc_reentrant is for"),
    ({}, "bogus", None, "prep must be one of"),
    ({}, "unsloth", None, "--trainer unsloth plan"),
])
def test_prep_refused_where_it_does_not_apply(fields: dict[str, Any], prep: str,
                                              reentrant: bool | None, word: str) -> None:
    plan = TrainPlan(**fields)
    why = prep_error(plan, prep, reentrant)
    assert why is not None and word in why


def test_refused_prep_is_a_result_before_any_load() -> None:
    """measure_point answers cannot_start without loading (weights_dir names no folder)."""
    pytest.importorskip("torch")
    from vramcalc.calibrate.run import measure_point

    r = measure_point(TINY, TrainPlan(), "/nonexistent", steps=1, device="cpu",
                      prep="axolotl")
    assert r["cannot_start"] is True and "kbit_prep false" in r["error"]
    assert "static_after_load" not in r


def test_trainer_defaults_checkpoint_reentrant() -> None:
    assert set(TRAINER_PREPS) == {"peft", "axolotl", "llama-factory", "unsloth"}
    assert [gc_reentrant_of(p, None) for p in TRAINER_PREPS] == [False, True, True, False]
    assert gc_reentrant_of("axolotl", False) is False


def test_matrix_carries_prep_to_the_worker_and_the_record(tmp_path: Path) -> None:
    """A matrix point's prep / gc_reentrant reach the worker's job and its result line; a
    point they do not apply to is a bad point (recorded, not run)."""
    from vramcalc.calibrate.matrix import _job_for, _record, load_points

    good, bad = load_points([
        {"id": "a", "spec": "llama-3.2-1b", "prep": "axolotl", "gc_reentrant": False,
         "plan": {"kbit_prep": False, "batch_size": 1, "seq_len": 64}},
        {"id": "b", "spec": "llama-3.2-1b", "prep": "axolotl", "plan": {"batch_size": 1}},
    ])
    assert good.error is None and bad.error is not None and "kbit_prep false" in bad.error
    good.weights_dir = str(tmp_path)
    job = _job_for(good, "cpu")
    assert (job["prep"], job["gc_reentrant"]) == ("axolotl", False)
    rec = _record(good, "ok", {}, 1.0)
    assert (rec["prep"], rec["gc_reentrant"]) == ("axolotl", False)
    plain = load_points([{"id": "c", "spec": "llama-3.2-1b", "plan": {"batch_size": 1}}])[0]
    assert _job_for(plain, "cpu")["prep"] == "peft" and "prep" not in _record(
        plain, "ok", {}, 1.0)
