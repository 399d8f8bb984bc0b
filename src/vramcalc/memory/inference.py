"""After training: GPU memory of generating with the adapter, and of merging it.

Pure arithmetic (no torch), like the training estimator. Two tasks return the same typed
result (`result.Estimate`, task "infer" or "merge"):

- `estimate_inference(spec, plan)`: `model.generate()` of `plan.new_tokens` tokens after a
  prompt of `plan.prompt_len`, batch `plan.batch_size`, on a base loaded in 4-bit / int8 /
  16-bit with the LoRA adapter unmerged (peft `PeftModel.from_pretrained`, fp32 by
  default) or merged (no adapter tensors).
- `estimate_merge(spec, plan)`: `from_pretrained` in 16-bit, `PeftModel.from_pretrained`,
  `merge_and_unload()`; plus the merged checkpoint's disk size (`merged_disk_bytes`) and,
  for a merge on the CPU, the host memory it needs.

Mechanisms and sources (transformers 5.x, peft 0.21, bitsandbytes 0.50, torch 2.13), with
what is modelled and what is not: docs/memory-model.md, "Inference and merging".
Terms that come from reading the sources, not from a measurement, are marked as such in the
docs. The H200 run 3 (calibration/h200/run3-infer.jsonl, replayed by bench/accuracy_infer.py)
measured the peak allocated of 30 points; the prefill's live sets below were corrected on
those points (no fitted coefficient).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramcalc.memory.allocator.constants import CUDA_CONTEXT

# torch c10/cuda/CUDACachingAllocator.cpp (2.13), how a request becomes a segment: the
# constants of the simulated allocator (kSmallSize, kSmallBuffer, kLargeBuffer,
# kMinLargeAlloc, kRoundLarge), defined there once
from vramcalc.memory.allocator.replay import (
    LARGE_BUFFER,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
)
from vramcalc.memory.effective import attention_impl, effective_load_plan
from vramcalc.memory.program.activations import OUTLIER_ROLES, int8_outlier_fraction
from vramcalc.memory.program.kv_cache import CUBLAS_WORKSPACE_INFER, cached_len, kv_token_bytes
from vramcalc.memory.program.trainable import lora_targets, lora_tensor_numels
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    ceil_div,
    expert_bytes,
    gemm_4bit_dequantizes,
    quant_constant_bytes,
    quantized_weight_bytes,
    rotary_buffer_bytes,
    rounded,
    unquantized_param_bytes,
)
from vramcalc.memory.result import Components, Estimate
from vramcalc.models.spec import LinearShape, ModelSpec, layer_windows, sdpa_window_masks
from vramcalc.plans import InferPlan, MergePlan, TrainPlan

# generate() after each forward (transformers generation/utils.py _sample):
#   next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=float32)   4 B x V
#   next_token_scores = logits_processor(...)  MinNewTokensLength clones:    4 B x V
# The previous step's two fp32 tensors stay referenced until reassigned, and the model's
# logits (compute dtype, last position only: logits_to_keep=1) are alive meanwhile.
LOGITS_FP32_TENSORS = 2


def _dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[name]


class MergeSizes(BaseModel):
    """What a merge produces besides its GPU peak."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    disk_bytes: int = Field(description="safetensors tensor bytes of the saved merged model")
    host_peak_bytes: int  # tensors in host RAM for --on cpu (process baseline not counted)


# ---- the caching allocator ------------------------------------------------------------


def segment_bytes(nbytes: int) -> int:
    """Size of the segment cudaMalloc'ed for a request of `nbytes` when no cached block
    fits (CUDACachingAllocator get_allocation_size)."""
    size = rounded(nbytes)
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ceil_div(size, ROUND_LARGE) * ROUND_LARGE


