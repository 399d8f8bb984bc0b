"""Bytes autograd keeps alive during a training step, per token and per layer, by method.

What a decoder layer saves for backward, read from the sources (transformers 5.x
modeling_*.py, peft 0.21 tuners/lora/{layer,bnb}.py, bitsandbytes 0.50 autograd/_functions.py,
torch 2.11 autograd formulas) and counted with `saved_tensors_hooks` on tiny models on CPU
(tests/memory/test_saved_activations.py). Notation: h hidden, q = heads x head_dim, kv = kv heads
x head_dim, I intermediate, r rank; bytes per token.

Dtypes. `residual`: the dtype of the hidden states between modules. QLoRA / int8: fp32,
because prepare_model_for_kbit_training upcasts embeddings and norms (peft utils/other.py),
autocast only lowers matmul inputs, and bitsandbytes returns `.to(inp_dtype)` (4-bit) or
`A.dtype` (int8) outputs. 16-bit LoRA and full fine-tuning: the load dtype (bf16, or fp32
for fp32 master weights). `mlp`: the dtype of base Linear outputs: the residual dtype for
bitsandbytes layers, the compute dtype for nn.Linear under autocast.

- Norms: RMSNorm (`hidden_states.to(torch.float32)` then pow/mul) keeps an fp32 copy of its
  input (4h); LayerNorm under autocast runs in fp32 and keeps the fp32 cast (4h). When the
  norm weight trains (full), `weight * normed` also keeps the normalized tensor.
- Base Linear: a 4-bit layer (MatMul4Bit) and a frozen nn.Linear keep nothing; an int8
  layer (MatMul8bitLt) keeps its input A (`ctx.tensors = (CAt, subA, A)`); a trained
  Linear keeps its compute-dtype input for the weight gradient (one autocast copy per
  Linear when the input is not already in the compute dtype, one shared tensor otherwise).
- LoRA module: the dropout mask (bool, 1 B) and the dropout's output (residual dtype; the
  compute-dtype cast lora_A's autocast matmul keeps when they differ), lora_A's output
  (compute dtype, r wide). Without dropout (Identity) the input itself is kept.
- sdpa / flash: q, k, v, output (compute dtype) and the fp32 log-sum-exp per head. eager:
  repeated k/v for the matmuls, 6 B per score (fp32 softmax + its compute-dtype copy).
- MLP: the activation keeps `ACTIVATION_SAVED_TENSORS[hidden_act]` intermediate-wide
  tensors; a gated MLP's product keeps the activation output and the up projection.
- Residual dropout (phi-2 resid_pdrop): a bool mask after attention and after the MLP.
"""

from __future__ import annotations

import functools
import math

from vramcalc.memory.program.trainable import lora_on_experts, lora_targets
from vramcalc.memory.program.weights import DTYPE_BYTES, fused_experts
from vramcalc.models.spec import (
    ACTIVATION_SAVED_TENSORS,
    ModelSpec,
    layer_windows,
    sliding_past_window,
)
from vramcalc.plans import TrainPlan

# The projections that read a layer's input norm and feed its attention core.
QKV_ROLES = frozenset({"q", "k", "v", "qkv"})
SOFTMAX_BYTES_PER_SCORE = 4 + 2  # fp32 softmax output + its bf16 copy (eager_attention_forward)
SOFTCAP_BYTES_PER_SCORE = 2
LSE_BYTES_PER_HEAD = 4  # flash / mem-efficient kernels keep one fp32 log-sum-exp per head
NORM_FP32_BYTES = 4  # RMSNorm / autocast LayerNorm keep an fp32 copy of their input
RSQRT_BYTES = 4  # and one fp32 rsqrt (RMSNorm) or mean/rstd pair's share per token
# Extra bytes per batch x S^2 that eager attention keeps alive at the end of the forward
# under gradient checkpointing (the materialised causal mask and its copies), measured on
# the H100 (calibration/raw/h100-run1.jsonl, llama-3.1-8b b2 s2048 eager): 12.8 B.
EAGER_MASK_BYTES_PER_BS2 = 12


