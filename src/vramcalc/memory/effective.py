"""What the software stack really runs for a requested plan, where it differs from the
request: the attention implementation a model ends up with, and a "quantized" load that
bitsandbytes leaves unquantized. Each rule cites the code that causes it; the estimators
plan what runs, and a note tells the user why.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

# transformers 5 refuses sdpa for these (`_supports_sdpa = False`: attention logit
# soft-capping); from_pretrained(attn_implementation="sdpa") raises, so they run eager.
EAGER_ONLY_MODEL_TYPES = frozenset({"gemma2"})

MATH_SDPA_NOTE = (
    "falcon with sdpa runs torch's math attention (query and key heads differ and "
    "modeling_falcon passes no enable_gqa): planned as eager attention, S^2 scores per head"
)
_NOT_QUANTIZED = (
    "{name}: transformers 5 does not quantize its Linears (an nn.Linear subclass; "
    "bitsandbytes' replace_with_bnb_linear converts only nn.Linear itself)"
)
UNQUANTIZED_BASE_NOTE = _NOT_QUANTIZED + (
    ", and prepare_model_for_kbit_training casts every weight to fp32: planned as LoRA on "
    "an fp32 base")
UNQUANTIZED_LOAD_NOTE = _NOT_QUANTIZED + ": planned as a {dtype} base"
UNQUANTIZED_NO_PREP_NOTE = _NOT_QUANTIZED + (
    ", and without prepare_model_for_kbit_training (--no-kbit-prep) it stays in {dtype}: "
    "planned as LoRA on a {dtype} base")


def runs_math_sdpa(spec: ModelSpec, attn: str) -> bool:
    """modeling_falcon.py `FalconAttention.forward` calls sdpa with one key/value head for
    all query heads, no `enable_gqa`, and an explicit mask (`create_causal_mask(...,
    allow_is_causal_skip=False)`): neither the flash nor the memory-efficient kernel takes
    that, so torch runs the math backend, which materialises the scores per head as eager
    attention does (H200 run 6 w010, falcon-7b 4 x 4096: 78.1 GiB measured; as eager
    78.4 GiB)."""
    return (attn == "sdpa" and spec.model_type == "falcon"
            and spec.kv_heads != spec.num_attention_heads)


def attention_impl(spec: ModelSpec, requested: str) -> str:
    """The attention implementation whose memory the model really has."""
    if spec.model_type in EAGER_ONLY_MODEL_TYPES or runs_math_sdpa(spec, requested):
        return "eager"
    return requested


def base_left_unquantized(spec: ModelSpec, plan: TrainPlan) -> bool:
    """A QLoRA plan on a model whose Linears bitsandbytes does not convert (spec field
    `bnb_quantizes_linears`; H200 runs 1, 4, 6: falcon-7b int8 and nf4 loads held no
    quantized parameter, and 4.5 GB of fp32 weights after prepare for 1.12 B parameters)."""
    return plan.method == "qlora" and not spec.bnb_quantizes_linears


def effective_train_plan(spec: ModelSpec, plan: TrainPlan
                         ) -> tuple[TrainPlan, dict[str, str], list[str]]:
    """The plan the stack runs, the settings that changed, and the notes that say why."""
    notes: list[str] = []
    update: dict[str, str] = {}
    if base_left_unquantized(spec, plan):
        if plan.kbit_prep:
            notes.append(UNQUANTIZED_BASE_NOTE.format(name=spec.name))
            update.update(method="lora", quant="none", weights_dtype="fp32")
        else:
            notes.append(UNQUANTIZED_NO_PREP_NOTE.format(name=spec.name, dtype=plan.load_dtype))
            update.update(method="lora", quant="none")
    if runs_math_sdpa(spec, plan.attn):
        notes.append(MATH_SDPA_NOTE)
        update["attn"] = "eager"
    if not update:
        return plan, update, notes
    # a LoRA plan has no kbit preparation to skip (TrainPlan._check_kbit_and_adapters)
    fields = {**update, "kbit_prep": True} if "method" in update else update
    return plan.model_copy(update=fields), update, notes


PlanT = TypeVar("PlanT", bound=BaseModel)


def effective_load_plan(spec: ModelSpec, plan: PlanT, quant_field: str, dtype: str
                        ) -> tuple[PlanT, dict[str, str], list[str]]:
    """The inference or merge plan a bitsandbytes load really gives (no kbit preparation,
    so an unconverted base stays in the load dtype `dtype`): the plan, the settings that
    changed and the note. `quant_field` names the plan's quantization setting."""
    if getattr(plan, quant_field) == "none" or spec.bnb_quantizes_linears:
        return plan, {}, []
    update = {quant_field: "none"}
    note = UNQUANTIZED_LOAD_NOTE.format(name=spec.name, dtype=dtype)
    return plan.model_copy(update=update), update, [note]
