"""Bytes of the model's weights by storage: 4-bit / int8 quantized, 16-bit, never quantized.

Every function returns what torch's caching allocator counts as *allocated*: each tensor's
size rounded up to 512 bytes (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize = 512).
Checked byte-for-byte against real bitsandbytes + peft tensors of tiny models on CPU
(tests/memory/test_static_bytes.py) and against `torch.cuda.memory_allocated()` after load on an
H100 (docs/memory-model.md).
"""

from __future__ import annotations

from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.records import Frozen

ALLOC_ROUND = 512  # CUDACachingAllocator kMinBlockSize: every block is a multiple of 512 B

NF4_BLOCKSIZE = 64  # bitsandbytes functional.quantize_4bit: blocksize defaults to 64
NESTED_BLOCKSIZE = 256  # QuantState compress_statistics -> quantize_blockwise(absmax, 256)
CODE_4BIT_BYTES = 16 * 4  # functional.get_4bit_type: 16 fp32 entries, one per Linear
DYNAMIC_MAP_BYTES = 256 * 4  # functional.create_dynamic_map: 256 fp32 entries

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def rounded(nbytes: int) -> int:
    """Size of one allocation as the caching allocator counts it."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- base weights -----------------------------------------------------------------------


def quantized_weight_bytes(numel: int, quant: str) -> int:
    """Packed weight storage of one Linear (`Params4bit`: two 4-bit values per byte;
    `Int8Params`: one byte per value)."""
    if quant in ("nf4", "fp4"):
        return rounded(ceil_div(numel, 2))
    if quant == "int8":
        return rounded(numel)
    raise ValueError(quant)


def quant_constant_bytes(numel: int, out_features: int, quant: str, double_quant: bool) -> int:
    """Quantization state of one Linear (bitsandbytes functional.QuantState).

    4-bit, no double quant: fp32 absmax per 64-block + the 16-entry fp32 code.
    4-bit, double quant: uint8 absmax per 64-block + nested fp32 absmax per 256 of those
    + fp32 offset (a 0-d tensor) + the 16-entry code + the nested 256-entry fp32 dynamic
    map, which each Linear's QuantState holds a copy of (counted on real tensors).
    int8: fp32 row scales SCB (bnb Int8Params), one per output row.
    """
    if quant == "int8":
        return rounded(4 * out_features)
    blocks = ceil_div(numel, NF4_BLOCKSIZE)
    code = rounded(CODE_4BIT_BYTES)
    if not double_quant:
        return rounded(4 * blocks) + code
    nested = ceil_div(blocks, NESTED_BLOCKSIZE)
    return rounded(blocks) + rounded(4 * nested) + rounded(4) + code + rounded(DYNAMIC_MAP_BYTES)


class WeightBytes(Frozen):
    """Allocated bytes of the model's own tensors after loading (and kbit preparation)."""

    _fields = ("base_weights", "quant_constants", "unquantized_params", "expert_weights",
               "buffers")
    base_weights: int  # block Linear weights: packed 4-bit, int8, or 16/32-bit
    quant_constants: int
    unquantized_params: int  # embeddings, lm_head, norms, biases
    expert_weights: int  # MoE experts (3-D tensors bitsandbytes does not quantize)
    buffers: int  # rotary inv_freq and the like

    def __init__(self, base_weights: int, quant_constants: int, unquantized_params: int,
                 expert_weights: int, buffers: int) -> None:
        self.__dict__.update(base_weights=base_weights, quant_constants=quant_constants,
                             unquantized_params=unquantized_params,
                             expert_weights=expert_weights, buffers=buffers)


def _norm_tensors(spec: ModelSpec) -> list[int]:
    """numel of the tensors of one norm over hidden_size (LayerNorm: weight and bias)."""
    return [spec.hidden_size] * (2 if spec.norm == "layernorm" else 1)