def growing_tensors_reserved(count: int, sizes: list[int]) -> int:
    """Segments reserved by `count` tensors that are re-allocated, one at a time, at each
    size of `sizes` (DynamicLayer.update: torch.cat makes the new tensor before the old one
    is freed), when nothing else reuses the freed blocks.

    Large tensors (>= 10 MiB) have their own segment rounded to 2 MiB, reused while the
    tensor still fits in it. When the size crosses the segment's end, every tensor needs a
    new segment and the old ones (one more: the block that rotates between tensors) stay
    cached: no later, larger request fits in them (best fit, CUDACachingAllocator
    get_free_block). Small tensors share 20 MiB segments whose freed neighbours coalesce:
    one spare segment.
    """
    if not sizes or count == 0:
        return 0
    final = sizes[-1]
    if rounded(final) < MIN_LARGE_ALLOC:
        live = count * rounded(final)
        return ceil_div(live, LARGE_BUFFER) * LARGE_BUFFER + LARGE_BUFFER
    segs: list[int] = []
    for s in sizes:
        seg = segment_bytes(s)
        if not segs or seg > segs[-1]:
            segs.append(seg)
    stale = sum((count + 1) * seg for seg in segs[:-1])
    return (count + 1) * segs[-1] + stale


# ---- KV cache -------------------------------------------------------------------------


def kv_cache_bytes(spec: ModelSpec, plan: InferPlan, length: int | None = None,
                   after_prefill: bool = False) -> int:
    """Allocated bytes of keys + values of every layer after `length` tokens (default:
    the end of generate()). Static cache: max_cache_len = prompt + new tokens, allocated
    at the first update (StaticLayer.lazy_initialization); sliding layers hold
    min(window, max_cache_len) (StaticSlidingWindowLayer)."""
    per_token = kv_token_bytes(spec, plan)
    total = 0
    for window in layer_windows(spec):
        if plan.cache == "static":
            cap = plan.total_len
            n = min(cap, window) if window else cap
        else:
            if length is None:  # the end of generate(); one new token: only the prefill ran
                length, after_prefill = plan.total_len, plan.new_tokens == 1
            n = cached_len(length, window, after_prefill)
        total += 2 * rounded(per_token * n)
    return total


# ---- weights and adapter ----------------------------------------------------------------


def inference_weight_bytes(spec: ModelSpec, quant: str, dtype: str, double_quant: bool
                           ) -> tuple[int, int, int, int]:
    """(block Linear weights, quantization constants, unquantized params + buffers, experts)
    after `from_pretrained(dtype=dtype, quantization_config=...)`, no kbit preparation:
    embeddings, lm_head and norms stay in the load dtype."""
    layers = spec.num_hidden_layers
    linears = spec.block_linears()
    wbytes = _dtype_bytes(dtype)
    if quant == "none":
        weights = layers * sum(rounded(lin.weight_numel * wbytes) for lin in linears)
        constants = 0
    else:
        weights = layers * sum(quantized_weight_bytes(lin.weight_numel, quant) for lin in linears)
        constants = layers * sum(
            quant_constant_bytes(lin.weight_numel, lin.out_features, quant, double_quant)
            for lin in linears
        )
    unquantized = unquantized_param_bytes(spec, wbytes) + rotary_buffer_bytes(spec)
    experts = layers * expert_bytes(spec, wbytes)
    return weights, constants, unquantized, experts


def adapter_bytes(spec: ModelSpec, lora: TrainPlan, dtype: str) -> int:
    """LoRA A (r x in) and B (out x r) of every targeted Linear, in `dtype` (peft
    PeftModel.from_pretrained: autocast_adapter_dtype=True keeps fp32)."""
    nbytes = _dtype_bytes(dtype)
    per_layer = sum(rounded(n * nbytes) for n in lora_tensor_numels(spec, lora))
    return spec.num_hidden_layers * per_layer


def adapter_param_count(spec: ModelSpec, lora: TrainPlan) -> int:
    return spec.num_hidden_layers * sum(lora_tensor_numels(spec, lora))


# ---- the prefill's live tensors ------------------------------------------------------------


