"""generate()'s allocation requests, replayed on the simulated caching allocator: the peak
allocated and reserved memory of an inference run (load, prefill, decode).

The program (one request per tensor of at least `load_requests.MIN_REQUEST` bytes, as in
`program.step` and `load_requests`):

1. Loading: `load_requests.load_requests(..., kbit_prepare=False)`: the warmup segment, the
   weights materialized and quantized in checkpoint order, the LoRA adapters as
   `PeftModel.from_pretrained` makes them (in the base layer's dtype, cast, the file's
   copy read and freed: `load._from_pretrained_adapters`).
2. Prefill (`generate` -> `_sample`, first forward over `batch x prompt` tokens, `_prefill`;
   `prefill_requests` gives its requests): the embeddings output (`inputs_embeds`, alive
   through every layer; Gemma's scaled copy), the attention masks that are materialized
   with masking_utils' temporaries (`_mask`), cos / sin of the rotary embedding with their
   fp32 temporaries and, at that first matmul, the cuBLAS workspace (torch
   CublasHandlePool.cpp, one handle under no_grad; `_rope`), then each decoder layer's
   tensors in their order (the RMSNorm's four fp32 tensors, q/k/v projections with their
   dequantization buffers or int8's quantization chain (`_int8_matmul`) and peft's LoRA
   tensors, Qwen-3's q/k norms, rotary temporaries, the cache update, attention, o_proj,
   Gemma-2's post-attention norm, the residual sum, the MLP, Gemma-2's post-feedforward
   norm), the final norm, the lm_head on the last position only (`logits_to_keep=1`),
   then `_sample`'s fp32 copy of the last logits and the logits processor's scores
   (`inference.LOGITS_FP32_TENSORS`).
   The requests are those of the committed traces, one for one and in order: il03's 877
   of 8 MiB and more (gemma-2-2b nf4 eager, calibration/h100/run32; from 1 MiB only
   `_sample`'s logits differ), ik08's 781 of 1 MiB and more (llama-2-7b nf4 sdpa,
   run29), ih04's 575 of 512 KiB and more (phi-3-mini nf4 sdpa, run34) and ip00's 989 of
   1 MiB and more (gemma-2-9b nf4 eager, run35); ik09's 28 int8 matmuls (qwen2.5-7b int8
   sdpa, run36) (tests/memory/program/test_infer_traces.py).
   The allocator gives new segments descending addresses, as CUDA did in those traces.
3. Decode steps: the same forward over `batch` tokens. The cache update of a
   `DynamicLayer` is `torch.cat([self.keys, key_states], dim=-2)`: a new tensor one token
   longer is allocated before the old one is freed; a sliding layer keeps a view of the
   last `window - 1` tokens (`kv_cache.cached_len`). A static cache is allocated at its
   full length by the first update and written in place afterwards. The previous step's
   fp32 logits and scores are freed when the new ones replace them.

Decode is long, so not every step is replayed. A decode step changes the allocator's
decisions only when a growing tensor's size crosses a size where a decision flips:
a free block's size (read from the allocator after each replayed step, `_marks`), the
block less 1 MiB (the large pool's split rule) or less one of the step's temporaries, the
room its own block leaves when freed (`_extents`), the 2 MiB grid of large segments
(`kRoundLarge`, `_crossings`) and the shares of a 2 MiB or 20 MiB segment
(`_shared_marks`). With eager attention the step's growing temporaries (repeat_kv's
copies, the scores, the masks: `_eager_transients`) cross the same sizes, and the largest
of them crossing into a new 2 MiB segment counts too. Only the steps at a crossing (and the
one after it, where the rotating spare block moves) are replayed, with the first and the
last two. Every growing tensor holds `length` tokens (a sliding one up to its window), so
the next crossing is computed, not searched: the smallest threshold above the last
replayed size, divided by the bytes per token (`_next_crossing`, `_first_length`); the loop
runs once per crossing, not once per token.

The crossings stop where the decode settles, and the rest is summed in closed form:
- sdpa: once the cache tensors are larger than any other block or request, they only ever
  fit in segments made for them: each time their 2 MiB-rounded size grows, each of the
  `c` growing tensors gets a new segment and one more rotates between them (c + 1), and
  the outgrown ones stay cached (`inference.growing_tensors_reserved`, `_closed_form`).
- eager: the largest request is repeat_kv's copy (`_largest_per_token`), and the other
  growing tensors end up in its outgrown segments. The pattern (k1 new segments of its new
  size when it outgrows its segment, k2 at the next step, none anywhere else) is read from
  the replayed steps, not derived (`_eager_profile`): it must hold on the last
  `EAGER_LEVELS_SEEN` levels, with no free block but that level's new segments holding the
  largest request, and no growing request changing pool (1 MiB, 10 MiB: `_pool_changes`)
  within `EAGER_LEVELS_AHEAD` levels; then `_level_sum` adds (k1 + k2) segments per level,
  an arithmetic series.
The last step is replayed after the cache tensors are set to their final length (`_jump`),
for its allocated bytes. The cost then depends on where the decode settles (the model's
and the prefill's blocks, the lengths where a growing request changes pool), not on the
number of new tokens. tests/memory/program/test_inference_program.py checks both shortcuts
against the replay of every step (`shortcut=False`); docs/memory-model.md lists where they differ.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import count

from pydantic import ValidationError

from vramcalc.memory.allocator.replay import (
    LARGE_BUFFER,
    MIN_BLOCK,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
    Block,
    CachingAllocator,
    allocation_size,
    replay_requests,
    requested_run,
    round_size,
)
from vramcalc.memory.effective import attention_impl
from vramcalc.memory.program.activations import OUTLIER_ROLES, int8_outlier_fraction
from vramcalc.memory.program.kv_cache import CUBLAS_WORKSPACE_INFER, cached_len, kv_token_bytes
from vramcalc.memory.program.load import MIN_REQUEST, load_requests
from vramcalc.memory.program.trainable import lora_targets
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    NF4_BLOCKSIZE,
    ceil_div,
    gemm_4bit_dequantizes,
)
from vramcalc.models.spec import (
    SCALED_EMBEDDING_FAMILIES,
    LinearShape,
    ModelSpec,
    layer_windows,
    sdpa_window_masks,
)
from vramcalc.plans import InferPlan, TrainPlan

# A decode step's temporaries of the small pool (1 MiB and less) are left out: they take
# and give back the same small blocks every step, next to the large pool's cache tensors,
# dequantized weights and logits, and left in they are most of the requests of a step.
DECODE_SMALLEST = SMALL_SIZE + 1


class _Emit:
    """Requests of one stretch of the program; ids positive (load_requests' are negative)."""

    def __init__(self, ids: count[int], smallest: int = MIN_REQUEST) -> None:
        self.out: list[tuple[int, int]] = []
        self._ids = ids
        self._smallest = smallest  # requests below this (cache tensors excepted) left out
        self.largest_other = 0  # the largest request that is not a cache tensor

    def alloc(self, size: int, cache: bool = False) -> int | None:
        if size < (MIN_REQUEST if cache else self._smallest):
            return None
        if not cache:
            self.largest_other = max(self.largest_other, size)
        tid = next(self._ids)
        self.out.append((tid, size))
        return tid

    def free(self, *tids: int | None) -> None:
        for tid in tids:
            if tid is not None:
                self.out.append((tid, 0))


@dataclass
class _Cache:
    """One layer's keys and values: tensor ids and the tokens their storage holds."""

    window: int | None
    keys: int | None = None
    values: int | None = None
    tokens: int = 0


@dataclass(frozen=True)
class _Shape:
    spec: ModelSpec
    plan: InferPlan
    c: int  # compute dtype bytes
    a: int  # adapter dtype bytes
    targets: frozenset[str]
    eager: bool
    per_token: int  # one token of one layer's keys, whole batch


def _shape(spec: ModelSpec, plan: InferPlan) -> _Shape:
    targets = frozenset() if plan.merged else frozenset(
        lin.name for lin in lora_targets(spec, plan.lora_plan()))
    return _Shape(spec, plan, DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.adapter_dtype],
                  targets, attention_impl(spec, plan.attn) == "eager", kv_token_bytes(spec, plan))