def residual_bytes(plan: TrainPlan) -> int:
    """Bytes per element of the hidden states between modules: the embeddings' and norms'
    dtype (fp32 after prepare_model_for_kbit_training: TrainPlan.param_dtype)."""
    return DTYPE_BYTES[plan.param_dtype]


def compute_bytes(plan: TrainPlan) -> int:
    return DTYPE_BYTES[plan.compute_dtype]


def mlp_bytes(plan: TrainPlan) -> int:
    """Bytes per element of base Linear outputs (see module docstring)."""
    if plan.kbit_upcast:
        return 4
    return min(DTYPE_BYTES[plan.param_dtype], compute_bytes(plan))


def _intermediate(spec: ModelSpec) -> int:
    """Intermediate width one token passes through in the MLP (experts: top-k of them)."""
    inter = spec.expert_intermediate_size
    if spec.is_moe:
        return inter * spec.num_experts_per_tok + spec.shared_expert_intermediate_size
    return inter


def _linear_inputs(spec: ModelSpec) -> dict[str, tuple[int, str]]:
    """Each block Linear's input: (width, the tensor it reads). Linears that read the same
    tensor (q/k/v from the input norm, gate/up from the second norm) share it."""
    out: dict[str, tuple[int, str]] = {}
    for lin in spec.block_linears():
        if lin.role in QKV_ROLES:
            source = "norm1"
        elif lin.role == "o":
            source = "attn_out"
        elif lin.role in ("gate", "up", "gate_up", "fc1"):
            source = "norm2" if spec.norms_per_layer > 1 else "norm1"
        else:
            source = "mlp_act"
        out[lin.name] = (lin.in_features, source)
    return out


def _source_dtype(source: str, plan: TrainPlan) -> int:
    """Bytes per element of the tensor a Linear reads."""
    if source == "attn_out":
        return compute_bytes(plan)  # sdpa / eager output under autocast
    if source == "mlp_act":
        return mlp_bytes(plan)
    return residual_bytes(plan)  # norm outputs are cast back to the input dtype


def _lora_saved(spec: ModelSpec, plan: TrainPlan, roles: frozenset[str] | None = None) -> int:
    """Per LoRA module: the dropout mask (bool, when dropout > 0), the compute-dtype input
    lora_A's matmul keeps, and lora_A's output kept by lora_B. peft casts the (dropped)
    input to the adapter's fp32 (`_cast_input_dtype`) and autocast casts it back, so every
    module keeps its own copy, even when modules read the same tensor (counted on CPU:
    tests/memory/test_saved_activations.py). `roles`: only the modules of those roles."""
    if not plan.is_lora:
        return 0
    c = compute_bytes(plan)
    inputs = _linear_inputs(spec)
    mask = 1 if plan.lora_dropout > 0 else 0
    total = 0
    for lin in lora_targets(spec, plan):
        if roles is None or lin.role in roles:
            width, _ = inputs[lin.name]
            total += (mask + c) * width + c * plan.rank
    return total


def _kept_elsewhere(source: str, plan: TrainPlan) -> bool:
    """The attention output o_proj reads is a view of what sdpa already keeps (its output
    comes back in (batch, seq, heads, dim) layout, so `transpose(1, 2).contiguous()` copies
    nothing); eager attention's `probs @ v` output is copied."""
    return source == "attn_out" and plan.attn != "eager"