def _small_param_tensors(spec: ModelSpec) -> list[int]:
    """numel of every unquantized per-layer tensor (each its own allocation)."""
    tensors: list[int] = []
    for lin in spec.block_linears():
        if lin.bias:
            tensors.append(lin.out_features)
    tensors += _norm_tensors(spec) * spec.norms_per_layer
    if spec.qk_norm:
        if spec.qk_norm_width == "all_heads":
            tensors += [spec.q_size, spec.kv_size]
        else:
            tensors += [spec.head_size, spec.head_size]
    return tensors


def fused_experts(spec: ModelSpec, plan: TrainPlan) -> bool:
    """transformers-5 MoE: experts are 3-D tensors run by `torch._grouped_mm`
    (integrations/moe.py `grouped_mm_experts_forward`), not per-expert Linears.
    `moe_experts="quantized"` (per-expert Linears, as transformers 4.x and axolotl load
    them) only changes that on a quantized base: a 16-bit base has nothing to quantize.
    The one rule that weight_bytes, trainable, activations, load_requests and
    program.step follow."""
    return spec.is_moe and not (plan.moe_experts == "quantized" and plan.quant != "none")


def expert_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    """One layer's MoE expert tensors and router (transformers 5: fused 3-D parameters)."""
    if not spec.is_moe:
        return 0
    e, h = spec.num_local_experts, spec.hidden_size
    inter = spec.expert_intermediate_size
    tensors = [e * 2 * inter * h, e * inter * h, e * h]  # gate_up_proj, down_proj, router
    if spec.shared_expert_intermediate_size:
        tensors.append(h)  # Qwen2-MoE shared_expert_gate
    return sum(rounded(n * dtype_bytes) for n in tensors)


def expert_linear_numels(spec: ModelSpec) -> list[tuple[int, int]]:
    """(numel, out_features) of one expert's w1/w3 (h -> I) and w2 (I -> h) Linears."""
    h = spec.hidden_size
    inter = spec.expert_intermediate_size
    return [(h * inter, inter), (h * inter, inter), (inter * h, h)]


def unquantized_param_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    """Embeddings, untied lm_head, final norm and every per-layer small tensor (no experts)."""
    total = rounded(spec.embedding_params() * dtype_bytes)
    if not spec.tie_word_embeddings:
        total += rounded(spec.vocab_size * spec.hidden_size * dtype_bytes)
    if spec.lm_head_bias:
        total += rounded(spec.vocab_size * dtype_bytes)
    total += sum(rounded(n * dtype_bytes) for n in _norm_tensors(spec))  # final norm
    per_layer = sum(rounded(n * dtype_bytes) for n in _small_param_tensors(spec))
    return total + spec.num_hidden_layers * per_layer