def linear_peak(tokens: int, lin: LinearShape, plan: InferPlan, wrapped: bool,
                outliers: float = 0.0) -> int:
    """Peak bytes alive inside one Linear call, its output included, its input not.

    bitsandbytes `matmul_4bit` (more than one token): `MatMul4Bit` dequantizes the weight
    to the compute dtype (out x in) for `F.linear`; a single token (decode, batch 1) takes
    the gemv path without it. int8: `_int8_linear_peak`, `outliers` the share of x's
    columns kept as subA (activations.int8_outlier_fraction on the down projection).
    Unmerged LoRA (peft 0.21 tuners/lora/bnb.py `Linear4bit.forward`):
    `result = self.base_layer(x).clone()` (the base output is freed once cloned), then
    `x = self._cast_input_dtype(x, lora_A.weight.dtype)` (alive until the call returns),
    `output = lora_B(lora_A(x)) * scaling`: the B product and its scaled copy in the
    adapter dtype, then `.to(result.dtype)` and `result + output`. The 16-bit path
    (tuners/lora/layer.py `Linear.forward`, `result = result + lora_B(lora_A(x)) * scaling`)
    keeps the same number of bytes: the base output, the scaled product and the sum,
    promoted to the adapter dtype. Peak: out x c + x in the adapter dtype (when it differs)
    + r + 2 x out x max(adapter, compute) bytes; the output itself is the `out x c`.
    """
    c = _dtype_bytes(plan.compute_dtype)
    out_c = rounded(tokens * lin.out_features * c)
    base = out_c
    if plan.quant in ("nf4", "fp4") and gemm_4bit_dequantizes(tokens, lin.out_features,
                                                             lin.in_features):
        base += rounded(lin.weight_numel * c)
    elif plan.quant == "int8":
        base = _int8_linear_peak(tokens, lin, plan, c, outliers)
    if not wrapped or plan.merged:
        return base
    a = _dtype_bytes(plan.adapter_dtype)
    clone = 2 * out_c if plan.quant != "none" else 0  # result.clone(): both alive at once
    lora = (out_c + (rounded(tokens * lin.in_features * a) if a != c else 0)
            + rounded(tokens * plan.rank * a)
            + 2 * rounded(tokens * lin.out_features * max(a, c)))
    return max(base, clone, lora)


def _int8_linear_peak(tokens: int, lin: LinearShape, plan: InferPlan, c: int,
                      outliers: float) -> int:
    """The largest of bnb MatMul8bitLt's stretches under no_grad (bitsandbytes 0.50.2;
    program.infer._int8_matmul has the order), each next to the row stats and the int8
    rows CA: quantizing x (its fp16 copy unless fp16, `A.abs()` and its `>= threshold`
    bool); dequantizing the outlier columns' weights (subA, the `outliers` share of x's
    columns, the int8 columns and two fp32 products); the product (subA, subB, the int32
    product, its fp16 dequant and the cast to the compute dtype); the outliers' `addmm`
    (a second output)."""
    t, i, o = tokens, lin.in_features, lin.out_features
    fp16 = plan.compute_dtype == "fp16"
    held = rounded(t * 4) + rounded(t * i)  # row stats, CA
    quant = (0 if fp16 else rounded(t * i * 2)) + rounded(t * i * 2) + rounded(t * i)
    cols = int(outliers * i)
    out_c = rounded(t * o * c)
    product = rounded(t * o * 4) + rounded(t * o * 2) + (0 if fp16 else out_c)
    if not cols:
        return held + max(quant, product)
    sub_a = rounded(t * cols * c)
    sub_b = rounded(o * cols * c)
    dequant = sub_a + rounded(o * cols) + 2 * rounded(o * cols * 4)
    return held + max(quant, dequant, sub_a + sub_b + product, sub_a + sub_b + 2 * out_c)


def _attention_peak(spec: ModelSpec, plan: InferPlan, tokens: int, kv_len: int,
                    peak: dict[str, int]) -> int:
    """Peak bytes of the attention half beyond its input (the normed hidden states).

    transformers 5 LlamaAttention.forward: q, k, v projections (Phi-3: one fused qkv
    output whose storage the q/k/v views keep alive until the return), then
    apply_rotary_pos_emb: `q * cos + rotate_half(q) * sin` holds three q-sized temporaries
    next to q, k, v; then k likewise next to the rotated q. The cache update copies k and v
    into the cache (counted with the cache). sdpa (GQA without repeat_kv: no mask in the
    prefill of an unpadded batch) writes the output and a fp32 logsumexp per query and head;
    `.transpose(1, 2).contiguous()` copies it; o_proj runs with the rotated q and the
    attention output alive. eager (modeling_llama / gemma2 eager_attention_forward):
    repeat_kv expands k and v to every head, the bf16 scores, softmax(dtype=float32)
    converts them to fp32 first (aten softmax: only fp16 inputs take the half-to-float
    kernel) and writes a fp32 result, then `.to(dtype)`: c + 4 + 4 bytes per score.
    """
    c = _dtype_bytes(plan.compute_dtype)
    q_c = rounded(tokens * spec.q_size * c)
    kv_c = rounded(tokens * spec.kv_size * c)
    batch = plan.batch_size
    queries = tokens // batch
    if attention_impl(spec, plan.attn) == "eager":
        scores = batch * spec.num_attention_heads * queries * kv_len
        full_kv = 2 * rounded(batch * spec.num_attention_heads * kv_len * spec.head_size * c)
        attn_work = full_kv + scores * (4 + 4 + c)
    else:
        attn_work = rounded(batch * spec.num_attention_heads * queries * 4) + q_c
    if spec.attention_layout == "separate":
        held = 0
        steps = [peak["q"], q_c + peak["k"], q_c + kv_c + peak["v"]]
    else:
        held = rounded(tokens * (spec.q_size + 2 * spec.kv_size) * c)
        steps = [peak["qkv"]]
    steps += [held + q_c + 2 * kv_c + 3 * q_c,  # rotating q
              held + 2 * q_c + 2 * kv_c + 3 * kv_c,  # rotating k next to the rotated q
              held + q_c + attn_work,  # attention (k, v live in the cache by now)
              held + q_c + q_c + peak["o"]]
    return max(steps)


