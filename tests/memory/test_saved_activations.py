"""What each decoder layer saves for backward, counted on real tiny models on CPU.

An independent check of `activations.layer_saved_bytes_per_token`: a tiny model of each
architecture is built from its config (random weights), prepared as each method prepares
it (4-bit + prepare_model_for_kbit_training + LoRA, 16-bit + LoRA, full in bf16 or in fp32
under bf16 autocast), and one forward runs under `torch.autograd.graph.saved_tensors_hooks`.
Every tensor autograd saves is recorded by its storage, and the storages first saved while
a decoder layer runs are that layer's activations. No formula from vramcalc is used to
count them. int8 (MatMul8bitLt) runs a different kernel on CPU and is checked on the GPU.
"""

from __future__ import annotations

from typing import Any

import pytest

from vramcalc.memory.program.activations import (
    FP32_UNDER_AUTOCAST,
    NORM_FP32_BYTES,
    eager_scores_bytes,
    layer_saved_bytes_per_token,
    mlp_bytes,
    pre_attention_saved_bytes_per_token,
)
from vramcalc.models.spec import ACTIVATION_SAVED_TENSORS, ModelSpec
from vramcalc.plans import TrainPlan

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

BATCH, SEQ = 2, 96

SPECS: dict[str, dict[str, Any]] = {
    "llama-gqa": dict(model_type="llama", vocab_size=512, hidden_size=128,
                      intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2),
    "llama-mha": dict(model_type="llama", vocab_size=512, hidden_size=128,
                      intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4),
    "qwen2-bias-tied": dict(model_type="qwen2", vocab_size=384, hidden_size=64,
                            intermediate_size=160, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True, qkv_bias=True),
    "qwen3-qknorm": dict(model_type="qwen3", vocab_size=384, hidden_size=64,
                         intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, qk_norm=True),
    "phi3-fused": dict(model_type="phi3", vocab_size=256, hidden_size=96,
                       intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, attention_layout="fused_qkv",
                       mlp_layout="fused_gated",
                       extra_config={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    # LayerNorm: CPU autocast keeps it in bf16 where CUDA's runs it in fp32, so phi-2's
    # norms are checked on the GPU; its gelu_new MLP and biases are checked here.
    "phi2-gelu-new": dict(model_type="phi", vocab_size=256, hidden_size=64,
                          intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=4, mlp_layout="plain", qkv_bias=True,
                          o_bias=True, mlp_bias=True, lm_head_bias=True, norm="layernorm",
                          norms_per_layer=1, module_names={"o": "dense"},
                          hidden_act="gelu_new",
                          extra_config={"hidden_act": "gelu_new",
                                        "partial_rotary_factor": 0.5}),
    "gemma2-4norms": dict(model_type="gemma2", vocab_size=256, hidden_size=64,
                          intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                          norms_per_layer=4, hidden_act="gelu_pytorch_tanh",
                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}

# On CPU, bitsandbytes 4-bit runs a dequantize + F.linear path and dropout keeps an
# input-dtype mask instead of CUDA's bool one, so those are checked on the GPU (H200 runs);
# 16-bit LoRA without dropout and full fine-tuning run the same autograd graph as CUDA.
PLANS: dict[str, dict[str, Any]] = {
    "lora-nodrop": dict(method="lora", lora_dropout=0.0),
    "full-bf16": dict(method="full"),
    "full-fp32": dict(method="full", weights_dtype="fp32"),
}


def _spec(key: str) -> ModelSpec:
    return ModelSpec(name=key, **SPECS[key])


def _model(spec: ModelSpec, plan: TrainPlan, tmp_path: Any) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vramcalc.calibrate.weights import save_random_weights

    save_random_weights(spec, str(tmp_path), device="cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[plan.load_dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": "cpu"},
                              "attn_implementation": plan.attn}
    if plan.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), **kwargs)
    if plan.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if plan.method != "full":
        model = get_peft_model(model, LoraConfig(
            r=plan.rank, lora_alpha=plan.alpha, lora_dropout=plan.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM"))
        if plan.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


def _saved_per_layer(model: Any, spec: ModelSpec, stop_at: str | None = None) -> list[int]:
    """Bytes of the storages first saved for backward inside each decoder layer (with
    `stop_at`: only before the layer first calls the module of that name)."""
    layers = [m for name, m in model.named_modules()
              if name.endswith(f"layers.{len(name.split('.')) and name.split('.')[-1]}")
              and name.split(".")[-2] == "layers"]
    assert len(layers) == spec.num_hidden_layers
    seen: set[int] = set()
    current: list[int | None] = [None]
    per_layer = [0] * len(layers)

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        shape = tuple(t.shape)  # activations have a token axis; weights and their casts not
        per_token = bool(shape) and (shape[0] == BATCH * SEQ or (
            len(shape) >= 2 and shape[0] == BATCH and SEQ in shape[1:3]))
        if key not in seen and current[0] is not None and storage.nbytes() > 0 and per_token:
            seen.add(key)
            per_layer[current[0]] += storage.nbytes()
        elif current[0] is None:
            seen.add(key)
        return t

    def enter(i: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any = None) -> None:
            current[0] = i
        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        current[0] = None

    def stop(module: Any, args: Any) -> None:
        current[0] = None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
        if stop_at is not None:
            target = next(m for n, m in layer.named_modules() if n.endswith(stop_at)
                          and n.split(".")[-1] == stop_at)
            handles.append(target.register_forward_pre_hook(stop))
    ids = torch.randint(3, spec.vocab_size, (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    for h in handles:
        h.remove()
    assert out.loss.requires_grad
    return per_layer


# Differences still unexplained on CPU, kept visible rather than tuned away:
# phi3 fused keeps one more h-wide LoRA-input copy than counted (+5 %); phi-2 full
# (LayerNorm weight gradients on CPU autocast) and gemma-2 (eager with softcapping on CPU)
# differ by 10-20 %. Their GPU points are in calibration/h200/ and bench/accuracy_h200.py.
KNOWN_GAPS = {("phi3-fused", "lora-nodrop"), ("phi3-fused", "full-bf16"),
              ("phi3-fused", "full-fp32"), ("phi2-gelu-new", "full-bf16"),
              ("phi2-gelu-new", "full-fp32"), ("gemma2-4norms", "lora-nodrop"),
              ("gemma2-4norms", "full-bf16"), ("gemma2-4norms", "full-fp32")}
CASES = [
    pytest.param(s, p, marks=pytest.mark.xfail(reason="known CPU gap, see KNOWN_GAPS"))
    if (s, p) in KNOWN_GAPS else (s, p)
    for s in SPECS for p in PLANS
]


@pytest.mark.parametrize(("spec_key", "plan_key"), CASES)
def test_layer_saved_bytes_match_autograd(spec_key: str, plan_key: str, tmp_path: Any) -> None:
    spec = _spec(spec_key)
    attn = "eager" if spec.model_type == "gemma2" else "sdpa"  # transformers 5: no sdpa
    plan = TrainPlan(batch_size=BATCH, seq_len=SEQ, rank=8, gradient_checkpointing=False,
                     attn=attn, **PLANS[plan_key])
    torch.manual_seed(0)
    model = _model(spec, plan, tmp_path)
    counted = _saved_per_layer(model, spec)
    # the middle layer: its input is the previous layer's output, saved by its first norm
    measured = counted[1] / (BATCH * SEQ)
    predicted = layer_saved_bytes_per_token(spec, plan) + eager_scores_bytes(spec, plan) / (
        BATCH * SEQ)
    if spec.norm == "layernorm":  # CPU autocast: LayerNorm keeps its bf16 input (see above)
        predicted -= spec.norms_per_layer * (NORM_FP32_BYTES - 2) * spec.hidden_size
    if spec.hidden_act in FP32_UNDER_AUTOCAST and mlp_bytes(plan) == 2:
        # CUDA autocast runs torch.pow in fp32, CPU autocast does not: on CPU gelu_new's
        # intermediates stay bf16 (the H200 phi-2 points check the CUDA form)
        per_act = ACTIVATION_SAVED_TENSORS[spec.hidden_act]
        predicted -= (4 - 2) * (per_act - 1) * spec.intermediate_size
    assert predicted == pytest.approx(measured, rel=0.03), (counted, predicted)


@pytest.mark.parametrize("plan_key", list(PLANS))
@pytest.mark.parametrize("spec_key", ["llama-gqa", "llama-mha", "qwen2-bias-tied",
                                      "qwen3-qknorm"])
def test_pre_attention_saved_bytes_match_autograd(spec_key: str, plan_key: str,
                                                  tmp_path: Any) -> None:
    """What a layer has saved by the time it calls o_proj: still alive while the attention
    core's backward runs (estimate.py's eager-attention backward moment). sdpa: CPU
    autocast keeps eager's probabilities in other dtypes than CUDA's, so the per-score
    terms are checked on the GPU (H200 run 12 snapshots)."""
    spec = _spec(spec_key)
    plan = TrainPlan(batch_size=BATCH, seq_len=SEQ, rank=8, gradient_checkpointing=False,
                     attn="sdpa", **PLANS[plan_key])
    torch.manual_seed(0)
    model = _model(spec, plan, tmp_path)
    counted = _saved_per_layer(model, spec, stop_at=spec.module_name("o"))
    measured = counted[1] / (BATCH * SEQ)
    predicted = pre_attention_saved_bytes_per_token(spec, plan) + eager_scores_bytes(
        spec, plan) / (BATCH * SEQ)
    assert predicted == pytest.approx(measured, rel=0.03), (counted, predicted)