def rotary_buffer_bytes(spec: ModelSpec) -> int:
    """inv_freq of the rotary embedding: head_dim/2 fp32 (one module per model)."""
    return rounded(4 * (spec.head_size // 2))


# ---- all weights ---------------------------------------------------------------------


def weight_bytes(spec: ModelSpec, plan: TrainPlan) -> WeightBytes:
    """The model's tensors after from_pretrained (+ prepare_model_for_kbit_training)."""
    layers = spec.num_hidden_layers
    linears = spec.block_linears()
    if plan.quant == "none":
        wbytes = DTYPE_BYTES[plan.load_dtype]
        weights = layers * sum(rounded(lin.weight_numel * wbytes) for lin in linears)
        constants = 0
        # plain LoRA skips prepare_model_for_kbit_training: everything stays in the load dtype
        unquantized = unquantized_param_bytes(spec, wbytes)
        experts = layers * expert_bytes(spec, wbytes)
    else:
        weights = layers * sum(quantized_weight_bytes(lin.weight_numel, plan.quant)
                               for lin in linears)
        constants = layers * sum(
            quant_constant_bytes(lin.weight_numel, lin.out_features, plan.quant,
                                 plan.double_quant)
            for lin in linears
        )
        # prepare_model_for_kbit_training casts every non-Params4bit fp16/bf16 param to fp32
        # (peft utils/other.py); Int8Params are int8, so only the rest is upcast. Without it
        # (TRL's SFTTrainer) they stay in the load dtype: TrainPlan.param_dtype.
        pbytes = DTYPE_BYTES[plan.param_dtype]
        unquantized = unquantized_param_bytes(spec, pbytes)
        if spec.is_moe and not fused_experts(spec, plan):
            # per-expert nn.Linear modules (transformers 4.x, axolotl): quantized like the rest
            e_lin = expert_linear_numels(spec)
            weights += layers * spec.num_local_experts * sum(
                quantized_weight_bytes(n, plan.quant) for n, _ in e_lin)
            constants += layers * spec.num_local_experts * sum(
                quant_constant_bytes(n, out, plan.quant, plan.double_quant) for n, out in e_lin)
            experts = layers * rounded(pbytes * spec.num_local_experts * spec.hidden_size)  # router
        else:
            experts = layers * expert_bytes(spec, pbytes)
    return WeightBytes(
        base_weights=weights,
        quant_constants=constants,
        unquantized_params=unquantized,
        expert_weights=experts,
        buffers=rotary_buffer_bytes(spec),
    )


# bitsandbytes 0.50.2 `bitsandbytes::gemm_4bit` on CUDA (backends/cuda/ops.py): a 4-bit
# Linear without grad (generate(), merge checks) runs a fused kernel, with no dequantized
# weight, for at most `_GEMM_4BIT_CUSTOM_FLOOR_M` rows, and up to 1536 rows where
# `_gemm_4bit_use_custom_cuda` says it wins; else `_dequant_linear_fallback` dequantizes the
# whole weight (`torch.empty(shapeB, dtype=A.dtype)`) and calls F.linear. The thresholds
# depend on the card: the ones below are sm90's (H100 / H200, 132 SMs), the cards the
# inference holdouts ran on.
GEMM_4BIT_FUSED_ROWS = 4
GEMM_4BIT_MAX_FUSED_ROWS = 1536
SM90_SMS = 132


def gemm_4bit_dequantizes(rows: int, out_features: int, in_features: int,
                          blocksize: int = NF4_BLOCKSIZE) -> bool:
    """Whether bitsandbytes 0.50.2 dequantizes the whole 4-bit weight for a no-grad matmul
    of `rows` rows (`_gemm_4bit_use_custom_cuda` for sm90 with SM90_SMS multiprocessors,
    the branches that apply to it)."""
    m, n, k, sms = rows, out_features, in_features, SM90_SMS
    if m <= GEMM_4BIT_FUSED_ROWS:
        return False
    if m > GEMM_4BIT_MAX_FUSED_ROWS or k % blocksize:
        return True
    n_blocks = (n + 63) // 64
    fused: bool
    if n * k < 4 * 1024 * 1024:  # small weights
        if k * 2 < n:
            fused = m <= (512 if n_blocks * 3 < sms else 320)
        elif n_blocks * 4 <= sms:
            fused = m <= 32
        else:
            fused = n_blocks * 2 <= sms and m <= 16
    elif m > 512:
        fused = False
    elif m < 8:
        fused = True
        if m >= 6 and n_blocks >= 36:
            below_75 = n_blocks * 4 < sms * 3
            if (k > n and below_75) or (k == n and below_75 and n_blocks * 5 >= sms * 3):
                fused = False
    elif n_blocks >= sms * 3:
        fused = m <= 64
    elif n_blocks >= sms * 2:
        fused = m <= 48
    elif n_blocks >= sms:
        fused = m <= 32
    elif n_blocks >= sms // 2:
        fused = not (k >= n and n_blocks * 4 < sms * 3) and m <= 16
    else:
        fused = False
    return not fused
