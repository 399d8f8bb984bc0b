"""Bytes autograd keeps alive during a training step, per token and per layer.

What a decoder layer saves for backward under the canonical QLoRA recipe, read from the
sources and checked against H100 measurements (docs/memory-model.md):

- The residual stream is fp32: prepare_model_for_kbit_training upcasts embeddings and
  norms (peft utils/other.py), autocast only lowers matmul inputs, and bitsandbytes
  Linear4bit.forward returns `.to(inp_dtype)` (nn/modules.py), so base Linear outputs on
  an fp32 input are fp32 too. Plain LoRA (no quantization) keeps the load dtype.
- bnb MatMul4Bit saves no input (autograd/_functions.py: `ctx.tensors = (None, B)`), nor
  does a frozen nn.Linear; frozen norm weights make `weight * x` save only the weight.
- RMSNorm / LayerNorm save their input (one residual-width tensor per norm).
- Each LoRA module saves the dropout mask (bool, 1 B per input element), the bf16 cast of
  the dropped input that lora_A's autocast matmul keeps, and lora_A's bf16 output (r wide)
  (peft tuners/lora/bnb.py Linear4bit.forward).
- sdpa / flash keep bf16 q, k, v, the output and the log-sum-exp (O(T)); eager keeps the
  fp32 softmax output and its bf16 copy per score (6 B x batch x heads x S^2 per layer).
- Gated MLP: gate output, activation output and up output (3 x I residual-width); phi-2's
  python `gelu_new` keeps 4 x I, a fused gelu 1 x I.
"""

from __future__ import annotations

from vramcalc.plan_settings import TrainPlan
from vramcalc.specs import ModelSpec
from vramcalc.trainable import lora_targets
from vramcalc.weights import DTYPE_BYTES

SOFTMAX_BYTES_PER_SCORE = 4 + 2  # fp32 softmax output + its bf16 copy (eager_attention_forward)
SOFTCAP_BYTES_PER_SCORE = 2
LSE_BYTES_PER_HEAD = 4  # flash / mem-efficient kernels keep one fp32 log-sum-exp per head
# Extra bytes per batch x S^2 that eager attention keeps alive at the end of the forward
# under gradient checkpointing (the materialised causal mask and its copies), measured on
# the H100 (calibration/raw/h100-run1.jsonl, llama-3.1-8b b2 s2048 eager): 12.8 B.
EAGER_MASK_BYTES_PER_BS2 = 12


def residual_bytes(plan: TrainPlan) -> int:
    """Bytes per element of the residual stream (fp32 after kbit preparation)."""
    return 4 if plan.quant != "none" else DTYPE_BYTES[plan.compute_dtype]


def _mlp_saved_factor(spec: ModelSpec) -> int:
    """How many I-wide residual-dtype tensors the MLP keeps (see module docstring)."""
    if spec.is_moe or spec.mlp_layout in ("gated", "fused_gated"):
        return 3
    act = str(spec.extra_config.get("hidden_act", "gelu_new"))
    return 4 if act in ("gelu_new", "gelu_pytorch_tanh_python") else 1


def layer_saved_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """Bytes one decoder layer saves for backward, per token, without checkpointing
    (eager attention's S^2 scores are separate: `eager_scores_bytes`)."""
    act = residual_bytes(plan)
    h = spec.hidden_size
    total = spec.norms_per_layer * act * h
    if spec.qk_norm:
        width = 2 * spec.head_size if spec.qk_norm_width == "head" else 0
        total += act * (spec.q_size + spec.kv_size) + width
    mask = 1 if plan.lora_dropout > 0 else 0
    for lin in lora_targets(spec, plan):
        total += (mask + 2) * lin.in_features + 2 * plan.rank
    if plan.attn == "eager":
        total += 6 * spec.q_size  # bf16 q, repeated k and v (repeat_kv) for the matmuls
    else:
        total += 2 * (spec.q_size + 2 * spec.kv_size) + 2 * spec.q_size
        total += LSE_BYTES_PER_HEAD * spec.num_attention_heads
    inter = spec.moe_intermediate_size or spec.intermediate_size
    if spec.is_moe:
        inter = inter * spec.num_experts_per_tok + spec.shared_expert_intermediate_size
    total += _mlp_saved_factor(spec) * act * inter
    if float(spec.extra_config.get("resid_pdrop", 0.0) or 0.0) > 0:
        total += 2 * h  # phi-2 resid_dropout masks after attention and MLP (bool)
    return total


def eager_score_count(spec: ModelSpec, plan: TrainPlan) -> int:
    """Attention scores of one layer (batch x heads x S^2); 0 for sdpa / flash."""
    if plan.attn != "eager":
        return 0
    return plan.batch_size * spec.num_attention_heads * plan.seq_len**2


def eager_scores_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Per layer: the attention probabilities eager attention keeps (0 for sdpa/flash)."""
    scores = eager_score_count(spec, plan)
    # Gemma-2 attn_logit_softcapping (tanh of the scores) keeps the tanh output: +2 B per
    # score, measured 2.4 B on gemma-2-2b eager without checkpointing (h100-run2).
    softcap = SOFTCAP_BYTES_PER_SCORE if spec.extra_config.get("attn_logit_softcapping") else 0
    return (SOFTMAX_BYTES_PER_SCORE + softcap) * scores


def eager_mask_bytes(plan: TrainPlan) -> int:
    if plan.attn != "eager":
        return 0
    return EAGER_MASK_BYTES_PER_BS2 * plan.batch_size * plan.seq_len**2