def _base_linear_saved(spec: ModelSpec, plan: TrainPlan, sources: set[str] | None = None
                       ) -> int:
    """What the base Linears keep: nothing (4-bit, frozen 16-bit); the input (int8, full).
    `sources`: only the Linears reading those tensors (norm1: q/k/v)."""
    inputs = {name: (w, src) for name, (w, src) in _linear_inputs(spec).items()
              if not _kept_elsewhere(src, plan) and (sources is None or src in sources)}
    if plan.method == "full":
        c = compute_bytes(plan)
        total = 0
        shared: dict[str, int] = {}
        for width, source in inputs.values():
            if _source_dtype(source, plan) != c:
                total += c * width  # one autocast copy per Linear
            else:
                shared[source] = c * width
        return total + sum(shared.values())
    if plan.quant == "int8":
        return int8_saved_bytes_per_token(spec, plan, sources)
    return 0


# bitsandbytes int8_vectorwise_quant (backends/cuda/ops.py): the columns of A holding a
# value of magnitude >= llm_int8_threshold (6.0) in any row are the outlier columns
# (`outliers = A.abs() >= threshold; outlier_cols = argwhere(outliers.any(dim=0))`); the
# mixed matmul (backends/default/ops.py int8_mixed_scaled_mm) keeps them as
# subA = A[:, outlier_cols].contiguous(), in A's dtype, for backward. How many columns pass
# depends on the weights and the data. For the weights `from_config` draws (transformers
# `_init_weights`: Linear weights ~ N(0, initializer_range^2), zero biases, unit norm
# weights) it follows from the shapes; see `int8_outlier_fraction`.
INT8_THRESHOLD = 6.0  # transformers BitsAndBytesConfig llm_int8_threshold default
# Linears whose input carries int8 outlier columns (the MLP's down projection input)
OUTLIER_ROLES = frozenset({"down", "fc2"})
# initializer_range of transformers' config classes where it is not 0.02
# (configuration_starcoder2.py Starcoder2Config); a config.json's own value wins.
_INIT_STD_DEFAULTS = {"starcoder2": 0.018042}
# Families whose MLP reads the residual stream without a norm in front (OLMo-2 normalizes
# after each block): its scale grows with depth, so every column is counted.
_UNNORMED_MLP_INPUT = frozenset({"olmo2"})


def _act(name: str, g: float) -> float:
    if name == "silu":
        return g / (1.0 + math.exp(-g)) if g > -700.0 else 0.0
    if name == "relu":
        return max(g, 0.0)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh"):
        return 0.5 * g * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    return 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0)))  # gelu (erf) and the rest


@functools.lru_cache(maxsize=64)
def _outlier_tail(s: float, act: str, gated: bool, steps: int = 2000) -> float:
    """P(|a| >= INT8_THRESHOLD) for one element a of the down projection's input when the
    gate (g) and up (u) pre-activations are N(0, s^2): a = act(g) * u (gated) or act(g)
    (plain). Gated: E_g[P(|u| >= 6 / |act(g)|)] = E_g[erfc(6 / (|act(g)| s sqrt 2))]."""
    lo, hi = -10.0 * s, 10.0 * s
    h = (hi - lo) / steps
    total = 0.0
    for k in range(steps + 1):
        g = lo + k * h
        w = (0.5 if k in (0, steps) else 1.0) * h * math.exp(-0.5 * (g / s) ** 2)
        a = abs(_act(act, g))
        if gated:
            if a > 0.0:
                total += w * math.erfc(INT8_THRESHOLD / (a * s * math.sqrt(2.0)))
        elif a >= INT8_THRESHOLD:
            total += w
    return min(1.0, total / (s * math.sqrt(2.0 * math.pi)))


