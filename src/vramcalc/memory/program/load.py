"""The allocation requests of loading and preparing the model: what is left free in the
caching allocator when training starts, where the first step's requests land.

Read off allocator traces that start before `from_pretrained` (calibration/h200/
run18-traces, H200, transformers 5.17, bitsandbytes 0.50.2, peft 0.21):

1. `caching_allocator_warmup` (transformers modeling_utils.py) allocates one tensor of the
   bytes the model will hold on the GPU and frees it: one segment of that size stays
   cached. The bytes are `get_total_byte_count`: every parameter not tied, at
   `hf_quantizer.param_element_size` (0.5 byte for 4-bit, 1 for int8, the load dtype's
   size otherwise). The traces show exactly this size, less the 2 MiB the calibration
   worker had reserved before loading.
2. Parameters are materialized in checkpoint key order (core_model_loading.py
   `_materialize_copy`, sorted names: lm_head, embed_tokens, then per layer its MLP before
   its attention). A quantized Linear is materialized in the load dtype and quantized on
   the GPU, then the 16-bit copy is freed: 4-bit (bitsandbytes backends/cuda/ops.py
   `quantize_4bit`) allocates the fp32 absmax and the packed weight, and with double
   quantization (functional.py `quantize_4bit`) a centred absmax copy, the uint8 absmax
   and the nested fp32 absmax, then frees both fp32 absmax tensors; int8 (nn/modules.py
   `Int8Params._quantize`) allocates an fp16 copy, the fp32 row scales and the int8
   weight, then frees the copy. The quantized tensors are carved out of the warmup
   segment, which the 16-bit copies then no longer fit in.
3. MoE experts (transformers 5 fuses the checkpoint's per-expert Linears into 3-D
   parameters, core_model_loading.py `MergeModulelist` / `Concatenate`): each expert
   projection materialized per expert, stacked, the pieces freed; gate and up
   concatenated into gate_up_proj and the two stacks freed.
4. QLoRA only: peft `prepare_model_for_kbit_training` (utils/other.py) casts every fp16 /
   bf16 parameter that is not Params4bit to fp32 in `model.parameters()` order (new
   tensor, then the 16-bit one freed: the embeddings, lm_head and MoE experts leave their
   16-bit room free in the warmup segment), then calls `torch.cuda.empty_cache()`.
5. peft creates the LoRA adapters on the GPU (fp32, lora_A then lora_B per module, the
   ParamWrapper factors of MoE experts: `trainable.lora_tensor_numels`).

Requests under `MIN_REQUEST` (norms, biases, small adapters) are left out, as in
`program.step`.
"""

from __future__ import annotations

from itertools import count

from vramcalc.memory.program.trainable import lora_targets, lora_tensor_numels
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
    ceil_div,
    expert_linear_numels,
    fused_experts,
)
from vramcalc.models.spec import LinearShape, ModelSpec
from vramcalc.plans import TrainPlan

MIN_REQUEST = 64 * 1024
EMPTY_CACHE = (0, -1)  # a request that empties the cache (`torch.cuda.empty_cache()`)

_ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")


class _Requests:
    def __init__(self) -> None:
        self.out: list[tuple[int, int]] = []
        self._ids = count(-1, -1)  # negative ids: apart from program.step's buffers

    def alloc(self, size: int) -> int | None:
        if size < MIN_REQUEST:
            return None
        tid = next(self._ids)
        self.out.append((tid, size))
        return tid

    def free(self, tid: int | None) -> None:
        if tid is not None:
            self.out.append((tid, 0))


def _checkpoint_order(spec: ModelSpec) -> list[LinearShape]:
    """One layer's Linears in checkpoint key order: `mlp.*` sorts before `self_attn.*`,
    and names sort alphabetically inside each."""
    mlp = [lin for lin in spec.block_linears() if lin.role not in _ATTENTION_ROLES]
    attn = [lin for lin in spec.block_linears() if lin.role in _ATTENTION_ROLES]
    return sorted(mlp, key=lambda lin: lin.name) + sorted(attn, key=lambda lin: lin.name)


def warmup_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """`get_total_byte_count`: what `caching_allocator_warmup` allocates (and frees)."""
    load = DTYPE_BYTES[plan.load_dtype]
    linears = spec.quantizable_params()
    rest = spec.num_params() - linears
    if plan.quant in ("nf4", "fp4") and spec.bnb_quantizes_linears:
        return rest * load + linears // 2
    if plan.quant == "int8" and spec.bnb_quantizes_linears:
        return rest * load + linears
    return spec.num_params() * load


