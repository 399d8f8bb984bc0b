"""Trainable parameters: which tensors train, in which dtype, and their gradients.

LoRA / QLoRA: the adapters peft adds (tuners/lora/layer.py `update_layer`: A is r x in,
B is out x r, DoRA adds a magnitude of out), kept in fp32 (`autocast_adapter_dtype=True`
upcasts 16-bit adapters). MoE experts stored as 3-D tensors (transformers 5) are wrapped by
`ParamWrapper` when targeted: A is (r * experts) x in, B is out x (r * experts), in the
expert tensor's dtype and then upcast to fp32 (rank 2r on the fused gate_up_proj, plus the
router); peft 0.21 refuses `lora_dropout != 0` there.
Full fine-tuning: every parameter of the model, in the dtype it was loaded in.
"""

from __future__ import annotations

from typing import NamedTuple

from vramcalc.errors import PlanError
from vramcalc.memory.program.weights import DTYPE_BYTES, fused_experts, rounded
from vramcalc.models.spec import LinearShape, ModelSpec
from vramcalc.plans import TrainPlan

LORA_DTYPE_BYTES = 4  # peft autocast_adapter_dtype=True: adapters in fp32 (TrainPlan.adapter_dtype)


class TrainableTensor(NamedTuple):
    """`copies` tensors of `numel` elements of `dtype_bytes` each (one allocation each)."""

    numel: int
    dtype_bytes: int
    copies: int
    embedding: bool = False  # an nn.Embedding weight (8-bit optimizers keep it 32-bit)

    @property
    def allocated(self) -> int:
        return self.copies * rounded(self.numel * self.dtype_bytes)


# ---- LoRA ---------------------------------------------------------------------------------


def lora_targets(spec: ModelSpec, plan: TrainPlan) -> list[LinearShape]:
    """The block Linears LoRA wraps. 'all-linear' is every Linear in the blocks, never
    lm_head (peft utils/other.py _maybe_include_all_linear_layers)."""
    if not plan.is_lora:
        return []
    linears = spec.block_linears()
    if plan.targets == "all-linear":
        return linears
    names = {lin.name for lin in linears}
    wanted = plan.target_list()
    unknown = [w for w in wanted if w not in names | set(_expert_target_names(spec))]
    if unknown:
        valid = sorted(names | set(_expert_target_names(spec)))
        raise PlanError(
            f"unknown target module {', '.join(repr(u) for u in unknown)} for "
            f"{spec.name}; valid: all-linear or a comma list of {', '.join(valid)}"
        )
    return [lin for lin in linears if lin.name in wanted]


def _expert_target_names(spec: ModelSpec) -> list[str]:
    return ["experts"] if spec.is_moe else []


# MoE model types whose v4 expert projections peft 0.21 maps onto the fused v5 expert
# tensors (`_convert_peft_config_moe` in peft utils/transformers_weight_conversion.py, via
# transformers' `_MODEL_TO_CONVERSION_PATTERN`: mixtral -> mixtral, qwen3_moe ->
# qwen2_moe). qwen2_moe itself has no entry there, so all-linear leaves its experts alone
# (H200 trace snap-qwen2moe-nockpt: no expert adapters, no fold copy).
EXPERT_LORA_MODEL_TYPES = frozenset({"mixtral", "qwen3_moe"})


def lora_on_experts(spec: ModelSpec, plan: TrainPlan) -> bool:
    """Whether LoRA wraps the 3-D expert tensors (peft ParamWrapper): with all-linear or
    'experts' among the targets, on a transformers-5 MoE whose experts stay unquantized
    and whose model type peft converts (EXPERT_LORA_MODEL_TYPES)."""
    if not (plan.is_lora and fused_experts(spec, plan)):
        return False
    if spec.model_type not in EXPERT_LORA_MODEL_TYPES:
        return False
    return plan.targets == "all-linear" or "experts" in plan.target_list()


def check_lora_can_start(spec: ModelSpec, plan: TrainPlan) -> None:
    """peft 0.21 ParamWrapper raises for lora_dropout != 0 and DoRA (tuners/lora/layer.py)."""
    if lora_on_experts(spec, plan) and (plan.lora_dropout > 0 or plan.use_dora):
        what = "lora_dropout != 0" if plan.lora_dropout > 0 else "DoRA"
        raise PlanError(
            f"this run cannot start: {spec.name} keeps its MoE experts as 3-D tensors "
            f"(transformers 5) and peft wraps them with ParamWrapper, which refuses {what}; "
            "use --lora-dropout 0 (and no DoRA), or target only attention modules "
            "(e.g. --targets q_proj,k_proj,v_proj,o_proj)"
        )