def int8_outlier_fraction(spec: ModelSpec, rows: int) -> float:
    """The fraction of the down projection input's columns MatMul8bitLt keeps as subA.

    The MLP input is a norm output, so each token's vector has squared norm h (RMSNorm and
    LayerNorm with unit weights; Gemma's 1 + 0); gate and up rows drawn N(0, sigma^2) make
    each pre-activation N(0, sigma^2 h) over tokens (sigma = initializer_range), so an
    element of the down input passes the threshold with probability p (`_outlier_tail`;
    counted on a from_config llama of h = 2048: 5.1e-5, here 4.9e-5), and a column with any
    of `rows` rows passing is kept: 1 - (1 - p)^rows, taking the rows as independent.
    They are not quite: attention mixes a component shared by all tokens into the MLP input
    (in a one-layer model at init, a fifth of its energy), so a column's outliers cluster
    and fewer columns pass: counted 0.135 for 0.184 here (h = 2048, 4096 rows); the
    per-column variation of the widths (chi^2 of the weight rows) changes it by < 0.001.
    tests/memory/test_int8_outliers.py holds both. On the full-depth H200 points the implied
    fraction of the measured peaks is llama-3.2-1b 0.06 / 0.07 / 0.24 / 0.29 at 1k / 2k /
    4k / 8k tokens (here 0.05 / 0.10 / 0.18 / 0.33) and 1.0 on every model with h >= 3072.
    Pretrained weights have other statistics (a few systematic outlier features, LLM.int8
    paper, Dettmers et al. 2022): on large models this is then an upper bound."""
    if spec.model_type in _UNNORMED_MLP_INPUT or rows <= 0:
        return 1.0
    sigma = spec.extra_config.get("initializer_range")
    if not isinstance(sigma, (int, float)) or sigma <= 0:
        sigma = _INIT_STD_DEFAULTS.get(spec.model_type, 0.02)
    s = round(float(sigma) * math.sqrt(spec.hidden_size), 6)
    p = _outlier_tail(s, spec.hidden_act, spec.mlp_layout != "plain")
    if p >= 1.0:
        return 1.0
    return -math.expm1(rows * math.log1p(-p))


def int8_saved_bytes_per_token(spec: ModelSpec, plan: TrainPlan,
                               sources: set[str] | None = None,
                               after_backward: bool = False) -> int:
    """What MatMul8bitLt keeps per layer (bitsandbytes autograd/_functions.py):
    `ctx.tensors = (CAt, subA, A)`: the input A of each distinct tensor the base Linears
    read (CAt is None: the frozen weight needs no gradient, so the forward takes the
    int8_vectorwise_quant path) and subA, the outlier columns of A
    (`int8_outlier_fraction` of the down_proj input). Stored as ctx attributes, not with
    save_for_backward, so non-reentrant gradient checkpointing (saved-tensor hooks) never
    drops them: they stay for every layer whether or not checkpointing is on, and under
    checkpointing the attention output o_proj reads is kept here even for sdpa (whose own
    saved tensors the checkpoint drops). They are freed with the graph at the end of
    backward, not by their layer's backward (H200 run 17 traces t17-w029, t17-y012).
    `after_backward`: what they hold once backward has freed the saved tensors (a loop
    that keeps the output keeps its graph, `Graph.backward(keep_graph)` in
    program.step): every distinct input, also those that were views of saved ones.
    """
    if plan.quant != "int8":
        return 0
    inputs = {name: (w, src) for name, (w, src) in _linear_inputs(spec).items()
              if (plan.gradient_checkpointing or after_backward
                  or not _kept_elsewhere(src, plan))
              and (sources is None or src in sources)}
    distinct = {source: width for width, source in inputs.values()}
    total = sum(_source_dtype(s, plan) * w for s, w in distinct.items())
    if "mlp_act" in distinct:
        frac = int8_outlier_fraction(spec, plan.tokens)
        total += int(frac * mlp_bytes(plan) * distinct["mlp_act"])
    return total