def _materialize_linear(r: _Requests, lin: LinearShape, plan: TrainPlan, load: int) -> None:
    """A Linear quantized at load: its 16-bit copy, the quantization's tensors."""
    n = lin.weight_numel
    x = r.alloc(n * load)
    if plan.quant in ("nf4", "fp4"):
        blocks = ceil_div(n, NF4_BLOCKSIZE)
        absmax = r.alloc(4 * blocks)
        r.alloc(ceil_div(n, 2))  # packed weight, kept
        if plan.double_quant:
            centred = r.alloc(4 * blocks)  # absmax - offset
            r.alloc(4 * ceil_div(blocks, NESTED_BLOCKSIZE))  # nested absmax, kept
            r.alloc(blocks)  # uint8 absmax, kept
            r.free(centred)
            r.free(absmax)
    else:  # int8
        copy = r.alloc(n * 2)  # fp16 copy to quantize from
        r.alloc(4 * lin.out_features)  # SCB, kept
        r.alloc(n)  # CB, kept
        r.free(copy)
    r.free(x)


def _expert_piece(spec: ModelSpec, load: int) -> int:
    """Bytes of one expert's gate, up or down projection as the checkpoint holds it."""
    return spec.hidden_size * spec.expert_intermediate_size * load


def _expert_pieces(r: _Requests, spec: ModelSpec, load: int) -> list[list[int | None]]:
    """One layer's per-expert checkpoint tensors materialized in key order (expert-major:
    gate, down, up of expert 0, then expert 1, ...): [gate pieces, up pieces, down pieces]."""
    piece = _expert_piece(spec, load)
    gate: list[int | None] = []
    up: list[int | None] = []
    down: list[int | None] = []
    for _ in range(spec.num_local_experts):
        gate.append(r.alloc(piece))
        down.append(r.alloc(piece))
        up.append(r.alloc(piece))
    return [gate, up, down]


def _fuse_experts(r: _Requests, spec: ModelSpec, load: int, gate: list[int | None],
                  up: list[int | None], down: list[int | None] | None,
                  keep: list[tuple[int | None, int]]) -> None:
    """MergeModulelist (stack, pieces freed) for gate and up, Concatenate into gate_up_proj
    (the two stacks freed), MergeModulelist for down_proj. `down` None (a quantizer loads
    one converter group at a time): down's pieces are materialized only now."""
    piece = _expert_piece(spec, load)
    stack = spec.num_local_experts * piece
    stacks = []
    for proj in (gate, up):
        stacks.append(r.alloc(stack))
        for p in proj:
            r.free(p)
    gate_up = r.alloc(2 * stack)
    for st in stacks:
        r.free(st)
    if down is None:
        down = [r.alloc(piece) for _ in range(spec.num_local_experts)]
    down_proj = r.alloc(stack)
    for p in down:
        r.free(p)
    keep += [(gate_up, 2 * stack), (down_proj, stack)]


def _from_pretrained_adapters(r: _Requests, spec: ModelSpec, plan: TrainPlan,
                              adapter_dtype: str) -> None:
    """The adapter of `PeftModel.from_pretrained(base, path, autocast_adapter_dtype=
    adapter_dtype == "fp32")` (peft 0.21), saved in fp32 (calibrate.infer_worker
    make_adapter), then cast to `adapter_dtype` (infer_worker load_with_adapter):

    1. every layer's adapters are created and moved to the GPU in the base layer's dtype
       (tuners_utils.py `_move_adapter_to_device_of_base_layer`, dtype from
       `_get_base_layer_device_and_dtype`: bnb Linear4bit's `compute_dtype`, a 16-bit
       weight's dtype, none for int8 weights: the fp32 they were made in), layer by
       layer, lora_A then lora_B of each module in the model's order;
    2. with autocast, `cast_adapter_dtype` casts the 16-bit ones to fp32 in the same
       order, each new tensor before the old one is freed;
    3. `load_peft_weights` reads the file's tensors (fp32) onto the GPU in its key order
       (sorted names: layer numbers as text, `mlp.*` before `self_attn.*`), which
       `set_peft_model_state_dict` copies into the adapters; the read tensors are freed in
       that order when `from_pretrained` returns;
    4. the worker casts adapters that are not in `adapter_dtype` (a new tensor each).
    (Recorded, run 34b tr-ip00 gemma-2-9b nf4 r64: 56 bf16 adapters, 56 fp32 casts, 56
    fp32 reads and their frees, in these orders; run 34 tr-ih04 phi-3 and run 34b tr-ip11
    llama-3.2-1b, both nf4, the same; run 34b tr-ip10 gemma-2-2b int8: 364 fp32 adapters,
    no cast, 364 reads.)"""
    targets = {lin.name for lin in lora_targets(spec, plan)}
    numels = lora_tensor_numels(spec, plan)
    created: str = plan.load_dtype  # a 16-bit weight's dtype
    if plan.quant in ("nf4", "fp4") and spec.bnb_quantizes_linears:
        created = plan.compute_dtype  # bnb Linear4bit.compute_dtype
    elif plan.quant == "int8" and spec.bnb_quantizes_linears:
        created = "fp32"  # an int8 weight: no cast
    # the file's key order: a layer's targeted Linears in checkpoint order (lora_A,
    # lora_B each), then its other adapter tensors (MoE, not traced) in the model's order
    per_layer = [n for lin in _checkpoint_order(spec) if lin.name in targets
                 for n in (plan.rank * lin.in_features, lin.out_features * plan.rank)]
    extra = numels[2 * len(targets):]
    live: list[tuple[int | None, int]] = []
    for _ in range(spec.num_hidden_layers):
        live += [(r.alloc(n * DTYPE_BYTES[created]), n) for n in numels]
    dtype = created
    if adapter_dtype == "fp32" and created in ("bf16", "fp16"):
        for k, (tid, n) in enumerate(live):
            live[k] = (r.alloc(n * 4), n)
            r.free(tid)
        dtype = "fp32"
    read = [r.alloc(n * 4) for _ in sorted(range(spec.num_hidden_layers), key=str)
            for n in per_layer + extra]
    for tid in read:
        r.free(tid)
    if dtype != adapter_dtype:
        for tid, n in live:
            r.alloc(n * DTYPE_BYTES[adapter_dtype])
            r.free(tid)