def _mlp_peak(spec: ModelSpec, tokens: int, c: int, peak: dict[str, int]) -> int:
    """Peak bytes of the MLP beyond its input (the normed hidden states).

    transformers 5 LlamaMLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: gate's output
    is freed once activated, so up_proj runs next to one intermediate-wide tensor, the
    product next to two, down_proj next to the product. Phi3MLP: `gate_up_proj(x).chunk(2)`
    then `up * act(gate)`; the `gate` view keeps the fused output alive through down_proj.
    Plain MLP: fc1, act, fc2. MoE blocks (not measured): three intermediate-wide tensors
    next to the widest Linear, as before.
    """
    inter = spec.expert_intermediate_size
    i_c = rounded(tokens * inter * c)
    if spec.is_moe:
        return 3 * i_c + max(peak.values(), default=0)
    if spec.mlp_layout == "gated":
        return max(peak["gate"], 2 * i_c, i_c + peak["up"], 3 * i_c, i_c + peak["down"])
    if spec.mlp_layout == "fused_gated":
        return max(peak["gate_up"], 4 * i_c, 3 * i_c + peak["down"])
    return max(peak["fc1"], 2 * i_c, i_c + peak["fc2"])


def layer_live_bytes(spec: ModelSpec, plan: InferPlan, tokens: int, kv_len: int) -> int:
    """Peak bytes alive inside one decoder layer's forward under no_grad, for `tokens`
    query tokens attending to `kv_len` keys (prefill: tokens = batch x prompt), beyond the
    model's embeddings output and the position embeddings (counted by the caller).

    Around the attention: the layer's input (held by the model's loop variable and
    `residual`) and the normed input. Around the MLP: the layer's input (the caller's
    reference), the residual sum and the normed sum. Norm: a fp32 upcast of its input and
    the normalized fp32 product. The halves: `_attention_peak`, `_mlp_peak`, each Linear
    with `linear_peak`. eager attention adds its masks (whole layer) and the returned
    probabilities (through the MLP).
    """
    c = _dtype_bytes(plan.compute_dtype)
    h_c = rounded(tokens * spec.hidden_size * c)
    targets = {lin.name for lin in lora_targets(spec, plan.lora_plan())} if not plan.merged \
        else set()
    outliers = int8_outlier_fraction(spec, tokens) if plan.quant == "int8" else 0.0
    peak = {lin.role: linear_peak(tokens, lin, plan, lin.name in targets,
                                  outliers if lin.role in OUTLIER_ROLES else 0.0)
            for lin in spec.block_linears()}
    norm_tmp = 2 * rounded(tokens * spec.hidden_size * 4)
    attn = h_c + max(h_c + _attention_peak(spec, plan, tokens, kv_len, peak), norm_tmp)
    mlp_peak = {k: v for k, v in peak.items() if k not in ("q", "k", "v", "qkv", "o")}
    mlp = 2 * h_c + max(h_c + _mlp_peak(spec, tokens, c, mlp_peak), norm_tmp)
    masks = probs = 0
    if attention_impl(spec, plan.attn) == "eager":
        # masking_utils eager_mask: one (batch, 1, queries, keys) mask in the compute dtype
        # per layer type (full, sliding), built before the first layer, alive throughout.
        queries = tokens // plan.batch_size
        kinds = {w is None for w in layer_windows(spec)}
        masks = len(kinds) * rounded(plan.batch_size * queries * kv_len * c)
        # eager_attention_forward returns the probabilities; the decoder layer binds them
        # (`hidden_states, _ = self.self_attn(...)`), so they live until the layer returns.
        probs = rounded(plan.batch_size * spec.num_attention_heads * queries * kv_len * c)
    elif sdpa_window_masks(spec, kv_len):
        # sdpa with a sliding window reached (kv_len >= window): masking_utils builds one
        # (batch, 1, queries, keys) bool mask instead of relying on `is_causal`, alive for
        # the whole prefill (specs.sdpa_window_masks). H200 run 5: mistral-7b prefill of 8 x
        # 32768 (ih19) and 8 x 8192 (ih12) measured exactly this much above the estimate.
        masks = rounded(tokens * kv_len)  # tokens = batch x queries
    return masks + max(attn, probs + mlp)