def first_layer_unsaved_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """What the first layer does not keep, per token, when nothing before it requires grad:
    LoRA without checkpointing (frozen embeddings; enable_input_require_grads only comes
    with checkpointing, peft prepare_model_for_kbit_training(use_gradient_checkpointing)).
    Its input norm keeps no input (autograd saves for backward only what requires grad),
    the LoRA dropouts on that norm's output keep no mask, and int8 Linears reading it keep
    no A (MatMul8bitLt keeps ctx.tensors only when any(ctx.needs_input_grad[:2])). H200
    trace t17-y012: layer 0's norm output and dropout masks are freed within the forward.
    Counted for quantized bases (QLoRA / int8: the allocated peak of every no-checkpoint
    point moves toward the measurement); 16-bit LoRA points would move below theirs by
    about as much, so something there that the layer formula leaves out is not yet known,
    and they are left as they were.
    """
    if plan.method != "qlora" or plan.gradient_checkpointing:
        return 0
    unsaved = _norms_saved(spec, plan, norms=1) - (_norms_saved(spec, plan, norms=0))
    unsaved += int8_saved_bytes_per_token(spec, plan, sources={"norm1"})
    if plan.lora_dropout > 0:
        inputs = _linear_inputs(spec)
        unsaved += sum(inputs[lin.name][0] for lin in lora_targets(spec, plan)
                       if inputs[lin.name][1] == "norm1")
    return unsaved


def _norms_saved(spec: ModelSpec, plan: TrainPlan, norms: int | None = None) -> int:
    """The layer's norms (`norms`: how many of its norms_per_layer), q/k norms included."""
    h = spec.hidden_size
    # RMSNorm upcasts its input itself (`hidden_states.to(torch.float32)`); LayerNorm runs in
    # fp32 only because layer_norm is on autocast's fp32 list: without autocast it keeps its
    # input in the residual dtype.
    norm_in = NORM_FP32_BYTES if spec.norm == "rmsnorm" or plan.autocast else residual_bytes(plan)
    per_norm = norm_in * h + RSQRT_BYTES
    if plan.method == "full" and spec.norm == "rmsnorm":
        # weight * normed keeps the normalized tensor for the weight's gradient; Gemma's
        # `output * (1.0 + self.weight.float())` keeps it in fp32
        # (models.spec ModelSpec.norm_scales_in_fp32).
        per_norm += (4 if spec.norm_scales_in_fp32 else residual_bytes(plan)) * h
    total = (spec.norms_per_layer if norms is None else norms) * per_norm
    if spec.qk_norm:
        # q_norm / k_norm run on the q/k projections (compute dtype under autocast): the
        # fp32 copy, one rsqrt per head, and (trained weight) the normalized tensor
        width = spec.q_size + spec.kv_size
        total += NORM_FP32_BYTES * width + RSQRT_BYTES * (spec.num_attention_heads + spec.kv_heads)
        if plan.method == "full":
            total += compute_bytes(plan) * width
    return total


def _attention_saved(spec: ModelSpec, plan: TrainPlan) -> int:
    c = compute_bytes(plan)
    if plan.attn == "eager":
        return 3 * c * spec.q_size  # q, repeated k and v (repeat_kv) for the matmuls
    return c * (spec.q_size + 2 * spec.kv_size) + c * spec.q_size + (
        LSE_BYTES_PER_HEAD * spec.num_attention_heads
    )


# Python-formula activations that call torch.pow (NewGELUActivation, FastGELUActivation
# uses `input * input`: not pow): pow is on autocast's fp32 list, so under autocast its
# result and everything computed from it is fp32, whatever the input dtype.
FP32_UNDER_AUTOCAST = {"gelu_new"}


def expert_dtype_bytes(plan: TrainPlan) -> int:
    """The dtype the fused experts compute in: their own. `_grouped_mm` is on no autocast
    list, so fp32 experts (QLoRA: prepare_model_for_kbit_training upcasts every non-4-bit
    parameter; full fine-tuning with fp32 master weights) run in fp32 (H200 run 5 trace
    d061: 4 B per element)."""
    return DTYPE_BYTES[plan.param_dtype]


def experts_train(spec: ModelSpec, plan: TrainPlan) -> bool:
    """Whether the expert tensors need a weight gradient: full fine-tuning, or LoRA folded
    into them (peft ParamWrapper)."""
    return plan.method == "full" or lora_on_experts(spec, plan)