def load_requests(spec: ModelSpec, plan: TrainPlan, kbit_prepare: bool = True,
                  adapter_dtype: str = "fp32") -> list[tuple[int, int]]:
    """(id, bytes) requests from an empty allocator to the start of training: a size of 0
    frees tensor `id`, `EMPTY_CACHE` empties the cache. `kbit_prepare=False`: a load for
    inference (`PeftModel.from_pretrained` on the base, no `prepare_model_for_kbit_training`,
    step 4 above left out; the adapter read from a file, `_from_pretrained_adapters`, in
    `adapter_dtype`)."""
    r = _Requests()
    load = DTYPE_BYTES[plan.load_dtype]
    quantized = plan.quant != "none" and spec.bnb_quantizes_linears
    r.free(r.alloc(warmup_bytes(spec, plan)))
    head = None if spec.tie_word_embeddings else r.alloc(spec.lm_head_params() * load)
    embed = spec.embedding_params() * load
    embed_id = r.alloc(embed)
    # each layer's 16-bit parameters (id, bytes), which prepare_model_for_kbit_training
    # upcasts (an unquantized MoE layer's expert stacks are added once they are fused)
    layers: list[list[tuple[int | None, int]]] = []
    fused = fused_experts(spec, plan)
    pending: list[list[int | None]] = []  # the previous layer's expert pieces
    linears = _checkpoint_order(spec)
    for _ in range(spec.num_hidden_layers):
        keep: list[tuple[int | None, int]] = []
        if fused and quantized:
            # with a quantizer the loader materializes one converter group at a time:
            # gate's and up's pieces (projection-major), then down's
            piece = _expert_piece(spec, load)
            gate, up = ([r.alloc(piece) for _ in range(spec.num_local_experts)]
                        for _ in range(2))
            _fuse_experts(r, spec, load, gate, up, None, keep)
        elif fused:
            # without one, its threads materialize a layer's expert tensors (in key order,
            # expert-major) while the previous layer's are being fused: a lag of one layer
            pieces = _expert_pieces(r, spec, load)
            if pending:
                gate, up, down = pending
                _fuse_experts(r, spec, load, gate, up, down, layers[-1])
            pending = pieces
        elif spec.is_moe:  # per-expert Linears, quantized like the rest
            for _ in range(spec.num_local_experts):
                for numel, out in expert_linear_numels(spec):
                    _materialize_linear(r, LinearShape("expert", "expert", numel // out, out,
                                                       False), plan, load)
        for lin in linears:
            if quantized:
                _materialize_linear(r, lin, plan, load)
            else:
                size = lin.weight_numel * load
                keep.append((r.alloc(size), size))
        layers.append(keep)
    if pending:
        gate, up, down = pending
        _fuse_experts(r, spec, load, gate, up, down, layers[-1])
    if plan.kbit_upcast and kbit_prepare:
        # in model.parameters() order: the embeddings, the layers', the lm_head
        upcast = [(embed_id, embed)] + [t for keep in layers for t in keep]
        if head is not None:
            upcast.append((head, spec.lm_head_params() * load))
        if load == 2:
            for tid, size in upcast:
                r.alloc(size * 2)
                r.free(tid)
        r.out.append(EMPTY_CACHE)
    if not kbit_prepare:
        if plan.is_lora:
            _from_pretrained_adapters(r, spec, plan, adapter_dtype)
        return r.out
    adapters = lora_tensor_numels(spec, plan) if plan.is_lora else []
    made: list[tuple[int | None, int]] = []
    for _ in range(spec.num_hidden_layers):
        for numel in adapters:  # fp32 (peft autocast_adapter_dtype)
            made.append((r.alloc(numel * 4), numel))
    a_bytes = DTYPE_BYTES[plan.adapter_dtype]
    if a_bytes != 4:
        # TRL SFTTrainer.__init__ (trl 1.16 sft_trainer.py): `param.data =
        # param.data.to(torch.bfloat16)` parameter by parameter, each copy made before the
        # fp32 one goes
        for tid, numel in made:
            r.alloc(numel * a_bytes)
            r.free(tid)
    return r.out