# ---- the estimate -------------------------------------------------------------------------


def estimate_inference(spec: ModelSpec, plan: InferPlan, replay: bool = True) -> Estimate:
    """Peak memory of `generate()` with the adapter: phases load, prefill, decode.

    `replay=False` (searches over many plans): the peaks from the phase formulas alone
    (peak allocated within 0.3 % of the replay's on the records), reserved = allocated."""
    plan, planned_as, load_notes = effective_load_plan(spec, plan, "quant", plan.compute_dtype)
    weights, constants, unquantized, experts = inference_weight_bytes(
        spec, plan.quant, plan.compute_dtype, plan.double_quant)
    lora = plan.lora_plan()
    adapter = 0 if plan.merged else adapter_bytes(spec, lora, plan.adapter_dtype)
    static = weights + constants + unquantized + experts + adapter
    b, p, v = plan.batch_size, plan.prompt_len, spec.vocab_size
    c = _dtype_bytes(plan.compute_dtype)
    logits_c = rounded(b * v * c)  # logits_to_keep=1: the last position only
    logits_32 = rounded(b * v * 4)

    # prefill: every layer's cache holds the prompt; the last layer's forward is live.
    cache_prefill = kv_cache_bytes(spec, plan, p, after_prefill=True)
    embed = rounded(b * p * spec.hidden_size * c)
    rope = 2 * rounded(b * p * spec.head_size * c)  # cos, sin
    prefill_layer = layer_live_bytes(spec, plan, b * p, p)
    prefill_logits = logits_c + LOGITS_FP32_TENSORS * logits_32
    prefill_act = embed + rope + prefill_layer

    # decode: the last step (the longest cache); cat keeps one old layer tensor alive.
    cache_end = kv_cache_bytes(spec, plan)
    windows = layer_windows(spec)
    per_token = kv_token_bytes(spec, plan)
    old = 0
    if plan.cache == "dynamic":
        old = max(rounded(per_token * cached_len(plan.total_len - 1, w, False))
                  for w in windows)
    decode_layer = layer_live_bytes(spec, plan, b, plan.total_len)
    carried = LOGITS_FP32_TENSORS * logits_32  # previous step's fp32 logits and scores
    decode_act = max(old + decode_layer, logits_c + LOGITS_FP32_TENSORS * logits_32)

    prefill = static + cache_prefill + max(prefill_act, prefill_logits)
    decode = static + cache_end + carried + decode_act if plan.new_tokens > 1 else 0
    phases = {"load": static, "prefill": prefill, "decode": decode}
    peak_reserved = 0
    required_phases: dict[str, int] = {}
    if replay:
        # The peaks come from generate()'s requests replayed on the caching allocator
        # (memory/program/infer.py); the formulas above name the components at the peak.
        from vramcalc.memory.program.infer import infer_program_peaks

        program = infer_program_peaks(spec, plan)
        # tensors under program.infer's smallest request (norms, biases, small adapters)
        # and per-tensor rounding: the static bytes are the formulas'; in small segments
        offset = static - program.load_allocated
        small_segments = ceil_div(max(offset, 0), SMALL_BUFFER) * SMALL_BUFFER
        phases = {"load": static,
                  "prefill": program.prefill_allocated + offset - CUBLAS_WORKSPACE_INFER,
                  "decode": (program.decode_allocated + offset - CUBLAS_WORKSPACE_INFER
                             if plan.new_tokens > 1 else 0)}
        peak_reserved = program.peak_reserved + small_segments
        # required memory rests on the requested bytes, which cannot fall when the work
        # grows (a replayed allocated peak can: where a request lands decides whether a
        # block's rest is split off)
        required_phases = {"load": static + CUBLAS_WORKSPACE_INFER,
                           "prefill": program.prefill_requested + offset,
                           "decode": (program.decode_requested + offset
                                      if plan.new_tokens > 1 else 0)}
    peak_phase = max(phases, key=lambda k: phases[k])
    peak_alloc = phases[peak_phase] + CUBLAS_WORKSPACE_INFER
    peak_reserved = max(peak_reserved, peak_alloc)
    slack = peak_reserved - peak_alloc

    # the components at the peak: the formulas' kv cache and logits, the rest activations
    # (or transient: the old layer tensor torch.cat keeps alive)
    if peak_phase == "prefill":
        rest = max(phases["prefill"] - static - cache_prefill, 0)
        logits_part = prefill_logits if prefill_logits > prefill_act else 0
        parts = {"kv_cache": phases["prefill"] - static - rest,
                 "logits_loss": min(logits_part, rest),
                 "activations": rest - min(logits_part, rest)}
    elif peak_phase == "decode":
        rest = max(phases["decode"] - static - cache_end, 0)
        logit_peak = decode_act == logits_c + LOGITS_FP32_TENSORS * logits_32
        logits_part = min(carried + (decode_act if logit_peak else 0), rest)
        transient = 0 if logit_peak else min(old, rest - logits_part)
        parts = {"kv_cache": phases["decode"] - static - rest, "logits_loss": logits_part,
                 "transient": transient, "activations": rest - logits_part - transient}
    else:
        parts = {}
    components = Components(
        base_weights=weights, quant_constants=constants, unquantized_params=unquantized,
        expert_weights=experts, adapter_weights=adapter, cublas_workspace=CUBLAS_WORKSPACE_INFER,
        allocator_slack=slack, cuda_context=CUDA_CONTEXT, **parts,
    )
    # The stale cache segments are released when an allocation would fail
    # (release_cached_blocks), so what must be free is the allocated peak.
    required = (max(required_phases.values()) if required_phases else peak_alloc) + CUDA_CONTEXT
    notes = [
        f"generate(): prompt {p} + {plan.new_tokens} new tokens, batch {b}, greedy, "
        f"{plan.cache} cache ({plan.total_len} tokens per layer at the end)",
        "adapter merged: no LoRA tensors" if plan.merged
        else f"adapter unmerged in {plan.adapter_dtype} (peft autocast_adapter_dtype)",
    ]
    notes += load_notes
    if any(w is not None for w in windows):
        notes.append("sliding-window layers keep at most the window once decoding")
    if plan.cache == "dynamic" and slack > 0:
        notes.append("reserved > allocated: torch.cat grows each layer's cache; outgrown "
                     "segments stay cached until an allocation would fail")
    return Estimate(
        model=spec.name, task="infer", params=spec.num_params(),
        trainable_params=0 if plan.merged else adapter_param_count(spec, lora),
        components=components, phases=phases, peak_phase=peak_phase,
        peak_allocated_bytes=peak_alloc, peak_reserved_bytes=peak_reserved,
        peak_device_bytes=peak_reserved + CUDA_CONTEXT, required_device_bytes=required,
        paged_bytes=0, notes=tuple(notes), planned_as=planned_as,
    )