def routed_saved_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """What the fused experts keep per token (k routed rows each, I expert width, h hidden):
    the gate_up output (2I; SiLU keeps its `gate` view of it), the activation output (I) and
    the routed down output (h, kept by the routing-weight multiply); when the expert weights
    need a gradient `_grouped_mm` also keeps its inputs: the gathered hidden states (h) and
    the product (I). Traced on the H200 (run 5 snap d061, run 1 snap-mixtral-qlora)."""
    inter = spec.expert_intermediate_size
    per_row = 2 * inter + inter + spec.hidden_size
    if experts_train(spec, plan):
        per_row += inter + spec.hidden_size
    return expert_dtype_bytes(plan) * spec.num_experts_per_tok * per_row


def pre_attention_saved_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """What a layer keeps for the ops up to its attention core: the input norm (and q/k
    norms), the q/k/v projections' adapters and inputs, the core's own inputs. While the
    core's backward runs these are still alive; everything after it in the forward (o_proj
    on, the MLP, a parallel block's MLP too: created later, its backward runs first) has
    been freed (H200 run 12 snapshots: at eager attention's backward peak the layer held
    its attention tensors, q/k/v adapters and the probabilities, no MLP or o_proj tensor).
    Eager attention's S^2 probabilities are not included (eager_scores_bytes)."""
    return (_norms_saved(spec, plan, norms=1) + _attention_saved(spec, plan)
            + _base_linear_saved(spec, plan, sources={"norm1"})
            + _lora_saved(spec, plan, roles=QKV_ROLES))


def _mlp_saved(spec: ModelSpec, plan: TrainPlan) -> int:
    per_act = ACTIVATION_SAVED_TENSORS.get(spec.hidden_act, 1)
    gated = spec.is_moe or spec.mlp_layout in ("gated", "fused_gated")
    inter = _intermediate(spec)
    if fused_experts(spec, plan):
        shared = spec.shared_expert_intermediate_size
        return routed_saved_per_token(spec, plan) + (per_act + 2) * mlp_bytes(plan) * shared
    if spec.hidden_act in FP32_UNDER_AUTOCAST and plan.autocast:
        # the activation's own intermediates in fp32 (the first keeps the input: its dtype)
        act = mlp_bytes(plan) * inter + 4 * (per_act - 1) * inter
        return act + (2 * mlp_bytes(plan) * inter if gated else 0)
    tensors = per_act + 2 if gated else per_act
    return tensors * mlp_bytes(plan) * inter


def layer_saved_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """Bytes one decoder layer saves for backward, per token, without checkpointing
    (eager attention's S^2 scores are separate: `eager_scores_bytes`)."""
    total = (
        _norms_saved(spec, plan)
        + _lora_saved(spec, plan)
        + _base_linear_saved(spec, plan)
        + _attention_saved(spec, plan)
        + _mlp_saved(spec, plan)
    )
    if spec.resid_dropout > 0:
        total += 2 * spec.hidden_size  # bool masks after attention and after the MLP
    return total


def eager_score_count(spec: ModelSpec, plan: TrainPlan) -> int:
    """Attention scores of one layer (batch x heads x S^2); 0 for sdpa / flash."""
    if plan.attn != "eager":
        return 0
    b, seq = plan.rows  # padding-free: one row of the step's tokens
    return b * spec.num_attention_heads * seq**2


