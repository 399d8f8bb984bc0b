"""Several GPUs: per-GPU memory of DDP, FSDP (incl. FSDP-QLoRA), DeepSpeed ZeRO-2/3 and
accelerate's `device_map="auto"`, derived from the single-GPU estimate (pure, no torch).

`estimate_parallel(spec, plan, parallel)` starts from `estimate(spec, plan)` (one training
step on one GPU, per-device batch) and moves each component to where the strategy puts it:
replicated, sharded 1/S over the shard group, all-gathered for the layer being computed,
offloaded to host RAM, or (device_map) split by layer across GPUs. Every term names its
source below and in docs/memory-model.md "Several GPUs". Versions read: torch 2.13
(torch/nn/parallel/distributed.py, torch/distributed/fsdp/), accelerate 1.15, transformers 5
(integrations/accelerate.py get_balanced_memory / infer_auto_device_map), DeepSpeed
runtime/zero (stage_1_and_2.py, stage3.py, constants), TRL SFTTrainer `_prepare_peft_model`.

What is not modelled: FSDP2 (`fully_shard`, accelerate fsdp_version 2), tensor / pipeline
parallelism beyond device_map, ZeRO++ (hpZ), NVMe offload, activation offload, per-rank
differences of data-parallel ranks (rank 0 is assumed equal to the others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from vramcalc.errors import PlanError
from vramcalc.memory.allocator.constants import (
    CUBLAS_WORKSPACES,
    CUDA_CONTEXT,
    allocator_slack,
    required_slack,
)
from vramcalc.memory.estimate import estimate
from vramcalc.memory.program.trainable import lora_param_bytes, lora_param_count
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    expert_bytes,
    unquantized_param_bytes,
    weight_bytes,
)
from vramcalc.memory.result import Components, Estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.units import MiB

# a one-GPU estimate function (estimate.estimate, or planning.memoized of it)
SingleEstimate = Callable[[ModelSpec, TrainPlan], Estimate]
Strategy = Literal["ddp", "fsdp", "zero2", "zero3", "device-map"]
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"]
Offload = Literal["none", "cpu"]
Balance = Literal["balanced", "sequential"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SHARDING_STRATEGIES: tuple[str, ...] = get_args(ShardingStrategy)
OFFLOADS: tuple[str, ...] = get_args(Offload)
BALANCES: tuple[str, ...] = get_args(Balance)

# ---- constants, each with its source ------------------------------------------------------

# torch/nn/parallel/distributed.py: DistributedDataParallel(gradient_as_bucket_view=False)
# by default, and accelerate's DistributedDataParallelKwargs keeps that default: the Reducer
# allocates flat bucket tensors (bucket_cap_mb=25, _DEFAULT_BUCKET_CAP_MB) covering every
# parameter that requires grad, at construction, in the gradient dtype: one extra copy of
# the gradients, alive in every phase.
DDP_BUCKET_CAP_MB = 25
# torch/distributed/fsdp/_limiter_utils.py _FreeEventQueue: `_max_num_inflight_all_gathers
# = 2` (limit_all_gathers=True, accelerate's default); with backward_prefetch=BACKWARD_PRE
# (accelerate / PEFT configs) the next unit is gathered while the current one computes.
FSDP_UNITS_IN_FLIGHT = 2
# DeepSpeed runtime/zero/config.py defaults (ZERO_OPTIMIZATION_REDUCE_BUCKET_SIZE_DEFAULT,
# stage3_prefetch_bucket_size); accelerate replaces them only when the config says "auto"
# (then h*h and 0.9*h*h, accelerator.py _prepare_deepspeed). The ipg gradient buffer is
# `torch.empty(reduce_bucket_size)` in the 16-bit dtype (stage_1_and_2.py backward(),
# contiguous_gradients=True).
ZERO_REDUCE_BUCKET_ELEMS = 500_000_000
ZERO_PREFETCH_BUCKET_ELEMS = 50_000_000
# transformers quantizers (bnb 4-bit / 8-bit) adjust_max_memory: 90 % of each device's
# max_memory "for buffers that are created during quantization".
BNB_MAX_MEMORY_FRACTION = 0.90
# transformers integrations/accelerate.py get_balanced_memory: per_gpu = total // N +
# 1.25 * max(largest no-split module, mean leaf size); the last GPU keeps its whole memory.
BALANCED_BUFFER_FACTOR = 1.25
# NCCL device buffers per process, outside torch's allocator (NVML sees them). NCCL docs,
# NCCL_BUFFSIZE: 4 MiB by default, per channel and peer; send + receive for the two ring
# neighbours. The channel count (NCCL_ASSUMED_CHANNELS) is an assumption, not a
# measurement: calibrate it with `calibrate/multi_gpu_run.py` (calibration/MULTI_GPU.md).
NCCL_BUFFSIZE = 4 * MiB
NCCL_ASSUMED_CHANNELS = 8
NCCL_BUFFERS = NCCL_BUFFSIZE * 2 * 2 * NCCL_ASSUMED_CHANNELS


class ParallelPlan(BaseModel):
    """How one training step is spread over several GPUs (one process per GPU, except
    device-map: one process, the model's layers split across the GPUs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: PositiveInt = 1
    strategy: Strategy = "ddp"
    offload: Offload = "none"
    gpus_per_node: PositiveInt | None = None  # None: all GPUs in one node
    sharding_strategy: ShardingStrategy = "FULL_SHARD"  # fsdp only
    use_orig_params: bool = False  # fsdp only (PEFT's FSDP-QLoRA config sets False)
    device_map_balance: Balance = "balanced"  # device-map only
    max_memory_bytes: int | None = Field(default=None, gt=0)  # device-map: per GPU
    cpu_ram_efficient_loading: bool = True  # fsdp: rank 0 loads, others on meta
    zero_reduce_bucket_elems: PositiveInt = ZERO_REDUCE_BUCKET_ELEMS
    zero_prefetch_bucket_elems: PositiveInt = ZERO_PREFETCH_BUCKET_ELEMS

    @model_validator(mode="after")
    def _check(self) -> ParallelPlan:
        if self.offload == "cpu" and self.strategy in ("ddp", "device-map"):
            raise ValueError(f"--offload cpu needs a sharded strategy (fsdp, zero2, zero3), "
                             f"not {self.strategy}")
        node = self.node_size
        if self.gpus % node:
            raise ValueError(f"--gpus {self.gpus} is not a multiple of --gpus-per-node {node}")
        if self.strategy == "device-map" and self.gpus_per_node is not None and node < self.gpus:
            raise ValueError("device-map runs in one process: all its GPUs must be in one node")
        return self

    @property
    def node_size(self) -> int:
        return min(self.gpus_per_node or self.gpus, self.gpus)

    @property
    def nodes(self) -> int:
        return self.gpus // self.node_size

    @property
    def shard_group(self) -> int:
        """GPUs one copy of the sharded state is split over (FSDP HYBRID_SHARD: one node)."""
        if self.strategy == "fsdp":
            if self.sharding_strategy == "NO_SHARD":
                return 1
            return self.node_size
        if self.strategy in ("zero2", "zero3"):
            return self.gpus
        return 1

    @property
    def label(self) -> str:
        parts = [f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}", self.strategy]
        if self.strategy == "fsdp":
            hybrid = self.gpus_per_node is not None and self.node_size < self.gpus
            parts.append("HYBRID_SHARD" if hybrid else self.sharding_strategy)
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        return ", ".join(parts)


class ParallelEstimate(BaseModel):
    """The busiest GPU's estimate (same fields as one GPU), every GPU's, and host RAM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parallel: ParallelPlan
    busiest: Estimate
    busiest_gpu: int
    per_gpu: list[Estimate]
    single_gpu: Estimate  # the plan on one GPU, for comparison
    placement: dict[str, str]  # component -> replicated / sharded 1/S / host / split by layer
    comm_detail: dict[str, int]  # bytes of each communication term on the busiest GPU
    layers_per_gpu: list[int] | None = None  # device-map
    host_offload_bytes: int = 0  # per node: offloaded shards of every local process
    host_loading_bytes: int = 0  # per node: peak host RAM while loading the weights
    notes: tuple[str, ...] = ()

    @property
    def host_ram_bytes(self) -> int:
        return max(self.host_offload_bytes, self.host_loading_bytes)


# ---- helpers ------------------------------------------------------------------------------


def _div(nbytes: int, n: int) -> int:
    return -(-nbytes // n) if nbytes > 0 else 0


def _allocated(c: dict[str, int]) -> int:
    outside = ("optimizer_paged", "allocator_slack", "cuda_context")
    return sum(v for k, v in c.items() if k not in outside)


def _assemble(ref: Estimate, c: dict[str, int], has_logits: bool = True,
              notes: tuple[str, ...] = (), trainable: int | None = None,
              expandable: bool = False) -> Estimate:
    """An Estimate from per-GPU components, with the single-GPU totals' formulas
    (estimate.py): reserved = allocated + slack, device = reserved + context + paged,
    required = allocated + unreleasable slack + context + paged. Phases other than the
    peak are the single-GPU phases shifted by the same static difference."""
    allocated = _allocated(c)
    slack, context, paged = c["allocator_slack"], c["cuda_context"], c["optimizer_paged"]
    # the unreleasable slack of the single-GPU plan (it follows the logits: none on a GPU
    # that does not compute them)
    outside = ref.peak_allocated_bytes + ref.components.cuda_context + ref.paged_bytes
    low, high = ref.required_low - outside, ref.required_device_bytes - outside
    if not has_logits:
        low = high = required_slack(0, 0, False, expandable)[0]
    delta = allocated - ref.peak_allocated_bytes
    phases = {k: max(0, v + delta) for k, v in ref.phases.items()}
    phases[ref.peak_phase] = allocated
    return Estimate(
        model=ref.model,
        task=ref.task,
        params=ref.params,
        trainable_params=ref.trainable_params if trainable is None else trainable,
        components=Components(**c),
        phases=phases,
        peak_phase=ref.peak_phase,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=allocated + slack,
        peak_device_bytes=allocated + slack + context + paged,
        required_device_bytes=allocated + high + context + paged,
        required_device_low_bytes=allocated + low + context + paged,
        paged_bytes=paged,
        notes=ref.notes + notes,
    )


def trainable_grad_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Bytes of one gradient per trainable parameter (LoRA: fp32 adapters; full: the load
    dtype, as torch AdamW keeps grads in the parameter dtype)."""
    if plan.is_lora:
        return lora_param_bytes(spec, plan)
    return spec.num_params() * DTYPE_BYTES[plan.load_dtype]


def _trainable_count(spec: ModelSpec, plan: TrainPlan) -> int:
    return lora_param_count(spec, plan) if plan.is_lora else spec.num_params()


def _sharded_qlora_reference(spec: ModelSpec, plan: TrainPlan,
                             estimate_fn: SingleEstimate = estimate) -> Estimate:
    """FSDP-QLoRA / ZeRO-3-QLoRA as PEFT's recipe runs it: `bnb_4bit_quant_storage=bf16`,
    the model loaded with dtype=bf16, and TRL's SFTTrainer skips
    prepare_model_for_kbit_training for sharded QLoRA (`is_sharded_qlora`, Params4bit on cpu
    or meta), so nothing is upcast to fp32: norms, embeddings, lm_head and the residual
    stream stay bf16. Activations, logits and transients are those of the same plan on a
    bf16 base (method lora); weights are the 4-bit ones with the unquantized part in bf16.
    Packed 4-bit weights stored as bf16 are numel/4 elements: the same bytes as uint8."""
    lora_plan = plan.model_copy(update={"method": "lora", "quant": "none"})
    ref = estimate_fn(spec, lora_plan)
    wb = weight_bytes(spec, plan)
    load = DTYPE_BYTES[plan.load_dtype]
    comps = dict(ref.components.items())
    comps.update(
        base_weights=wb.base_weights,
        quant_constants=wb.quant_constants,
        unquantized_params=unquantized_param_bytes(spec, load) + wb.buffers,
        expert_weights=spec.num_hidden_layers * expert_bytes(spec, load),
    )
    return _assemble(ref, comps, expandable=plan.expandable_segments)


def _layer_unit_bytes(spec: ModelSpec, plan: TrainPlan, ref: Estimate) -> int:
    """One decoder layer as FSDP all-gathers it (TRANSFORMER_BASED_WRAP on the decoder
    layer class): its sharded parameters in their storage dtype, LoRA adapters included
    (PEFT's fsdp_auto_wrap_policy wraps them as their own units inside the layer)."""
    c = ref.components
    layers = spec.num_hidden_layers
    root = _root_unit_bytes(spec, plan)
    per_layer_small = max(0, c.unquantized_params - root)
    return _div(c.base_weights + c.expert_weights + c.adapter_weights + per_layer_small, layers)


def _root_unit_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Embeddings, untied lm_head and final norm: the root FSDP unit (outside every layer)."""
    dtype = DTYPE_BYTES[plan.load_dtype]
    if plan.quant != "none" and plan.method == "qlora":
        dtype = 2  # sharded QLoRA keeps them in the bf16 storage dtype
    return (spec.embedding_params() + spec.lm_head_params() + spec.hidden_size) * dtype


# ---- strategies ---------------------------------------------------------------------------


def _ddp(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate
         ) -> tuple[dict[str, int], dict[str, str], dict[str, int], list[str]]:
    c = dict(ref.components.items())
    buckets = trainable_grad_bytes(spec, plan)
    c["comm_buffers"] = buckets
    c["cuda_context"] += NCCL_BUFFERS
    placement = {k: "replicated" for k, v in c.items() if v}
    placement["comm_buffers"] = "DDP gradient buckets (a second copy of the gradients)"
    notes = ["DDP replicates every component; gradient_as_bucket_view=True would save the "
             "bucket copy"]
    return c, placement, {"ddp_buckets": buckets, "nccl": NCCL_BUFFERS}, notes


def _fsdp(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate
          ) -> tuple[dict[str, int], dict[str, str], dict[str, int], list[str], int]:
    s = par.shard_group
    c = dict(ref.components.items())
    placement: dict[str, str] = {}
    notes: list[str] = []
    unit = _layer_unit_bytes(spec, plan, ref)
    root = _root_unit_bytes(spec, plan)
    shardable = ("base_weights", "unquantized_params", "expert_weights", "adapter_weights")
    full_params = sum(c[k] for k in shardable)
    # gradients: the flat parameter's gradient. use_orig_params=False with PEFT's wrap
    # policy: LoRA units hold only trainable params. use_orig_params=True with frozen and
    # trainable params in one flat parameter: the gradient covers every element.
    if c["gradients"] and par.use_orig_params and plan.is_lora:
        c["gradients"] = full_params - c["adapter_weights"] + c["gradients"]
        notes.append("use_orig_params=True: each layer's flat gradient covers its frozen "
                      "elements too (PEFT: keep it False to save memory)")
    offload = par.offload == "cpu"
    had_grads = c["gradients"] > 0
    host = 0
    for k in (*shardable, "gradients", "optimizer_states", "optimizer_paged"):
        shard = _div(c[k], s)
        if offload:
            host += shard
            c[k] = 0
            placement[k] = f"sharded 1/{s}, on host (CPU offload)"
        else:
            c[k] = shard
            placement[k] = f"sharded 1/{s}" if s > 1 else "replicated (NO_SHARD)"
    placement["quant_constants"] = "replicated (QuantState is not an FSDP parameter)"
    if par.sharding_strategy == "FULL_SHARD" and s > 1:
        # _runtime_utils._post_forward_reshard: the root's parameters are not freed after
        # the forward for FULL_SHARD; layers are gathered FSDP_UNITS_IN_FLIGHT at a time.
        gathered = FSDP_UNITS_IN_FLIGHT * unit + root
    elif par.sharding_strategy == "SHARD_GRAD_OP" and s > 1:
        gathered = full_params - c["adapter_weights"]  # unsharded from forward to backward
    else:
        gathered = full_params if offload else 0
    unit_grad = _div(trainable_grad_bytes(spec, plan), spec.num_hidden_layers) if had_grads else 0
    c["comm_buffers"] = gathered + unit_grad
    c["cuda_context"] += NCCL_BUFFERS
    placement["comm_buffers"] = "all-gathered units (2 layers + root) + one layer's unsharded grad"
    detail = {"gathered_params": gathered, "unsharded_unit_grad": unit_grad, "nccl": NCCL_BUFFERS}
    if plan.method == "qlora":
        notes.append("FSDP-QLoRA: bnb_4bit_quant_storage=bf16, no fp32 upcast (TRL "
                     "is_sharded_qlora); quantization constants replicated on every GPU")
    return c, placement, detail, notes, host * par.node_size


def _zero(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate
          ) -> tuple[dict[str, int], dict[str, str], dict[str, int], list[str], int]:
    n = par.gpus
    stage3 = par.strategy == "zero3"
    c = dict(ref.components.items())
    placement: dict[str, str] = {}
    notes: list[str] = []
    p_t = _trainable_count(spec, plan)
    # DeepSpeed bf16 (runtime/engine.py _configure_distributed_model casts the module with
    # module.bfloat16() up to v0.19.1; #8066 changed that): 16-bit trainable params on the
    # GPU, fp32 master partition (4 B) in the optimizer, 16-bit gradient partition; the
    # optimizer's own states partitioned.
    trainable16 = 2 * p_t
    master = _div(4 * p_t, n)
    grads16 = _div(2 * p_t, n) if c["gradients"] else 0
    ipg = 2 * par.zero_reduce_bucket_elems
    offload = par.offload == "cpu"
    host = 0
    if plan.is_lora:
        c["adapter_weights"] = trainable16
    opt = _div(c["optimizer_states"], n) + master
    paged = _div(c["optimizer_paged"], n)
    if offload:  # ZeRO-Offload: optimizer states, fp32 master and fp32 grads on the host
        host += opt + paged + _div(4 * p_t, n)
        opt = paged = 0
        grads16 = 0
    c["optimizer_states"], c["optimizer_paged"], c["gradients"] = opt, paged, grads16
    where = "host (offload_optimizer cpu)" if offload else f"sharded 1/{n}"
    placement.update(optimizer_states=f"{where} (+ fp32 master weights)",
                     optimizer_paged=where, gradients=where)
    gathered = 0
    if stage3:
        for k in ("base_weights", "unquantized_params", "expert_weights", "adapter_weights"):
            shard = _div(c[k], n)
            if offload:
                host += shard
                c[k] = 0
            else:
                c[k] = shard
            placement[k] = f"sharded 1/{n}" + (", on host (offload_param cpu)" if offload else "")
        unit = _layer_unit_bytes(spec, plan, ref)
        lm = max(spec.embedding_params(), spec.lm_head_params()) * 2
        gathered = max(unit, lm) + 2 * par.zero_prefetch_bucket_elems
        placement["comm_buffers"] = "gathered module + prefetch bucket + ipg gradient bucket"
    else:
        for k in ("base_weights", "unquantized_params", "expert_weights", "adapter_weights"):
            if c[k]:
                placement[k] = "replicated"
        placement["comm_buffers"] = "ipg gradient bucket (reduce_bucket_size, 16-bit)"
    placement["quant_constants"] = "replicated"
    c["comm_buffers"] = gathered + ipg
    c["cuda_context"] += NCCL_BUFFERS
    notes.append(f"ZeRO reduce_bucket_size {par.zero_reduce_bucket_elems:,} elements (DeepSpeed "
                 "default; 'auto' in a config file means hidden^2)")
    detail = {"gathered_params": gathered, "ipg_bucket": ipg, "nccl": NCCL_BUFFERS}
    return c, placement, detail, notes, host * par.node_size


# ---- device_map="auto" --------------------------------------------------------------------


def device_map_layers(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan) -> list[int]:
    """Decoder layers per GPU as transformers / accelerate place them.

    Module sizes are the loaded sizes (4-bit packed, bf16 for the rest: hf_quantizer's
    param_element_size). balanced: get_balanced_memory caps GPUs 0..N-2 at total // N +
    1.25 * largest layer; sequential: each GPU's max_memory. bnb quantizers keep 90 % of
    max_memory (adjust_max_memory). infer_auto_device_map walks embed_tokens, the layers,
    norm, lm_head in order, moving to the next GPU when a module does not fit, and keeps
    room for the largest layer on GPU 0 (its main device). The last GPU takes the rest."""
    n = par.gpus
    layers = spec.num_hidden_layers
    load = DTYPE_BYTES[plan.load_dtype]
    wb = weight_bytes(spec, plan)
    small = spec.layer_small_params() * load
    layer = _div(wb.base_weights + wb.quant_constants, layers) + small + expert_bytes(spec, load)
    embed = spec.embedding_params() * load
    head = (spec.lm_head_params() + spec.hidden_size) * load
    total = embed + layers * layer + head
    frac = BNB_MAX_MEMORY_FRACTION if plan.quant != "none" else 1.0
    big = 1 << 62
    mem = par.max_memory_bytes or big
    if par.device_map_balance == "balanced":
        per_gpu = total // n + int(BALANCED_BUFFER_FACTOR * layer)
        caps = [min(per_gpu, mem) for _ in range(n - 1)] + [mem]
    else:
        caps = [mem] * n
    caps = [int(cap * frac) if cap < big else cap for cap in caps]
    caps[0] -= layer  # main device keeps room for the largest layer
    counts = [0] * n
    used = [0] * n
    dev = 0
    modules = [("embed", embed)] + [("layer", layer)] * layers + [("head", head)]
    for kind, size in modules:
        while dev < n - 1 and used[dev] + size > caps[dev]:
            dev += 1
        used[dev] += size
        if kind == "layer":
            counts[dev] += 1
    return counts


def _device_map(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate
                ) -> tuple[list[Estimate], list[int], list[str]]:
    counts = device_map_layers(spec, plan, par)
    layers = spec.num_hidden_layers
    c = ref.components
    load = DTYPE_BYTES[plan.load_dtype] if plan.quant == "none" else 4  # fp32 after prepare
    embed = spec.embedding_params() * load
    head = (spec.lm_head_params() + spec.hidden_size) * load
    per_layer_unq = max(0, c.unquantized_params - embed - head)
    checkpoints = layers * plan.tokens * (4 if plan.quant != "none" else load) * spec.hidden_size
    checkpoints = checkpoints if plan.gradient_checkpointing else 0
    out: list[Estimate] = []
    notes = ["device_map splits the layers: one GPU computes at a time (no speed-up)"]
    for i, k in enumerate(counts):
        share = k / layers
        is_first, is_last = i == 0, i == len(counts) - 1
        comps = {name: 0 for name, _ in c.items()}
        for name in ("base_weights", "quant_constants", "expert_weights", "adapter_weights",
                     "gradients", "optimizer_states", "optimizer_paged"):
            comps[name] = int(c[name] * share)
        comps["unquantized_params"] = (int(per_layer_unq * share) + (embed if is_first else 0)
                                       + (head if is_last else 0))
        # activations: this GPU's layers' saved tensors; the layer recomputed in backward
        # and the loss live where the layer / lm_head are.
        comps["activations"] = int(c.activations * share)
        if is_last:
            comps["logits_loss"] = c.logits_loss
            comps["transient"] = c.transient
        elif k:
            comps["transient"] = int(c.transient * share)
        comps["cublas_workspace"] = CUBLAS_WORKSPACES if (k or is_first or is_last) else 0
        comps["cuda_context"] = CUDA_CONTEXT
        logits32 = 4 * plan.tokens * spec.vocab_size if is_last else 0
        comps["allocator_slack"] = allocator_slack(logits32, int(checkpoints * share), 0)
        out.append(_assemble(ref, comps, is_last,
                             expandable=plan.expandable_segments))
    return out, counts, notes


# ---- entry point --------------------------------------------------------------------------


def estimate_parallel(spec: ModelSpec, plan: TrainPlan, parallel: ParallelPlan,
                      estimate_fn: SingleEstimate = estimate) -> ParallelEstimate:
    """Per-GPU peak memory of `plan` (per-device batch) spread as `parallel` says, from
    `estimate_fn`'s one-GPU estimates (the full estimate; a search's first guess passes
    the quick one, search.quick_estimate)."""
    if plan.quant == "int8" and parallel.strategy in ("fsdp", "zero3"):
        raise PlanError("int8 (LLM.int8) weights cannot be sharded by FSDP or ZeRO-3; use "
                        "--quant nf4 (FSDP-QLoRA) or --strategy ddp / zero2 / device-map")
    single = estimate_fn(spec, plan)
    sharded_qlora = plan.method == "qlora" and plan.quant in ("nf4", "fp4") and (
        parallel.strategy == "fsdp" or parallel.strategy == "zero3")
    ref = _sharded_qlora_reference(spec, plan, estimate_fn) if sharded_qlora else single
    notes: list[str] = []
    host_loading = 0
    layers_per_gpu = None
    if parallel.strategy == "device-map":
        per_gpu, layers_per_gpu, notes = _device_map(spec, plan, parallel, ref)
        busiest_i = max(range(len(per_gpu)), key=lambda i: per_gpu[i].required_device_bytes)
        placement = {"layers": "split by layer", "embeddings": "GPU 0",
                     "lm_head, logits, loss": f"GPU {parallel.gpus - 1}"}
        pe = ParallelEstimate(
            parallel=parallel, busiest=per_gpu[busiest_i], busiest_gpu=busiest_i,
            per_gpu=per_gpu, single_gpu=single, placement=placement, comm_detail={},
            layers_per_gpu=layers_per_gpu, notes=tuple(notes))
        return pe
    host_offload = 0
    if parallel.strategy == "ddp":
        comps, placement, detail, notes = _ddp(spec, plan, parallel, ref)
    elif parallel.strategy == "fsdp":
        comps, placement, detail, notes, host_offload = _fsdp(spec, plan, parallel, ref)
        model_bytes = sum(ref.components[k] for k in (
            "base_weights", "quant_constants", "unquantized_params", "expert_weights"))
        copies = 1 if parallel.cpu_ram_efficient_loading else parallel.node_size
        host_loading = copies * model_bytes
    else:
        comps, placement, detail, notes, host_offload = _zero(spec, plan, parallel, ref)
    est = _assemble(ref, comps, trainable=_trainable_count(spec, plan),
                    expandable=plan.expandable_segments)
    return ParallelEstimate(
        parallel=parallel, busiest=est, busiest_gpu=0, per_gpu=[est] * parallel.gpus,
        single_gpu=single, placement=placement, comm_detail=detail,
        host_offload_bytes=host_offload, host_loading_bytes=host_loading, notes=tuple(notes))


# ---- what fits ----------------------------------------------------------------------------


class ParallelOption(BaseModel):
    """The smallest GPU count with which a strategy fits a per-GPU budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: str
    gpus: int
    offload: str
    required_device_bytes: int  # on the busiest GPU
    flags: str