def _linear(e: _Emit, s: _Shape, lin: LinearShape, tokens: int) -> int | None:
    """One Linear call (inference.linear_peak): returns its output's id."""
    plan, c = s.plan, s.c
    out_c = tokens * lin.out_features * c
    tmp: list[int | None] = []
    if plan.quant in ("nf4", "fp4") and gemm_4bit_dequantizes(tokens, lin.out_features,
                                                             lin.in_features):
        # bitsandbytes 0.50 backends/cuda/ops.py _dequant_linear_fallback: with double
        # quantization the fp32 absmax is dequantized (`absmax_dq`) and offset (`absmax_dq
        # + absmax_offset`, a second one), then the weight (`B_dq`), then F.linear; all
        # three freed when it returns (recorded, run 32 tr-il03 at ops.py:911-916)
        n_absmax = 4 * ceil_div(lin.weight_numel, NF4_BLOCKSIZE)
        if plan.double_quant:
            tmp += [e.alloc(n_absmax), e.alloc(n_absmax)]
        tmp.append(e.alloc(lin.weight_numel * c))
    if plan.quant == "int8":
        out = _int8_matmul(e, s, lin, tokens)
    else:
        out = e.alloc(out_c)
    e.free(*tmp)
    if lin.name not in s.targets:
        return out
    # peft 0.21 tuners/lora/bnb.py Linear4bit.forward: `result = self.base_layer(x).clone()`
    # (Linear8bitLt.forward makes no clone); then, with autocast off as in generate()
    # (`requires_conversion`), x cast to the adapter dtype (_cast_input_dtype),
    # `output = lora_B(lora_A(dropout(x))) * scaling` (lora_A's output, an argument, freed
    # when lora_B returns), `output = output.to(expected_dtype)`, `result = result +
    # output` in the result's dtype; x and output are freed when forward returns
    # (recorded, run 32 tr-il03: `+clone -out +x32 +A +B -A +B*s -B +to -B*s +sum -clone
    # -x32 -to` at bnb.py:533-552)
    wide = max(s.a, c)
    if plan.quant != "none":
        if plan.quant in ("nf4", "fp4"):
            clone = e.alloc(out_c)
            e.free(out)
            out = clone
        x_a, scaled = _adapter(e, s, lin, tokens)
        if s.a != c:  # output.to(expected_dtype)
            conv = e.alloc(out_c)
            e.free(scaled)
            scaled = conv
        total = e.alloc(out_c)  # result + output
        e.free(out, x_a, scaled)
        return total
    # tuners/lora/layer.py Linear.forward (16-bit bases): x cast to the adapter dtype,
    # `result = result + lora_B(lora_A(dropout(x))) * scaling` (promoted to the wider
    # dtype), then `result.to(torch_result_dtype)`
    x_a, scaled = _adapter(e, s, lin, tokens)
    total = e.alloc(tokens * lin.out_features * wide)  # result + output (promoted)
    e.free(scaled, out)
    if wide != c:  # result.to(torch_result_dtype)
        back = e.alloc(out_c)
        e.free(total)
        total = back
    e.free(x_a)
    return total


def _int8_matmul(e: _Emit, s: _Shape, lin: LinearShape, tokens: int) -> int | None:
    """bnb Linear8bitLt.forward under no_grad (bitsandbytes 0.50.2 nn/modules.py ->
    autograd/_functions.py `MatMul8bitLt.forward`, has_fp16_weights False, threshold 6.0):
    returns its output's id.

    `F.int8_vectorwise_quant(A.to(torch.float16), threshold)` (backends/cuda/ops.py):
    the fp16 copy of x (none for an fp16 x), the row stats (fp32, one per row), the int8
    rows CA, `outliers = A.abs() >= threshold` (the fp16 abs, freed once compared, and
    the bool), then, where any element passes, `argwhere(outliers.any(dim=0))`; the bool
    and the fp16 copy are freed when it returns. `int8_mixed_scaled_mm`
    (backends/default/ops.py) with outlier columns: subA = `A[:, outlier_cols]
    .contiguous()` in x's dtype, subB = `int8_vectorwise_dequant(CB[:, cols]
    .contiguous(), SCB)` (int8 o x n, two fp32 products, `.to(A.dtype)`); then
    `int8_scaled_mm`: the int32 product (`int8_linear_matmul`), its fp16 dequant
    (`int8_mm_dequant`, `out.to(dtype)` a copy unless fp16), the int32 and the fp16
    freed; with outlier columns `output.addmm(subA, subB)` is a new output, the old one and
    subB freed. Under no_grad `ctx.tensors` keeps nothing: CA, the row stats and subA are
    freed when forward returns, in that order (its locals). Which columns pass depends
    on the weights and the data: the down projection's input is counted as
    `activations.int8_outlier_fraction` (as the training program, step._int8_matmul),
    every other Linear's input (a norm output or the attention output) as none.
    (Recorded, run 36 tr-ik09 qwen2.5-7b@4L int8 b8 p8192, events 602-671 (q_proj) and
    1230-1300 (down_proj, every column an outlier): `+A16 +SCA +CA +abs +bool -abs -bool
    -A16 [+subA +CBc +f32 +f32 -f32 -CBc +subB -f32] +i32 +f16 +out -f16 -i32 [+addmm
    -out -subB] -CA -SCA [-subA]`.)"""
    c = s.c
    fp16 = s.plan.compute_dtype == "fp16"  # `.to(torch.float16)` returns x itself
    t, i, o = tokens, lin.in_features, lin.out_features
    a16 = None if fp16 else e.alloc(t * i * 2)
    sca = e.alloc(t * 4)
    ca = e.alloc(t * i)
    absa = e.alloc(t * i * 2)  # A.abs()
    over = e.alloc(t * i)  # >= threshold
    e.free(absa, over, a16)
    frac = int8_outlier_fraction(s.spec, t) if lin.role in OUTLIER_ROLES else 0.0
    cols = int(frac * i)
    sub_a = sub_b = None
    if cols:
        sub_a = e.alloc(t * cols * c)
        cb_cols = e.alloc(o * cols)
        first = e.alloc(o * cols * 4)
        sub_b = e.alloc(o * cols * 4)
        e.free(first, cb_cols)
        if c != 4:
            cast = e.alloc(o * cols * c)
            e.free(sub_b)
            sub_b = cast
    prod = e.alloc(t * o * 4)
    out = e.alloc(t * o * 2)
    if not fp16:
        cast = e.alloc(t * o * c)
        e.free(out)
        out = cast
    e.free(prod)
    if cols:
        summed = e.alloc(t * o * c)
        e.free(out, sub_b)
        out = summed
    e.free(ca, sca, sub_a)
    return out