def eager_scores_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Per layer: the attention probabilities eager attention keeps (0 for sdpa/flash)."""
    scores = eager_score_count(spec, plan)
    # Gemma-2 attn_logit_softcapping (tanh of the scores) keeps the tanh output: +2 B per
    # score, measured 2.4 B on gemma-2-2b eager without checkpointing (h100-run2).
    softcap = SOFTCAP_BYTES_PER_SCORE if spec.attn_logit_softcapping else 0
    dropout = 1 if spec.attention_dropout > 0 else 0  # bool mask on the probabilities
    return (SOFTMAX_BYTES_PER_SCORE + softcap + dropout) * scores


def eager_mask_bytes(plan: TrainPlan) -> int:
    if plan.attn != "eager":
        return 0
    b, seq = plan.rows
    return EAGER_MASK_BYTES_PER_BS2 * b * seq**2


def window_mask_bytes(spec: ModelSpec, plan: TrainPlan) -> tuple[int, int]:
    """Sliding-window attention under sdpa at seq_len >= the window: (the bool mask of the
    whole forward and backward, the per-layer additive copy each sliding layer's sdpa
    saves for backward). The bool (batch, 1, S, S) mask is built once
    (masking_utils `sdpa_mask`); aten `scaled_dot_product_attention` converts a bool mask
    to an additive one in the query dtype (`convert_boolean_attn_mask`) and the
    memory-efficient kernel keeps it as `attn_bias` for backward. H200: mistral-7b s16384
    without checkpointing, +2.33 GiB measured for 0.25 + 4 x 0.5 GiB (run 1 d034)."""
    if plan.attn != "sdpa":
        return 0, 0
    b, seq = plan.rows
    n = sum(masked_layers(spec, plan))
    if not n:
        return 0, 0
    elems = b * seq * seq
    return sdpa_masks(spec, plan) * elems, n * compute_bytes(plan) * elems


def masked_layers(spec: ModelSpec, plan: TrainPlan) -> list[bool]:
    """For each layer, whether its sdpa gets a materialised bool mask: a sliding layer past
    its window (`sliding_past_window`), or every layer of packed and padding-free rows
    (TrainPlan.attention_masked)."""
    if plan.attn != "sdpa":
        return [False] * spec.num_hidden_layers
    if plan.attention_masked:
        return [True] * spec.num_hidden_layers
    return sliding_past_window(spec, plan.rows[1])


def sdpa_masks(spec: ModelSpec, plan: TrainPlan) -> int:
    """How many (batch, 1, S, S) bool masks one forward builds: one for the sliding layers
    past their window, one for the full-attention layers of packed rows (transformers 5
    builds a causal and a sliding-window mapping for models that have both:
    create_causal_mask and create_sliding_window_causal_mask), 0 without masked layers."""
    masked = masked_layers(spec, plan)
    if not any(masked):
        return 0
    sliding = [w is not None for w in layer_windows(spec)]
    sliding += [False] * (len(masked) - len(sliding))
    kinds = {sliding[k] for k, m in enumerate(masked) if m}
    return len(kinds)


def kv_cache_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """Per layer and token, what the DynamicCache of a forward with use_cache on holds
    (TrainPlan.kv_cache): transformers cache_utils.py `DynamicLayer.update` keeps
    `torch.cat([self.keys, key_states], dim=-2)`, a copy of the key after rotary and of the
    value, num_key_value_heads wide, in the projections' dtype (fp32 under QLoRA, whose
    norms prepare_model_for_kbit_training made fp32), until the output goes."""
    return 2 * spec.kv_size * mlp_bytes(plan) if plan.kv_cache else 0


def kv_cache_unsaved_bytes_per_token(spec: ModelSpec, plan: TrainPlan) -> int:
    """The part of `kv_cache_bytes_per_token` the layer's saved tensors do not already
    hold: the attention uses the cache's key and value as its own, so where it saves them
    as they are (sdpa in the compute dtype; eager without repeat_kv) the cache adds
    nothing; where it saves compute-dtype casts (QLoRA's fp32 keys) or repeated copies
    (eager attention with fewer key/value heads), the cache's tensors come on top."""
    cached = kv_cache_bytes_per_token(spec, plan)
    if not cached or mlp_bytes(plan) != compute_bytes(plan):
        return cached
    if plan.attn == "eager" and spec.kv_heads != spec.num_attention_heads:
        return cached
    return 0
