"""Static components, byte for byte, against real bitsandbytes + peft tensors on CPU.

Tiny models are built from configs (random weights, nothing downloaded), loaded in 4-bit
by `from_pretrained` as the canonical recipe does, prepared and wrapped with LoRA; every
tensor's size is rounded as torch's caching allocator rounds it and summed per component.
"""

from __future__ import annotations

import pytest

from vramcalc.memory.program.optimizer import optimizer_bytes
from vramcalc.memory.program.trainable import lora_param_bytes
from vramcalc.memory.program.weights import rounded, weight_bytes
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TINY_LLAMA = dict(
    name="tiny-llama", model_type="llama", vocab_size=320, hidden_size=128,
    intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TINY_QWEN_TIED = dict(
    name="tiny-qwen", model_type="qwen2", vocab_size=384, hidden_size=64,
    intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=True, qkv_bias=True,
)
TINY_PHI3_FUSED = dict(
    name="tiny-phi3", model_type="phi3", vocab_size=256, hidden_size=96,
    intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    attention_layout="fused_qkv", mlp_layout="fused_gated",
    extra_config={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
)


def _load(spec: ModelSpec, plan: TrainPlan, tmp_path) -> object:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vramcalc.calibrate.weights import save_random_weights

    save_random_weights(spec, str(tmp_path), device="cpu")
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), quantization_config=qc, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    model = prepare_model_for_kbit_training(model)
    targets = "all-linear" if plan.targets == "all-linear" else plan.target_list()
    config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, target_modules=targets,
                        use_dora=plan.use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _measured(model) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Allocated bytes by component, each distinct storage counted once, rounded to 512."""
    seen: set[int] = set()
    out = {"base_weights": 0, "quant_constants": 0, "unquantized_params": 0, "lora": 0}

    def add(key: str, t) -> None:  # type: ignore[no-untyped-def]
        if t is None or not hasattr(t, "untyped_storage"):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[key] += rounded(t.untyped_storage().nbytes())

    for name, p in model.named_parameters():
        if "lora_" in name:
            add("lora", p)
        elif p.__class__.__name__ == "Params4bit":
            add("base_weights", p)
            qs = p.quant_state
            for t in (qs.absmax, qs.code, qs.offset):
                add("quant_constants", t)
            if qs.state2 is not None:
                add("quant_constants", qs.state2.absmax)
                add("quant_constants", qs.state2.code)
        else:
            add("unquantized_params", p)
    return out


CASES = [
    (TINY_LLAMA, TrainPlan(rank=8)),
    (TINY_LLAMA, TrainPlan(rank=16, double_quant=False)),
    (TINY_LLAMA, TrainPlan(rank=4, quant="fp4", targets="q_proj,v_proj")),
    (TINY_LLAMA, TrainPlan(rank=8, use_dora=True, targets="q_proj,k_proj,down_proj")),
    (TINY_QWEN_TIED, TrainPlan(rank=8)),
    (TINY_PHI3_FUSED, TrainPlan(rank=8)),
    (TINY_PHI3_FUSED, TrainPlan(rank=32, targets="qkv_proj,gate_up_proj")),
]


@pytest.mark.parametrize(("spec_kwargs", "plan"), CASES)
def test_static_bytes_match_real_tensors(spec_kwargs, plan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec(**spec_kwargs)
    model = _load(spec, plan, tmp_path)
    measured = _measured(model)
    est = weight_bytes(spec, plan)
    assert est.base_weights == measured["base_weights"]
    assert est.quant_constants == measured["quant_constants"]
    assert est.unquantized_params == measured["unquantized_params"]
    assert lora_param_bytes(spec, plan) == measured["lora"]


def test_adamw_torch_states_match_a_real_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec(**TINY_LLAMA)
    plan = TrainPlan(rank=8, optimizer="adamw_torch")
    model = _load(spec, plan, tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, spec.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = sum(
        rounded(v.numel() * v.element_size())
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    assert optimizer_bytes(spec, plan).device == state
    grads = sum(rounded(p.grad.numel() * p.grad.element_size()) for p in params)
    assert grads == lora_param_bytes(spec, plan)


TINY_FALCON = dict(
    name="tiny-falcon", model_type="falcon", vocab_size=256, hidden_size=64,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
    tie_word_embeddings=True, attention_layout="fused_qkv", mlp_layout="plain",
    norm="layernorm", norms_per_layer=1, hidden_act="gelu", bnb_quantizes_linears=False,
    module_names={"qkv": "query_key_value", "o": "dense", "fc1": "dense_h_to_4h",
                  "fc2": "dense_4h_to_h"},
    extra_config={"multi_query": True, "parallel_attn": True,
                  "new_decoder_architecture": False, "bias": False, "alibi": False},
)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_falcon_linears_stay_unquantized_and_become_fp32(quant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The spec's `bnb_quantizes_linears: false` is what the stack does: transformers 5's
    bitsandbytes integration skips FalconLinear (an nn.Linear subclass), so a 4-bit load
    holds no Params4bit, and prepare_model_for_kbit_training casts every weight to fp32 --
    the bytes of the plan `effective_train_plan` makes of it (LoRA on an fp32 base)."""
    from vramcalc.memory.effective import effective_train_plan

    spec = ModelSpec(**TINY_FALCON)
    plan = TrainPlan(rank=8, quant=quant, attn="eager")
    measured = _measured(_load(spec, plan, tmp_path))
    assert measured["base_weights"] == 0 and measured["quant_constants"] == 0
    ran, planned_as, notes = effective_train_plan(spec, plan)
    assert planned_as == {"method": "lora", "quant": "none", "weights_dtype": "fp32"}
    assert notes and "does not quantize" in notes[0]
    est = weight_bytes(spec, ran)
    assert est.base_weights + est.unquantized_params == measured["unquantized_params"]
    assert lora_param_bytes(spec, ran) == measured["lora"]
