"""Trainable parameters: which modules LoRA wraps, the adapters' bytes and their gradients."""

from __future__ import annotations

from vramcalc.errors import PlanError
from vramcalc.plan_settings import TrainPlan
from vramcalc.specs import LinearShape, ModelSpec
from vramcalc.weights import rounded

# ---- LoRA ---------------------------------------------------------------------------------


def lora_targets(spec: ModelSpec, plan: TrainPlan) -> list[LinearShape]:
    """The block Linears LoRA wraps. 'all-linear' is every Linear in the blocks, never
    lm_head (peft utils/other.py _maybe_include_all_linear_layers)."""
    linears = spec.block_linears()
    if plan.targets == "all-linear":
        return linears
    names = {lin.name for lin in linears}
    wanted = plan.target_list()
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise PlanError(
            f"unknown target module {', '.join(repr(u) for u in unknown)} for "
            f"{spec.name}; valid: all-linear or a comma list of {', '.join(sorted(names))}"
        )
    return [lin for lin in linears if lin.name in wanted]


def lora_tensor_numels(spec: ModelSpec, plan: TrainPlan) -> list[int]:
    """numel of every trainable tensor in one layer: A (r x in), B (out x r), DoRA
    magnitude (out) (peft tuners/lora/layer.py update_layer)."""
    out: list[int] = []
    for lin in lora_targets(spec, plan):
        out += [plan.rank * lin.in_features, lin.out_features * plan.rank]
        if plan.use_dora:
            out.append(lin.out_features)
    return out


def lora_param_count(spec: ModelSpec, plan: TrainPlan) -> int:
    return spec.num_hidden_layers * sum(lora_tensor_numels(spec, plan))


def lora_param_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """LoRA weights are fp32 (peft autocast_adapter_dtype=True upcasts bf16 adapters)."""
    per_layer = sum(rounded(4 * n) for n in lora_tensor_numels(spec, plan))
    return spec.num_hidden_layers * per_layer