# ---- merging ----------------------------------------------------------------------------


MERGE_4BIT_WARNING = (
    "merging into a 4-bit base dequantizes, adds and requantizes each weight: peft warns "
    "'Merge lora module to 4-bit linear may get different generations due to rounding errors.'"
)


def _merge_transient(spec: ModelSpec, plan: MergePlan) -> int:
    """Largest transient of one Linear's merge (peft tuners/lora/layer.py Linear.merge,
    bnb.py Linear4bit.merge).

    16-bit: get_delta_weight = (B @ A) * scaling in the adapter dtype, two out x in
    tensors alive at once, then added in place. 4-bit: dequantize (out x in, dtype), the
    delta (two), their sum promoted to the adapter dtype, then `Params4bit(w.to("cpu"))
    .to(device)` requantizes from the host: the new packed weight and constants.
    """
    a = _dtype_bytes(plan.adapter_dtype)
    d = _dtype_bytes(plan.dtype)
    worst = 0
    for lin in lora_targets(spec, plan.lora_plan()):
        n = lin.weight_numel
        delta = 2 * rounded(n * a)
        if plan.base_quant == "none":
            t = delta
        else:
            t = rounded(n * d) + delta + rounded(n * max(a, d))
        worst = max(worst, t)
    return worst


def merged_disk_bytes(spec: ModelSpec, plan: MergePlan) -> int:
    """Tensor bytes of the merged model's safetensors (tied embeddings once; header and
    config not counted). A 4-bit merge saves packed weights and their constants."""
    weights, constants, unquantized, experts = inference_weight_bytes(
        spec, plan.base_quant, plan.dtype, plan.double_quant)
    d = _dtype_bytes(plan.dtype)
    # the saved tensors are the unrounded numel x bytes
    blocks = spec.num_hidden_layers * sum(lin.weight_numel for lin in spec.block_linears())
    if plan.base_quant == "none":
        block_bytes = blocks * d
    else:
        block_bytes = weights + constants  # allocation-rounded: within 512 B per tensor
    return block_bytes + (spec.num_params() - blocks) * d