SUGGESTED = (("ddp", "none"), ("fsdp", "none"), ("zero3", "none"), ("device-map", "none"),
             ("fsdp", "cpu"))


def smallest_fitting_parallel(spec: ModelSpec, plan: TrainPlan, memory_bytes: int,
                              margin_bytes: int, max_gpus: int = 8,
                              gpus_per_node: int | None = None) -> list[ParallelOption]:
    """For each strategy, the smallest N in 2..max_gpus whose busiest GPU "fits" a card
    offering `memory_bytes` with `margin_bytes` to spare (verdict.fits_certainly, the rule
    of every suggestion); sorted by N (then by what the busiest GPU needs). On the full
    estimate: the one-GPU estimates every N and strategy start from are made once."""
    from vramcalc.corrections.planning import memoized
    from vramcalc.sizing.verdict import fits_certainly

    single = memoized(estimate)
    found: list[ParallelOption] = []
    for strategy, offload in SUGGESTED:
        for n in range(2, max_gpus + 1):
            try:
                par = ParallelPlan(gpus=n, strategy=strategy, offload=offload,  # type: ignore[arg-type]
                                   gpus_per_node=gpus_per_node if gpus_per_node and
                                   n % gpus_per_node == 0 and strategy != "device-map" else None)
            except ValueError:
                continue
            try:
                need = estimate_parallel(spec, plan, par, single).busiest.required_device_bytes
            except PlanError:  # a strategy this plan cannot use (int8 under FSDP / ZeRO-3)
                break
            if fits_certainly(memory_bytes, need, margin_bytes):
                flags = f"--gpus {n} --strategy {strategy}" + (
                    f" --offload {offload}" if offload != "none" else "")
                found.append(ParallelOption(strategy=strategy, gpus=n, offload=offload,
                                            required_device_bytes=need, flags=flags))
                break
    return sorted(found, key=lambda o: (o.gpus, o.required_device_bytes))