def _adapter(e: _Emit, s: _Shape, lin: LinearShape, tokens: int) -> tuple[int | None, int | None]:
    """`lora_B(lora_A(dropout(x))) * scaling` in the adapter dtype, x cast to it first
    where it differs from the compute dtype: the ids of that cast (None without one) and of
    the scaled output; lora_A's and lora_B's outputs are freed."""
    x_a = e.alloc(tokens * lin.in_features * s.a) if s.a != s.c else None
    a_out = e.alloc(tokens * s.plan.rank * s.a)
    b_out = e.alloc(tokens * lin.out_features * s.a)
    e.free(a_out)
    scaled = e.alloc(tokens * lin.out_features * s.a)  # * scaling
    e.free(b_out)
    return x_a, scaled


def _norm(e: _Emit, s: _Shape, tokens: int, width: int | None = None) -> int | None:
    """One norm over `tokens` rows of `width` (the hidden size unless given).

    RMSNorm, transformers 5.17 modeling_llama LlamaRMSNorm.forward: `x.to(float32)`, its
    `pow(2)` (freed once `mean` reduced it), `x * rsqrt(...)` (the fp32 copy freed when
    the name is rebound), `self.weight * x.to(input_dtype)` (the cast freed after the
    product, the fp32 product when forward returns). Gemma's (models.spec
    FP32_SCALED_NORM_FAMILIES; modeling_gemma2 Gemma2RMSNorm.forward `output =
    self._norm(x.float()); output = output * (1.0 + self.weight.float()); return
    output.type_as(x)`) scales in fp32 first (recorded, run 32 tr-il03: `+x32 +pow -pow
    +normed -x32 +scaled -normed +out -scaled` at modeling_gemma2.py:56-63). In fp32
    (compute dtype fp32) the casts are no-ops. LayerNorm is kept as an fp32 upcast and
    product (not traced)."""
    n = tokens * (s.spec.hidden_size if width is None else width)
    c = s.c
    if s.spec.norm != "rmsnorm":
        up = e.alloc(n * 4)
        prod = e.alloc(n * 4)
        e.free(up)
        out = e.alloc(n * c)
        e.free(prod)
        return out
    up = e.alloc(n * 4) if c != 4 else None
    e.free(e.alloc(n * 4))  # pow(2), reduced by mean
    normed = e.alloc(n * 4)
    e.free(up)
    if s.spec.norm_scales_in_fp32:
        scaled = e.alloc(n * 4)
        e.free(normed)
        if c == 4:
            return scaled
        out = e.alloc(n * c)
        e.free(scaled)
        return out
    cast = e.alloc(n * c) if c != 4 else None
    out = e.alloc(n * c)
    e.free(cast, normed)
    return out