def estimate_merge(spec: ModelSpec, plan: MergePlan) -> Estimate:
    """Peak memory of loading the base, attaching the adapter and merge_and_unload()."""
    plan, planned_as, load_notes = effective_load_plan(spec, plan, "base_quant", plan.dtype)
    weights, constants, unquantized, experts = inference_weight_bytes(
        spec, plan.base_quant, plan.dtype, plan.double_quant)
    lora = plan.lora_plan()
    adapter = adapter_bytes(spec, lora, plan.adapter_dtype)
    transient = _merge_transient(spec, plan)
    static = weights + constants + unquantized + experts
    phases = {"load": static, "attach": static + adapter, "merge": static + adapter + transient}
    on_gpu = plan.on == "gpu"
    workspace = CUBLAS_WORKSPACE_INFER if on_gpu else 0
    peak_alloc = phases["merge"] + workspace
    peak_reserved = peak_alloc
    if on_gpu:
        # reserved from the load and the merge's requests replayed on the caching
        # allocator (program.infer.merge_program_peaks); allocated stays the formulas'
        from vramcalc.memory.program.infer import merge_program_peaks

        program = merge_program_peaks(spec, InferPlan(
            quant=plan.base_quant, double_quant=plan.double_quant, compute_dtype=plan.dtype,
            rank=plan.rank, targets=plan.targets, adapter_dtype=plan.adapter_dtype))
        offset = static + adapter - program.load_allocated
        peak_reserved = max(peak_alloc, program.peak_reserved
                            + ceil_div(max(offset, 0), SMALL_BUFFER) * SMALL_BUFFER)
    context = CUDA_CONTEXT if on_gpu else 0
    notes = [f"merge_and_unload() on the {plan.on.upper()}; merged checkpoint "
             f"{merged_disk_bytes(spec, plan)} bytes of tensors on disk"]
    if not on_gpu:
        notes.append("host RAM of the tensors only: the Python process (torch, "
                     "transformers) adds its own baseline")
    notes += load_notes
    if plan.base_quant != "none":
        notes.append(MERGE_4BIT_WARNING)
    return Estimate(
        model=spec.name, task="merge", params=spec.num_params(),
        trainable_params=adapter_param_count(spec, lora),
        components=Components(base_weights=weights, quant_constants=constants,
                              unquantized_params=unquantized, expert_weights=experts,
                              adapter_weights=adapter, transient=transient,
                              cublas_workspace=workspace,
                              allocator_slack=peak_reserved - peak_alloc, cuda_context=context),
        phases=phases, peak_phase="merge", peak_allocated_bytes=peak_alloc,
        peak_reserved_bytes=peak_reserved, peak_device_bytes=peak_reserved + context,
        required_device_bytes=peak_alloc + context, paged_bytes=0, notes=tuple(notes),
        planned_as=planned_as,
    )


def merge_sizes(spec: ModelSpec, plan: MergePlan) -> MergeSizes:
    est = estimate_merge(spec, plan.model_copy(update={"on": "cpu"}))
    return MergeSizes(disk_bytes=merged_disk_bytes(spec, plan),
                      host_peak_bytes=est.peak_allocated_bytes)