def lora_tensor_numels(spec: ModelSpec, plan: TrainPlan) -> list[int]:
    """numel of every trainable tensor in one layer: A (r x in), B (out x r), DoRA
    magnitude (out) (peft tuners/lora/layer.py update_layer), expert adapters."""
    out: list[int] = []
    for lin in lora_targets(spec, plan):
        out += [plan.rank * lin.in_features, lin.out_features * plan.rank]
        if plan.use_dora:
            out.append(lin.out_features)
    if plan.is_lora and plan.targets == "all-linear" and spec.shared_expert_intermediate_size:
        # Qwen2-MoE's shared_expert_gate, nn.Linear(h, 1): all-linear wraps it too
        out += [plan.rank * spec.hidden_size, plan.rank]
    if lora_on_experts(spec, plan):
        e, h, r = spec.num_local_experts, spec.hidden_size, plan.rank
        inter = spec.expert_intermediate_size
        # peft maps the v4 names onto the fused v5 tensors (utils/transformers_weight_conversion
        # .py `_convert_peft_config_moe`): gate_up_proj (E, 2I, h) fuses two v4 targets (w1+w3,
        # gate_proj+up_proj), so its rank_pattern is 2r; down_proj (E, h, I) keeps r; the router
        # `gate.weight` (E x h) becomes a target parameter too. ParamWrapper A/B span rank * E.
        out += [2 * r * e * h, 2 * inter * 2 * r * e]
        out += [r * e * inter, h * r * e]
        out += [r * h, e * r]
    return out


# ---- every trainable tensor ----------------------------------------------------------------


def _model_tensors(spec: ModelSpec) -> list[tuple[int, int]]:
    """(numel, count) of every parameter tensor of the model (tied embeddings once); the
    input embedding first."""
    h, layers = spec.hidden_size, spec.num_hidden_layers
    norm = [(h, 1)] * (2 if spec.norm == "layernorm" else 1)
    out: list[tuple[int, int]] = [(spec.vocab_size * h, 1), *norm]
    if not spec.tie_word_embeddings:
        out.append((spec.vocab_size * h, 1))
    if spec.lm_head_bias:
        out.append((spec.vocab_size, 1))
    for lin in spec.block_linears():
        out.append((lin.weight_numel, layers))
        if lin.bias:
            out.append((lin.out_features, layers))
    out += [(n, layers * spec.norms_per_layer) for n, _ in norm]
    if spec.qk_norm:
        widths = ([spec.head_size] * 2 if spec.qk_norm_width == "head"
                  else [spec.q_size, spec.kv_size])
        out += [(w, layers) for w in widths]
    if spec.is_moe:
        e = spec.num_local_experts
        inter = spec.expert_intermediate_size
        out += [(e * 2 * inter * h, layers), (e * inter * h, layers), (e * h, layers)]
        if spec.shared_expert_intermediate_size:
            out.append((h, layers))  # Qwen2-MoE shared_expert_gate
    return out


def trainable_tensors(spec: ModelSpec, plan: TrainPlan) -> list[TrainableTensor]:
    """Every tensor the optimizer updates, with its dtype."""
    if plan.method == "full":
        dtype = DTYPE_BYTES[plan.load_dtype]
        tensors = _model_tensors(spec)
        return [TrainableTensor(n, dtype, c, embedding=(i == 0)) for i, (n, c) in
                enumerate(tensors)]
    layers = spec.num_hidden_layers
    dtype = DTYPE_BYTES[plan.adapter_dtype]  # fp32 unless the trainer cast them (TRL: bf16)
    return [TrainableTensor(n, dtype, layers) for n in lora_tensor_numels(spec, plan)]


def trainable_param_count(spec: ModelSpec, plan: TrainPlan) -> int:
    return sum(t.numel * t.copies for t in trainable_tensors(spec, plan))


def trainable_param_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Allocated bytes of the trainable tensors (and of their gradients: same sizes)."""
    return sum(t.allocated for t in trainable_tensors(spec, plan))


def lora_param_count(spec: ModelSpec, plan: TrainPlan) -> int:
    return 0 if plan.method == "full" else trainable_param_count(spec, plan)


def lora_param_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """LoRA weights in TrainPlan.adapter_dtype: fp32 by default (peft
    autocast_adapter_dtype=True upcasts bf16 adapters), bf16 where TRL casts them."""
    return 0 if plan.method == "full" else trainable_param_bytes(spec, plan)