def _rotary(e: _Emit, size: int, passthrough: bool = False) -> int | None:
    """`(x * cos) + (rotate_half(x) * sin)` (modeling_llama apply_rotary_pos_emb):
    rotate_half is `torch.cat((-x2, x1), dim=-1)`, a half-size negation first (recorded,
    run 32 tr-il03: `+x*cos +(-x2) +cat -(-x2) +*sin -cat +sum` at modeling_gemma2.py:143,
    167). `passthrough` (ROTARY_PASSTHROUGH_FAMILIES): the sum is then concatenated with
    the unrotated part, `torch.cat([(x_rot * cos) + ..., x_pass], dim=-1)`, a copy even
    where `x_pass` is empty, and the sum is freed (recorded, run 34 tr-ih04: `... +sum -x*cos
    -*sin +cat -sum` at modeling_phi3.py:195)."""
    t1 = e.alloc(size)
    neg = e.alloc(size // 2)
    rh = e.alloc(size)
    e.free(neg)
    t2 = e.alloc(size)
    e.free(rh)
    out = e.alloc(size)
    e.free(t1, t2)
    if passthrough:
        cat = e.alloc(size)
        e.free(out)
        out = cat
    return out


def _qk_norm(e: _Emit, s: _Shape, x: int | None, tokens: int, size: int) -> int | None:
    """Qwen-3's q_norm / k_norm (an RMSNorm over each head, or over the whole projection:
    ModelSpec.qk_norm_width) of a projection's output, which is freed after it."""
    width = s.spec.head_size if s.spec.qk_norm_width == "head" else size
    out = _norm(e, s, tokens * size // width, width)
    e.free(x)
    return out


def _update(e: _Emit, s: _Shape, cache: _Cache, new_tokens: int, length: int,
            prefill: bool) -> None:
    """The cache update of one layer after `length` tokens (inference.kv_cache_bytes)."""
    if s.plan.cache == "static":
        if cache.keys is None:  # StaticLayer.lazy_initialization: the full length
            cap = s.plan.total_len
            n = min(cap, cache.window) if cache.window else cap
            cache.keys = e.alloc(s.per_token * n, cache=True)
            cache.values = e.alloc(s.per_token * n, cache=True)
            cache.tokens = n
        return
    n = cached_len(length, cache.window, prefill)
    for name in ("keys", "values"):
        new = e.alloc(s.per_token * n, cache=True)  # torch.cat: new before old is freed
        e.free(getattr(cache, name))
        setattr(cache, name, new)
    cache.tokens = n


def _attention(e: _Emit, s: _Shape, x: int | None, tokens: int, cache: _Cache, length: int,
               prefill: bool) -> tuple[int | None, int | None]:
    """Attention half (inference._attention_peak): (output, probabilities kept)."""
    spec, c, batch = s.spec, s.c, s.plan.batch_size
    lins = {lin.role: lin for lin in spec.block_linears()}
    q_c, kv_c = tokens * spec.q_size * c, tokens * spec.kv_size * c
    held = None
    if spec.attention_layout == "separate":
        q = _linear(e, s, lins["q"], tokens)
        if spec.qk_norm:  # modeling_qwen3: `self.q_norm(self.q_proj(x).view(...))`
            q = _qk_norm(e, s, q, tokens, spec.q_size)
        k = _linear(e, s, lins["k"], tokens)
        if spec.qk_norm:
            k = _qk_norm(e, s, k, tokens, spec.kv_size)
        v = _linear(e, s, lins["v"], tokens)
    else:
        held = _linear(e, s, lins["qkv"], tokens)
        if spec.model_type in QKV_VIEW_FAMILIES:
            q = k = v = None  # views of the fused output (QKV_VIEW_FAMILIES)
        else:
            q, k, v = e.alloc(q_c), e.alloc(kv_c), e.alloc(kv_c)
    passthrough = spec.model_type in ROTARY_PASSTHROUGH_FAMILIES
    q_rot = _rotary(e, q_c, passthrough)
    k_rot = _rotary(e, kv_c, passthrough)
    e.free(q, k)
    _update(e, s, cache, tokens // batch, length, prefill)
    e.free(k_rot, v)
    queries = tokens // batch
    kv_len = length
    probs = None
    if s.eager:
        # transformers 5.17 modeling_llama / modeling_gemma2 eager_attention_forward:
        # repeat_kv (a copy only where heads are grouped), `torch.matmul(query,
        # key_states.transpose(2, 3))` (the query, a transposed view of q_proj's output,
        # is copied for the batched matmul, freed after it, where aten matmul's fold of
        # the batch and head dimensions (`reshape`) cannot be a view: more than one
        # sequence and more than one position), `* scaling`, Gemma-2's softcapping (/ cap, tanh,
        # * cap), `+ attention_mask`: each a new scores-sized tensor, the previous one
        # freed. `softmax(attn_weights, dtype=float32).to(query.dtype)`: an fp32 copy of
        # the input and the softmax's result, then the cast, while the masked scores are
        # still bound to `attn_weights` (freed when the name is rebound, after the cast).
        # `torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()`: the
        # product and its copy. (Recorded, run 32 tr-il03: `+q +S -q +S -S ... +S32 +P32
        # -S32 +P -P32 -S +O +Oc -O` at modeling_gemma2.py:201-214.)
        grouped = spec.kv_heads != spec.num_attention_heads
        full_kv = batch * spec.num_attention_heads * kv_len * spec.head_size * c
        reps = [e.alloc(full_kv), e.alloc(full_kv)] if grouped else []  # repeat_kv
        scores_n = batch * spec.num_attention_heads * queries * kv_len
        q_copy = e.alloc(q_c) if queries > 1 and batch > 1 else None
        scores = e.alloc(scores_n * c)
        e.free(q_copy)
        for _ in range(1 + (3 if spec.attn_logit_softcapping else 0) + 1):
            nxt = e.alloc(scores_n * c)
            e.free(scores)
            scores = nxt
        s32 = e.alloc(scores_n * 4) if c != 4 else None  # softmax's fp32 copy
        p32 = e.alloc(scores_n * 4)
        e.free(s32)
        if c != 4:
            probs = e.alloc(scores_n * c)  # .to(dtype), returned as attn_weights
            e.free(p32)
        else:
            probs = p32
        e.free(scores)
        out = e.alloc(q_c)
        if queries > 1:  # transpose(1, 2).contiguous()
            cont = e.alloc(q_c)
            e.free(out)
            out = cont
        e.free(*reps)
    else:
        # A sliding layer past its window gets the prefill's bool mask (_forward): with a
        # mask transformers repeats the grouped keys and values to every head first
        # (integrations/sdpa_attention.py use_gqa_in_sdpa, sdpa_attention_forward:
        # repeat_kv), and aten turns the bool mask into an additive one in the query dtype
        # (convert_boolean_attn_mask), both freed after the call (step.py's _attention
        # has the same, traced in run 28's g004)
        temps: list[int | None] = []
        if prefill and cache.window is not None and length >= cache.window:
            if spec.kv_heads != spec.num_attention_heads:
                full_kv = batch * spec.num_attention_heads * length * spec.head_size * c
                temps += [e.alloc(full_kv), e.alloc(full_kv)]
            temps.append(e.alloc(batch * queries * length * c))
        out = e.alloc(q_c)
        lse = e.alloc(batch * spec.num_attention_heads * queries * 4)
        e.free(lse, *temps)
        # Without a mask, in bf16 / fp16, sdpa runs the flash kernel, whose output takes
        # the query's strides (torch 2.11 aten/src/ATen/native/transformers/cuda/
        # attention.cu _scaled_dot_product_flash_attention_cuda passes
        # `query.transpose(1, 2)` to flash_attn/flash_api.cpp mha_fwd, which makes `out =
        # at::empty_like(q_padded)`, and returns `output.transpose(1, 2)`). A query that
        # a cat made (ROTARY_PASSTHROUGH_FAMILIES) is contiguous in (batch, heads, seq,
        # dim) order, so sdpa_attention_forward's `attn_output.transpose(1, 2)
        # .contiguous()` copies it (recorded, run 34 tr-ih04: `+out +copy -out` at
        # sdpa_attention.py:158, 168); llama's rotary sum keeps the projection's (batch,
        # seq, heads, dim) order, and there it copies nothing (ik08).
        if passthrough and not temps and c != 4 and queries > 1:
            cont = e.alloc(q_c)
            e.free(out)
            out = cont
    o = _linear(e, s, lins["o"], tokens)
    # attn_output is freed when o_proj's output is bound to its name, then the fused
    # projection and the rotated query when the attention's forward returns (recorded, run
    # 34 tr-ih04: `-out -qkv -q` after o_proj, modeling_phi3.py)
    e.free(out, held, q_rot)
    return o, probs


def _mlp(e: _Emit, s: _Shape, x: int | None, tokens: int) -> int | None:
    """MLP half (inference._mlp_peak)."""
    spec, c = s.spec, s.c
    lins = {lin.role: lin for lin in spec.block_linears()}
    i_c = tokens * spec.expert_intermediate_size * c
    if spec.is_moe:
        widest = max((lin for lin in spec.block_linears()
                      if lin.role not in ("q", "k", "v", "qkv", "o")),
                     key=lambda lin: lin.weight_numel, default=None)
        tmp = [e.alloc(i_c) for _ in range(3)]
        out = _linear(e, s, widest, tokens) if widest is not None else None
        e.free(*tmp)
        if out is None or widest is None or widest.out_features != spec.hidden_size:
            e.free(out)
            out = e.alloc(tokens * spec.hidden_size * c)
        return out
    if spec.mlp_layout == "gated":
        gate = _linear(e, s, lins["gate"], tokens)
        act = e.alloc(i_c)
        e.free(gate)
        up = _linear(e, s, lins["up"], tokens)
        prod = e.alloc(i_c)
        e.free(act, up)
        down = _linear(e, s, lins["down"], tokens)
        e.free(prod)
        return down
    if spec.mlp_layout == "fused_gated":
        gate_up = _linear(e, s, lins["gate_up"], tokens)
        act = e.alloc(i_c)
        prod = e.alloc(i_c)
        e.free(act)
        down = _linear(e, s, lins["down"], tokens)
        e.free(prod, gate_up)
        return down
    fc1 = _linear(e, s, lins["fc1"], tokens)
    act = e.alloc(i_c)
    e.free(fc1)
    fc2 = _linear(e, s, lins["fc2"], tokens)
    e.free(act)
    return fc2


# Families whose attention takes q, k and v as views of the fused projection: transformers
# 5.17 modeling_phi3 Phi3Attention.forward slices `qkv[..., :query_pos]` (and k, v), then
# `.view(hidden_shape).transpose(1, 2)`: no copy (recorded, run 34 tr-ih04: no request
# between qkv_proj's output and the rotary's first product). Falcon's `_split_heads`
# reshapes a transposed view, a copy, and keeps the three copies (not traced).
QKV_VIEW_FAMILIES = frozenset({"phi3"})
# Families whose apply_rotary_pos_emb concatenates the rotated part with the rest of the
# head (partial rotary): transformers 5.17 modeling_phi3 apply_rotary_pos_emb `q_embed =
# torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)` (`_rotary`).
ROTARY_PASSTHROUGH_FAMILIES = frozenset({"phi3"})


def _mask(e: _Emit, s: _Shape, queries: int, length: int, sliding: bool,
          additive: bool) -> int | None:
    """One attention mask of the model's forward (transformers 5.17 masking_utils
    sdpa_mask, non-vmap path): the mask function evaluated on broadcast indices, a
    (queries x length) bool per function, each `&`-ed into a running result
    (and_masks: `result = result & mask(...)`, the previous result and the function's
    output freed); the padding mask (generate() passes an attention_mask) broadcasts it
    to the batch; eager_mask then makes it additive in the compute dtype (`torch.where`).
    The causal mask is and_masks(causal, padding); the sliding one and_masks(and_masks(
    sliding_window_overlay, causal), padding). (Recorded, run 32 tr-il03: `+16 +16 -16
    +64 -16 +128 -64` MiB at modeling_gemma2.py:439, `+16 +16 -16 +16 +16 -16 -16 +16
    -16 +64 -16 +128 -64` at :440.)"""
    b, base = s.plan.batch_size, queries * length
    if sliding:
        overlay = e.alloc(base)
        r1 = e.alloc(base)
        e.free(overlay)
        causal = e.alloc(base)
        r2 = e.alloc(base)
        e.free(causal, r1)
        result = e.alloc(base)  # the outer and_masks' ones() & the inner result
        e.free(r2)
    else:
        causal = e.alloc(base)
        result = e.alloc(base)
        e.free(causal)
    full = e.alloc(b * base)  # & padding: the batch
    e.free(result)
    if not additive:
        return full
    out = e.alloc(b * base * s.c)
    e.free(full)
    return out


def _rope(e: _Emit, s: _Shape, tokens: int, workspace: bool) -> list[int | None]:
    """cos and sin (modeling_llama LlamaRotaryEmbedding.forward, the same in gemma2):
    `inv_freq_expanded @ position_ids_expanded` in fp32 (the forward's first matmul: the
    cuBLAS workspace is allocated there, `workspace`), `emb = torch.cat((freqs, freqs))`,
    `emb.cos() * self.attention_scaling` and the same for sin (each a new tensor),
    `.to(dtype=x.dtype)`; the fp32 tensors freed when it returns (recorded, run 32
    tr-il03 at modeling_gemma2.py:131-136: `+8 +32 +16 +16 +16 -16 +16 +16 -16 +8 +8
    -8 -16 -16 -16` MiB)."""
    d, c = s.spec.head_size, s.c
    freqs = e.alloc(tokens * d // 2 * 4)
    if workspace:
        e.alloc(CUBLAS_WORKSPACE_INFER)  # kept
    emb = e.alloc(tokens * d * 4)
    fp32: list[int | None] = []
    for _ in range(2):  # cos, sin
        raw = e.alloc(tokens * d * 4)
        fp32.append(e.alloc(tokens * d * 4))  # * attention_scaling
        e.free(raw)
    if c == 4:
        e.free(freqs, emb)
        return fp32
    out = [e.alloc(tokens * d * c) for _ in range(2)]
    e.free(freqs, emb, *fp32)
    return out


def _forward(e: _Emit, s: _Shape, caches: list[_Cache], queries: int, length: int,
             prefill: bool, carried: list[int | None],
             workspace: bool = False) -> list[int | None]:
    """One model forward of `queries` tokens per sequence ending at `length` cached tokens,
    and _sample's logits handling; returns the fp32 tensors carried into the next step.
    `workspace`: the cuBLAS workspace is allocated at this forward's first matmul."""
    spec, c, b = s.spec, s.c, s.plan.batch_size
    tokens = b * queries
    h_c = tokens * spec.hidden_size * c
    embed = e.alloc(h_c)
    if spec.model_type in SCALED_EMBEDDING_FAMILIES:
        scaled = e.alloc(h_c)
        e.free(embed)
        embed = scaled
    masks: list[int | None] = []
    if s.eager:
        # the model's forward makes one mask per kind of layer, full attention first
        # (modeling_gemma2 Gemma2Model.forward causal_mask_mapping)
        kinds = sorted({w is not None for w in layer_windows(spec)})
        masks = [_mask(e, s, queries, length, sliding, True) for sliding in kinds]
    elif prefill and sdpa_window_masks(spec, length):
        masks = [_mask(e, s, queries, length, True, False)]
    rope = _rope(e, s, tokens, workspace)
    post_norms = spec.norms_per_layer == 4  # Gemma-2/3: after attention and after the MLP
    x = embed
    for cache in caches:
        normed = _norm(e, s, tokens)
        attn, probs = _attention(e, s, normed, tokens, cache, length, prefill)
        e.free(normed)
        if post_norms:  # post_attention_layernorm
            post = _norm(e, s, tokens)
            e.free(attn)
            attn = post
        h = e.alloc(h_c)  # residual + attention output
        e.free(attn)
        normed = _norm(e, s, tokens)
        mlp = _mlp(e, s, normed, tokens)
        e.free(normed)
        if post_norms:  # post_feedforward_layernorm
            post = _norm(e, s, tokens)
            e.free(mlp)
            mlp = post
        out = e.alloc(h_c)
        e.free(mlp, h, probs)
        if x != embed:
            e.free(x)
        x = out
    normed = _norm(e, s, tokens)
    if x != embed:
        e.free(x)
    e.free(*masks, embed, *rope)  # the mask mapping, inputs_embeds, cos and sin
    logits = e.alloc(b * spec.vocab_size * c)  # logits_to_keep=1
    if spec.final_logit_softcapping:  # Gemma-2: / cap, tanh, * cap
        for _ in range(3):
            nxt = e.alloc(b * spec.vocab_size * c)
            e.free(logits)
            logits = nxt
    e.free(normed)
    new = [e.alloc(b * spec.vocab_size * 4) for _ in range(len(carried))]
    e.free(*carried)
    e.free(logits)
    return new


def _merge(e: _Emit, s: _Shape) -> None:
    """merge_and_unload() of a merged plan, per targeted Linear (inference._merge_transient):
    16-bit: the delta (B @ A, then * scaling) added in place; 4-bit: the weight dequantized,
    the delta, their sum, then requantized (a packed weight of the same size replaces the
    old one)."""
    spec, plan = s.spec, s.plan
    targets = lora_targets(spec, plan.lora_plan())
    wide = max(s.a, s.c)
    for _ in range(spec.num_hidden_layers):
        for lin in targets:
            n = lin.weight_numel
            deq = e.alloc(n * s.c) if plan.quant != "none" else None
            d1 = e.alloc(n * s.a)
            d2 = e.alloc(n * s.a)
            e.free(d1)
            total = e.alloc(n * wide) if plan.quant != "none" else None
            e.free(d2, deq, total)
            if plan.quant in ("nf4", "fp4"):
                e.free(e.alloc(ceil_div(n, 2)))


@dataclass(frozen=True)
class InferPeaks:
    """The program replayed: peaks over generate() (load included in reserved, as the
    worker measures from before `from_pretrained`)."""

    load_allocated: int  # allocated when generate() starts
    load_reserved: int
    prefill_allocated: int  # peak over the prefill (forward and sampling)
    decode_allocated: int  # peak over the decode steps (0 with one new token)
    peak_allocated: int
    peak_reserved: int
    requests: int  # requests replayed (the cost)
    steps_replayed: int  # decode steps replayed one by one
    closed_form_bytes: int  # reserved added by the closed form past the replayed steps
    # the rounded request bytes alive (replay.requested_run) at their peak over the prefill
    # and over the decode: unlike allocated bytes they do not depend on where a request
    # lands (a block's unsplit rest), so they grow with the batch, the prompt and the new
    # tokens; required memory rests on them (docs/memory-model.md "Required memory never
    # falls")
    prefill_requested: int = 0
    decode_requested: int = 0


def _load_plan(plan: InferPlan) -> TrainPlan | None:
    try:
        return TrainPlan(method="qlora" if plan.quant != "none" else "lora", quant=plan.quant,
                         double_quant=plan.double_quant, compute_dtype=plan.compute_dtype,
                         rank=plan.rank, targets=plan.targets)
    except ValidationError:
        return None


def _crossings(lo: int, hi: int, offsets: list[int]) -> bool:
    """Whether some size v = k * 2 MiB + offset lies in (lo, hi]."""
    return any((hi - off) // ROUND_LARGE != (lo - off) // ROUND_LARGE for off in offsets)


def _crossed(lo: int, hi: int, offsets: list[int], marks: list[int]) -> bool:
    """Whether a size growing from `lo` to `hi` crosses a grid point or a mark."""
    return _crossings(lo, hi, offsets) or bisect_left(marks, lo + 1) != bisect_left(
        marks, hi + 1)


def _threshold(lo: int, offsets: list[int], marks: list[int]) -> int:
    """The smallest size above `lo` that `_crossed` counts: a grid point or a mark."""
    above = bisect_left(marks, lo + 1)
    return min([_next_grid(lo, off) for off in offsets]
               + ([marks[above]] if above < len(marks) else []))


def _eager_transients(s: _Shape) -> list[int]:
    """Bytes per cached token of the growing temporaries of an eager decode step
    (`_attention`, `_forward`): repeat_kv's copies, the bf16 and fp32 scores, the masks."""
    spec, b = s.spec, s.plan.batch_size
    heads = b * spec.num_attention_heads
    return sorted({_largest_per_token(s), heads * s.c, heads * 4, b * s.c})


def _next_grid(size: int, offset: int) -> int:
    """The smallest k * 2 MiB + offset above `size` (`_crossings`' grid)."""
    return offset + ROUND_LARGE * ((size - offset) // ROUND_LARGE + 1)


def _largest_per_token(s: _Shape) -> int:
    """Bytes per cached token of a decode step's largest growing request: eager
    attention's repeat_kv copies (every query head, `_attention`), else a cache tensor."""
    if s.eager:
        return s.per_token * s.spec.num_attention_heads // s.spec.kv_heads
    return s.per_token


def _level(x: int, length: int) -> int:
    """The segment a request of `x * length` bytes gets when no free block holds it."""
    return allocation_size(round_size(x * length))


# levels of the largest growing request seen with the same new segments before the tail
EAGER_LEVELS_SEEN = 4
# a pool change of a growing request closer than this many levels is replayed through
EAGER_LEVELS_AHEAD = 64


def _pool_changes(s: _Shape, n: int, last: int) -> list[int]:
    """Lengths in (n, last] where one of an eager decode step's growing requests changes
    how it is served: past 1 MiB it enters the replay (`DECODE_SMALLEST`) and the large
    pool, past 10 MiB it gets 2 MiB-rounded segments of its own (`allocation_size`):
    the cache tensors, repeat_kv's copies, the masks, the bf16 and fp32 scores."""
    out = {_first_length(x, edge + MIN_BLOCK) for x in [s.per_token, *_eager_transients(s)]
           for edge in (SMALL_SIZE, MIN_LARGE_ALLOC - MIN_BLOCK)}
    return sorted(m for m in out if n < m <= last)


def _eager_profile(seen: list[tuple[int, int, int]], x: int, changes: list[int],
                   free: list[int]) -> tuple[int, int] | None:
    """(k1, k2) once the replayed steps show the eager decode's steady pattern, else None.

    The pattern: each time the largest growing request (`_largest_per_token`, 2 MiB-rounded)
    outgrows its segment, k1 new segments of its new size at that step and k2 at the next
    one, and no other segment anywhere (every other request finds a free block: an outgrown
    segment of a larger class, or its own). It is read, not derived: it must hold on the
    last `EAGER_LEVELS_SEEN` levels, every replayed step between them included, in the
    large pool (past 20 MiB, where a level is one 2 MiB step) and with levels of at least
    two steps (x below 1 MiB per token), or no tail is taken."""
    if x + MIN_BLOCK > ROUND_LARGE // 2:
        return None
    n = seen[-1][0]
    made = sum(segs for m, segs, _ in seen if _level(x, m) == _level(x, n))
    if sum(1 for f in free if f >= round_size(x * n)) > made:
        return None  # a free block other than this level's new segments holds the largest
    starts = [i for i, (n, _, _) in enumerate(seen) if _level(x, n) > _level(x, n - 1)]
    # the latest level start whose next step was replayed too
    while starts and (starts[-1] + 1 >= len(seen)
                      or seen[starts[-1] + 1][0] != seen[starts[-1]][0] + 1):
        starts.pop()
    if len(starts) < EAGER_LEVELS_SEEN:
        return None
    first = starts[-EAGER_LEVELS_SEEN]
    if _level(x, seen[first][0] - 1) <= LARGE_BUFFER:
        return None
    k1 = seen[starts[-1]][1]
    k2 = seen[starts[-1] + 1][1]
    if k1 == 0:  # the largest request still fits in a free block: not the steady state
        return None
    if changes and _level(x, changes[0]) - _level(x, seen[-1][0]) \
            <= EAGER_LEVELS_AHEAD * ROUND_LARGE:
        return None  # a request changes pool soon: replay through it
    for n, segs, nbytes in seen[first:starts[-1] + 2]:
        k = (k1 if _level(x, n) > _level(x, n - 1) else 0) + (
            k2 if _level(x, n - 1) > _level(x, n - 2) else 0)
        if segs != k or nbytes != k * _level(x, n):
            return None
    return k1, k2


def _level_sum(x: int, k1: int, k2: int, done: int, last: int) -> int:
    """Reserved bytes the steady pattern (`_eager_profile`) adds after length `done`, up to
    `last`: k1 + k2 segments of each new level, the k2 of a level that starts at `last`
    left out. Levels grow by one 2 MiB step at a time (x < 1 MiB per token, large pool), so
    the sum is an arithmetic series."""
    lo, hi = _level(x, done), _level(x, last)
    m = (hi - lo) // ROUND_LARGE  # levels after `done`
    if m == 0:
        return 0
    total = (k1 + k2) * (m * lo + ROUND_LARGE * m * (m + 1) // 2)
    if _first_length(x, hi - ROUND_LARGE + MIN_BLOCK) == last:
        total -= k2 * hi
    return total


def _growing_until(s: _Shape, caches: list[_Cache], last: int) -> int:
    """The last cache length at which some cache tensor still grows (0: none grows)."""
    if s.plan.cache == "static":
        return 0
    return max(last if c.window is None else min(c.window, last) for c in caches)


def _first_length(per_token: int, size: int) -> int:
    """The smallest length L with round_size(per_token * L) >= size."""
    if size <= MIN_BLOCK:
        return 1
    return MIN_BLOCK * (ceil_div(size, MIN_BLOCK) - 1) // per_token + 1


def _next_crossing(s: _Shape, caches: list[_Cache], n: int, last: int, prev_sizes: list[int],
                   marks: list[int], offsets: list[int]) -> int:
    """The first length after `n` whose growing size crosses a mark or a grid point above
    the last replayed step's (`prev_sizes`), or where the set of growing sizes changes;
    `last + 1` if none does. Every growing tensor holds `cached_len` = the length tokens
    while it grows (a sliding one up to its window), so the growing sizes are one,
    round_size(per_token * length): its first value at or past the next threshold is
    `_first_length` of that threshold."""
    until = _growing_until(s, caches, last)
    if not prev_sizes:
        return last + 1  # nothing grows any more
    (lo,) = prev_sizes  # one size (_growing_sizes at equal lengths)
    first = max(n + 1, _first_length(s.per_token, _threshold(lo, offsets, marks)))
    # past `until` no size grows: `_growing_sizes` drops the group (a crossing)
    return max(n + 1, min(first, until + 1))


def _growing_sizes(s: _Shape, caches: list[_Cache], length: int) -> list[int]:
    """Storage bytes of each still-growing cache group at `length` tokens."""
    if s.plan.cache == "static":
        return []
    sizes = {round_size(s.per_token * cached_len(length, c.window, False)) for c in caches
             if c.window is None or length <= c.window}
    return sorted(sizes)


def _prefill(s: _Shape, ids: count[int]) -> tuple[_Emit, list[_Cache], list[int | None]]:
    """The prefill's requests (the first forward over the prompt and its sampling), the
    caches it fills and the fp32 logits it carries into the first decode step."""
    caches = [_Cache(w) for w in layer_windows(s.spec)]
    e = _Emit(ids)
    p = s.plan.prompt_len
    carried = _forward(e, s, caches, p, p, True, [None] * 2, workspace=True)
    return e, caches, carried


def prefill_requests(spec: ModelSpec, plan: InferPlan) -> list[tuple[int, int]]:
    """The prefill's (tensor id, bytes) requests as `infer_program_peaks` replays them
    after loading (ids from 1; bytes 0 frees), for comparing with a recorded trace."""
    return _prefill(_shape(spec, plan), count(1))[0].out


def infer_program_peaks(spec: ModelSpec, plan: InferPlan, shortcut: bool = True) -> InferPeaks:
    """Replay the load, the prefill and the decode steps of `generate()` (module doc);
    `shortcut=False` replays every decode step (the reference of the shortcuts)."""
    s = _shape(spec, plan)
    ids = count(1)
    # new segments at descending addresses, as CUDA gave them (run 34 tr-ih04, run 34b
    # tr-ip00: every large segment of generate() below the one before), since best fit
    # breaks ties between free blocks of one size by address (replay.CachingAllocator);
    # ascending, the same requests reserve 1332 MiB against the measured 1268 (ih04)
    sim = CachingAllocator(descending=True)
    live: dict[int, Block] = {}
    nreq = 0
    alive: dict[int, int] = {}  # the rounded size of each live request
    requested = requested_peak = 0  # their total, and its peak since the last reset

    def run(reqs: list[tuple[int, int]]) -> None:
        nonlocal requested, requested_peak
        replay_requests(reqs, sim=sim, live=live)
        requested, peak = requested_run(alive, requested, reqs)
        requested_peak = max(requested_peak, peak)

    load_plan = _load_plan(plan)
    if load_plan is not None:
        reqs = load_requests(spec, load_plan, kbit_prepare=False,
                             adapter_dtype=plan.adapter_dtype)
        nreq += len(reqs)
        run(reqs)
    if plan.merged:
        e = _Emit(ids)
        _merge(e, s)
        run(e.out)
        nreq += len(e.out)
    load_allocated, load_reserved = sim.allocated, sim.peak_reserved
    p = plan.prompt_len
    e, caches, carried = _prefill(s, ids)
    sim.peak_allocated = sim.allocated
    requested_peak = requested
    run(e.out)
    nreq += len(e.out)
    prefill_allocated = sim.peak_allocated
    prefill_requested = requested_peak
    decode_requested = 0
    last = plan.total_len  # the cache's length after the last decode step
    decode_allocated = 0
    steps = 0
    closed = 0
    jumped_reserved = 0
    jumped = False
    if plan.new_tokens > 1:
        sim.peak_allocated = sim.allocated
        requested_peak = requested
        # the constant temporaries of a decode step, for the crossings' offsets
        probe = _Emit(count(1), DECODE_SMALLEST)
        _forward(probe, s, [_Cache(c.window, None, None, c.tokens) for c in caches], 1, p + 1,
                 False, [None] * 2)
        temps = sorted({round_size(sz) for _, sz in probe.out if sz > 0})
        offsets = sorted({0, SMALL_SIZE} | {(-t) % ROUND_LARGE for t in temps})
        # the blocks left free by loading and the prefill: a cache tensor moves into one
        # while it fits, and its remainder takes temporaries (absolute thresholds)
        free = _free_blocks(sim, small=False)
        shared = _shared_marks(temps)
        marks = _marks(sim, temps, shared, _extents(caches, live))
        settle_at = max([allocation_size(round_size(probe.largest_other)), LARGE_BUFFER,
                         *free])
        n = p + 1  # the cache's length after this step
        prev_sizes = _growing_sizes(s, caches, p)
        prev_len = p
        replay_next = True
        crossed_settled = False
        x = _largest_per_token(s)
        transients = _eager_transients(s) if s.eager else []
        seen: list[tuple[int, int, int]] = []  # replayed: (length, new segments, bytes)
        profile: tuple[int, int] | None = None
        while n <= last:
            sizes = _growing_sizes(s, caches, n)
            crossing = len(sizes) != len(prev_sizes) or any(
                _crossings(lo, hi, offsets)
                or bisect_left(marks, lo + 1) != bisect_left(marks, hi + 1)
                for lo, hi in zip(prev_sizes, sizes, strict=True))
            if s.eager:  # the step's growing temporaries, and a new level of the largest
                crossing = crossing or _crossings(round_size(x * prev_len),
                                                  round_size(x * n), [MIN_BLOCK]) or any(
                    round_size(k * n) >= DECODE_SMALLEST
                    and _crossed(round_size(k * prev_len), round_size(k * n), offsets, marks)
                    for k in transients)
            # never for eager attention, which takes its own tail (profile) instead
            settled = (s.plan.cache == "dynamic" and not s.eager and len(sizes) == 1
                       and all(c.window is None or n > c.window for c in caches
                               if c.window is not None)
                       and min(sizes, default=0) > settle_at)
            if shortcut and not replay_next and n < last and (
                    profile is not None or (settled and crossed_settled)):
                # the rest in closed form (eager: from the observed levels, _eager_profile);
                # the last step replayed for its allocated bytes
                closed = (_closed_form(s, caches, n - 1, last) if profile is None
                          else _level_sum(x, *profile, n - 1, last))
                jumped_reserved = sim.peak_reserved
                jumped = True
                peak = sim.peak_allocated
                jump = _jump(s, caches, ids, last - 1)
                run(jump)
                nreq += len(jump)
                sim.peak_allocated = max(peak, sim.allocated)
                n = last
                sizes = _growing_sizes(s, caches, n)
                crossing = True
            if not shortcut or crossing or replay_next or n in (p + 1, last - 1, last):
                e = _Emit(ids, DECODE_SMALLEST)
                carried = _forward(e, s, caches, 1, n, False, carried)
                segments, reserved = sim.segments, sim.reserved
                run(e.out)
                seen.append((n, sim.segments - segments, sim.reserved - reserved))
                if s.eager and shortcut and not jumped:
                    profile = _eager_profile(seen, x, _pool_changes(s, n, last),
                                             _free_blocks(sim))
                nreq += len(e.out)
                steps += 1
                prev_len = n
                marks = _marks(sim, temps, shared, _extents(caches, live))
                if crossing and settled:
                    crossed_settled = True
                replay_next = crossing
                prev_sizes = sizes
            if not shortcut or replay_next or crossed_settled:
                n += 1
            else:  # the steps before the next crossing or fixed step change nothing
                nxt = [_next_crossing(s, caches, n, last, prev_sizes, marks, offsets),
                       last - 1, last, last + 1]
                if s.eager:
                    nxt.append(_first_length(x, _next_grid(round_size(x * prev_len),
                                                           MIN_BLOCK)))
                    nxt += [max(_first_length(k, DECODE_SMALLEST),
                                _first_length(k, _threshold(round_size(k * prev_len), offsets,
                                                            marks)))
                            for k in transients]
                n = min(m for m in nxt if m > n)
        decode_allocated = sim.peak_allocated
        decode_requested = requested_peak
    peak_reserved = jumped_reserved + closed if jumped else sim.peak_reserved
    return InferPeaks(
        load_allocated=load_allocated, load_reserved=load_reserved,
        prefill_allocated=prefill_allocated, decode_allocated=decode_allocated,
        peak_allocated=max(prefill_allocated, decode_allocated),
        peak_reserved=peak_reserved, requests=nreq, steps_replayed=steps,
        closed_form_bytes=closed, prefill_requested=prefill_requested,
        decode_requested=decode_requested)


def _shared_marks(temps: list[int]) -> set[int]:
    """Sizes below 10 MiB where the placement of growing tensors can change: they share
    2 MiB (small pool) or 20 MiB segments (kSmallBuffer, kLargeBuffer), so a decision flips
    where k of them, alone or next to up to three of the step's temporaries of the same
    pool, stop fitting in one segment."""
    marks: set[int] = set()
    for seg, lo, hi in ((SMALL_BUFFER, MIN_REQUEST, SMALL_SIZE),
                        (LARGE_BUFFER, SMALL_SIZE + 1, MIN_LARGE_ALLOC - 1)):
        pool = [t for t in temps if lo <= t <= hi]
        held = {0}
        for _ in range(3):
            held |= {h + t for h in held for t in pool if h + t < seg}
        for h in held:
            k = 1
            while (seg - h) // k >= lo:
                marks.add((seg - h) // k // 512 * 512)
                k += 1
    return marks


def _free_blocks(sim: CachingAllocator, small: bool | None = None) -> list[int]:
    """Sizes of the free blocks of the allocator's pools (all, or the small or large
    pool's), read from its pools."""
    sizes: list[int] = []
    for (is_small, _stream), pool in sim.pools.items():
        if small is None or is_small == small:
            sizes += sorted(b.size for b in pool.blocks.values())
    return sizes


def _extents(caches: list[_Cache], live: dict[int, Block]) -> list[int]:
    """The free room each cache tensor leaves when it is freed: its block merged with its
    free neighbours (free_block -> try_merge_blocks), where the next one goes."""
    out = []
    for cache in caches:
        for tid in (cache.keys, cache.values):
            b = live.get(tid) if tid is not None else None
            if b is None:
                continue
            room = b.size
            for other in (b.prev, b.next):
                if other is not None and not other.allocated and other.mapped:
                    room += other.size
            out.append(room)
    return out


def _marks(sim: CachingAllocator, temps: list[int], shared: set[int],
           extents: list[int]) -> list[int]:
    """Sizes where a growing tensor's placement changes, given the free blocks now: past
    a free block's size it no longer fits there; past the block less 1 MiB its remainder
    is no longer split off (large pool, should_split); past the block less a temporary
    that temporary no longer fits next to it."""
    free = _free_blocks(sim) + extents
    return sorted({f - d for f in free for d in [0, SMALL_SIZE, *temps] if f > d} | shared)


def _closed_form(s: _Shape, caches: list[_Cache], done: int, last: int) -> int:
    """Reserved bytes the decode adds after the cache reached `done` tokens, up to `last`:
    each new 2 MiB-rounded size of the growing tensors (c of them) reserves c + 1 segments,
    c at the final step (the rotating spare comes one step later)."""
    count_growing = 2 * sum(1 for c in caches if c.window is None)
    total = 0
    seg = allocation_size(round_size(s.per_token * done))
    step = s.per_token
    n = done
    while n < last:
        # the next length whose segment is larger
        nxt = max(n + 1, (seg - 512) // step + 1)
        while allocation_size(round_size(step * nxt)) <= seg:
            nxt += 1
        if nxt > last:
            break
        seg = allocation_size(round_size(step * nxt))
        total += (count_growing + (1 if nxt < last else 0)) * seg
        n = nxt
    return total


def _jump(s: _Shape, caches: list[_Cache], ids: count[int],
          length: int) -> list[tuple[int, int]]:
    """The requests that bring every cache tensor to `length` tokens without the steps
    between, for the allocated bytes of the last step (their reserved memory is
    `_closed_form`'s)."""
    e = _Emit(ids)
    for cache in caches:
        n = cached_len(length, cache.window, False)
        for name in ("keys", "values"):
            new = e.alloc(s.per_token * n, cache=True)
            e.free(getattr(cache, name))
            setattr(cache, name, new)
        cache.tokens = n
    return e.out


@dataclass(frozen=True)
class MergePeaks:
    """`from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload()` replayed."""

    load_allocated: int  # allocated once the adapter is attached
    peak_allocated: int
    peak_reserved: int


def merge_program_peaks(spec: ModelSpec, plan: InferPlan) -> MergePeaks:
    """The load (base in `plan.quant` / `plan.compute_dtype`, adapters) and the merge of
    every targeted Linear (`_merge`), after the cuBLAS workspace of the first B @ A."""
    s = _shape(spec, plan.model_copy(update={"merged": False}))
    ids = count(1)
    sim = CachingAllocator(descending=True)  # as infer_program_peaks
    live: dict[int, Block] = {}
    load_plan = _load_plan(plan)
    if load_plan is not None:
        replay_requests(load_requests(spec, load_plan, kbit_prepare=False,
                                      adapter_dtype=plan.adapter_dtype), sim=sim, live=live)
    load_allocated = sim.allocated
    e = _Emit(ids)
    e.alloc(CUBLAS_WORKSPACE_INFER)
    _merge(e, s)
    replay_requests(e.out, sim=sim, live=live)
    return MergePeaks(load_allocated, sim.peak_allocated, sim.peak_reserved)
