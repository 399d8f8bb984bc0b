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
from vramcalc.memory.program.optimizer import optimizer_bytes
from vramcalc.memory.program.trainable import lora_param_bytes, lora_param_count
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    expert_bytes,
    rounded,
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
QuantStorage = Literal["bf16", "fp16", "fp32", "uint8"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SHARDING_STRATEGIES: tuple[str, ...] = get_args(ShardingStrategy)
OFFLOADS: tuple[str, ...] = get_args(Offload)
BALANCES: tuple[str, ...] = get_args(Balance)
QUANT_STORAGES: tuple[str, ...] = get_args(QuantStorage)

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
# DeepSpeed runtime/zero/config.py ZERO_OPTIMIZATION_SUB_GROUP_SIZE_DEFAULT: stage 3 splits
# each rank's fp32 master partition into sub-groups of this many elements
# (stage3.py `_create_fp16_sub_groups`) and steps them one at a time (`step` ->
# `_prepare_fp32_grad_for_sub_group`, `_optimizer_step(sub_group_id)`).
ZERO_SUB_GROUP_ELEMS = 1_000_000_000
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
    zero_sub_group_elems: PositiveInt = ZERO_SUB_GROUP_ELEMS
    # FSDP-QLoRA / ZeRO-3-QLoRA: bnb_4bit_quant_storage, the dtype the packed 4-bit weights
    # are stored in (None: the load dtype, as PEFT's recipe sets it). FSDP1 flattens a
    # unit's parameters into one FlatParameter and needs one dtype for them
    # (torch/distributed/fsdp/_flat_param.py FlatParamHandle._validate_tensors_to_flatten:
    # "Must flatten tensors with uniform dtype"), so uint8 storage cannot be wrapped with
    # the 16-bit norms / embeddings; a float storage dtype holds the same packed bytes
    # (numel / (dtype bytes * 2) elements) and sets the dtype of the unquantized parameters.
    quant_storage: QuantStorage | None = None

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
        if self.quant_storage is not None and self.strategy not in ("fsdp", "zero3"):
            raise ValueError(f"--quant-storage applies to sharded QLoRA (--strategy fsdp or "
                             f"zero3), not {self.strategy}")
        if self.quant_storage == "uint8" and self.strategy == "fsdp":
            raise ValueError("FSDP cannot flatten uint8-stored 4-bit weights with the 16-bit "
                             "norms of their layer (FlatParamHandle: 'Must flatten tensors "
                             "with uniform dtype'); use --quant-storage bf16 (PEFT's "
                             "FSDP-QLoRA recipe)")
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


class PeakTerm(BaseModel):
    """One term of the busiest GPU's peak: bytes and the mechanism behind them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    bytes: int
    why: str


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
    # fsdp / zero: the busiest GPU's peak term by term, each with its mechanism (they add up
    # to busiest.peak_device_bytes); left out of model_dump (derived from `busiest`), shown
    # by `plan` and in its JSON
    peak_terms: list[PeakTerm] = Field(default_factory=list, exclude=True)

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
              expandable: bool = False, phases: dict[str, int] | None = None,
              peak_phase: str | None = None,
              phase_components: dict[str, dict[str, int]] | None = None) -> Estimate:
    """An Estimate from per-GPU components, with the single-GPU totals' formulas
    (estimate.py): reserved = allocated + slack, device = reserved + context + paged,
    required = allocated + unreleasable slack + context + paged. `phases` (with
    `peak_phase`, whose components `c` are): each phase's own allocated peak, where the
    caller placed every phase; else phases other than the peak are the single-GPU phases
    shifted by the same static difference."""
    allocated = _allocated(c)
    slack, context, paged = c["allocator_slack"], c["cuda_context"], c["optimizer_paged"]
    # the unreleasable slack of the single-GPU plan (it follows the logits: none on a GPU
    # that does not compute them)
    outside = ref.peak_allocated_bytes + ref.components.cuda_context + ref.paged_bytes
    low, high = ref.required_low - outside, ref.required_device_bytes - outside
    if not has_logits:
        low = high = required_slack(0, 0, False, expandable)[0]
    if phases is None:
        delta = allocated - ref.peak_allocated_bytes
        phases = {k: max(0, v + delta) for k, v in ref.phases.items()}
        phases[ref.peak_phase] = allocated
        peak_phase = ref.peak_phase
    assert peak_phase is not None
    return Estimate(
        model=ref.model,
        task=ref.task,
        params=ref.params,
        trainable_params=ref.trainable_params if trainable is None else trainable,
        components=Components(**c),
        phases=phases,
        peak_phase=peak_phase,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=allocated + slack,
        peak_device_bytes=allocated + slack + context + paged,
        required_device_bytes=allocated + high + context + paged,
        required_device_low_bytes=allocated + low + context + paged,
        paged_bytes=paged,
        notes=ref.notes + notes,
        phase_components=phase_components or {},
    )


def trainable_grad_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Bytes of one gradient per trainable parameter (LoRA: fp32 adapters; full: the load
    dtype, as torch AdamW keeps grads in the parameter dtype)."""
    if plan.is_lora:
        return lora_param_bytes(spec, plan)
    return spec.num_params() * DTYPE_BYTES[plan.load_dtype]


def trainable_count(spec: ModelSpec, plan: TrainPlan) -> int:
    return lora_param_count(spec, plan) if plan.is_lora else spec.num_params()


def _sharded_qlora_reference(spec: ModelSpec, plan: TrainPlan,
                             estimate_fn: SingleEstimate = estimate) -> tuple[Estimate, TrainPlan]:
    """FSDP-QLoRA / ZeRO-3-QLoRA as PEFT's recipe runs it: `bnb_4bit_quant_storage=bf16`,
    the model loaded with dtype=bf16, and TRL's SFTTrainer skips
    prepare_model_for_kbit_training for sharded QLoRA (`is_sharded_qlora`, Params4bit on cpu
    or meta), so nothing is upcast to fp32: norms, embeddings, lm_head and the residual
    stream stay bf16. Activations, logits and transients are those of the same plan on a
    bf16 base (method lora); weights are the 4-bit ones with the unquantized part in bf16.
    Packed 4-bit weights stored as bf16 are numel/4 elements: the same bytes as uint8.
    Returns the reference and the plan its step ran (the lora plan)."""
    lora_plan = plan.model_copy(update={"method": "lora", "quant": "none", "kbit_prep": True})
    ref = estimate_fn(spec, lora_plan)
    wb = weight_bytes(spec, plan)
    load = DTYPE_BYTES[plan.load_dtype]
    weights = dict(
        base_weights=wb.base_weights,
        quant_constants=wb.quant_constants,
        unquantized_params=unquantized_param_bytes(spec, load) + wb.buffers,
        expert_weights=spec.num_hidden_layers * expert_bytes(spec, load),
    )
    comps = dict(ref.components.items())
    comps.update(weights)
    per_phase = {phase: {**pc, **weights} for phase, pc in ref.phase_components.items()}
    return _assemble(ref, comps, expandable=plan.expandable_segments,
                     phase_components=per_phase), lora_plan


def _layer_unit_bytes(spec: ModelSpec, plan: TrainPlan, ref: Estimate) -> int:
    """One decoder layer as FSDP all-gathers it (TRANSFORMER_BASED_WRAP on the decoder
    layer class): its sharded parameters in their storage dtype, LoRA adapters included
    (PEFT's fsdp_auto_wrap_policy wraps them as their own units inside the layer)."""
    c = ref.components
    layers = spec.num_hidden_layers
    root = root_unit_bytes(spec, plan)
    per_layer_small = max(0, c.unquantized_params - root)
    return _div(c.base_weights + c.expert_weights + c.adapter_weights + per_layer_small, layers)


def root_unit_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """Embeddings, untied lm_head and final norm: the root FSDP unit (outside every layer),
    in the load dtype (sharded QLoRA: the quant_storage dtype, which FSDP's uniform-dtype
    flat parameter makes the same)."""
    dtype = DTYPE_BYTES[plan.load_dtype]
    return (spec.embedding_params() + spec.lm_head_params() + spec.hidden_size) * dtype


def casts_weights_down(plan: TrainPlan) -> bool:
    """Weights stored above the compute dtype (fp32 weights, bf16 compute) that the
    strategy casts itself: FSDP MixedPrecision(param_dtype=bf16) (accelerate's
    FullyShardedDataParallelPlugin.set_mixed_precision for mixed_precision bf16) gathers
    16-bit copies; DeepSpeed bf16 casts the module (engine.py `module.bfloat16()`). Not
    QLoRA: its 4-bit weights are gathered as stored. Also the time of several GPUs'
    gathered bytes (timing/parallel_time.py)."""
    return (DTYPE_BYTES[plan.load_dtype] > DTYPE_BYTES[plan.compute_dtype]
            and plan.method != "qlora")


def is_sharded_qlora(plan: TrainPlan, parallel: ParallelPlan) -> bool:
    """4-bit QLoRA weights sharded by FSDP or ZeRO-3 (PEFT's FSDP-QLoRA recipe, TRL's
    `is_sharded_qlora`: no prepare_model_for_kbit_training, `_sharded_qlora_reference`)."""
    return plan.method == "qlora" and plan.quant in ("nf4", "fp4") and (
        parallel.strategy == "fsdp" or parallel.strategy == "zero3")


def _autocast_copies(spec: ModelSpec, plan: TrainPlan) -> tuple[int, int]:
    """The one-GPU estimate's autocast weight casts (estimate.py: `weight_copies`, alive at
    the forward's end for full fine-tuning, and `lm_head_copy`), forward and backward, that
    do not exist when the strategy hands the layers 16-bit parameters (autocast's
    `cached_cast` casts only tensors above the compute dtype). 0 where the weights are in
    the compute dtype."""
    if not casts_weights_down(plan):
        return 0, 0
    compute = DTYPE_BYTES[plan.compute_dtype]
    layers = spec.num_hidden_layers
    copies = layers * sum(rounded(lin.weight_numel * compute) for lin in spec.block_linears())
    lm_head = rounded(spec.vocab_size * spec.hidden_size * compute)
    forward = lm_head + (copies if plan.method == "full" or not plan.gradient_checkpointing
                         else 0)
    backward = lm_head + (0 if plan.gradient_checkpointing else copies)
    return forward, backward


def _drop_casts(c: dict[str, int], phase: str, casts: tuple[int, int]) -> None:
    """Take the autocast copies the strategy makes unnecessary off the phase's
    transients (what the one-GPU attribution puts there)."""
    drop = {"forward": casts[0], "backward": casts[1]}.get(phase, 0)
    c["transient"] = max(0, c["transient"] - drop)


def _phase_inputs(ref: Estimate) -> dict[str, dict[str, int]]:
    """Each phase's one-GPU components at that phase's peak (Estimate.phase_components);
    only the peak phase's where the estimate has no per-phase attribution."""
    if ref.phase_components:
        return {phase: dict(c) for phase, c in ref.phase_components.items()}
    return {ref.peak_phase: dict(ref.components.items())}


def _busiest_phase(per_phase: dict[str, dict[str, int]], ref: Estimate) -> str:
    """The phase whose placed components allocate the most (ties: the one-GPU peak phase,
    then the phase order)."""
    order = [ref.peak_phase, *(p for p in per_phase if p != ref.peak_phase)]
    return max(order, key=lambda p: _allocated(per_phase[p]))


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


class _Placed(BaseModel):
    """A sharded strategy's placement of every phase: the busiest phase's components, each
    phase's allocated peak, the communication terms of the busiest phase (with those that
    are reserved, not allocated), host bytes and notes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    comps: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    phase_components: dict[str, dict[str, int]]
    placement: dict[str, str]
    detail: dict[str, int]
    notes: list[str]
    host: int
    terms: list[PeakTerm]


def _step_on_gpu(step_transient: int, phase: str, c: dict[str, int], shard_step: int) -> None:
    """The optimizer phase's step transient (the single-GPU foreach step's, in `c`) replaced
    by what the GPU runs: `shard_step` bytes (0: the step runs on the host)."""
    if phase == "optimizer":
        c["transient"] = max(0, c["transient"] - step_transient) + shard_step


def _fsdp(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate,
          step_transient: int) -> _Placed:
    s = par.shard_group
    placement: dict[str, str] = {}
    notes: list[str] = []
    unit = _layer_unit_bytes(spec, plan, ref)
    root = root_unit_bytes(spec, plan)
    shardable = ("base_weights", "unquantized_params", "expert_weights", "adapter_weights")
    offload = par.offload == "cpu"
    # MixedPrecision(param_dtype=bf16) over fp32 parameters: each unit's shard is cast to a
    # 16-bit `_mp_shard` (FlatParamHandle._use_low_precision_shard) and all-gathered into a
    # 16-bit unsharded flat parameter; the unsharded gradient is 16-bit too (param_dtype)
    # and its reduced shard is cast back to fp32 (`_cast_grad_to_param_dtype`). No autocast
    # casts of the weights are left to make.
    mp = casts_weights_down(plan)
    casts = _autocast_copies(spec, plan) if mp else (0, 0)
    scale = (DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.load_dtype]) if mp else (1, 1)
    if mp:
        notes.append(f"MixedPrecision(param_dtype={plan.compute_dtype}) over "
                     f"{plan.load_dtype} parameters: {plan.compute_dtype} units gathered, "
                     f"no autocast weight copies")
    had_grads = any(pc.get("gradients", 0) for pc in _phase_inputs(ref).values())
    # a layer unit's gradient; full fine-tuning: the root unit (embeddings, lm_head, norm)
    # is trainable too, and its FlatParameter's gradient forms from the lm_head's (the first
    # backward reaches: use_orig_params=False makes the parameters views of the flat one,
    # `_use_unsharded_views`, so autograd builds a flat-size gradient) and waits for the
    # embedding's (the last) before the root's AccumulateGrad post-backward hook
    # (`_register_post_backward_hooks`) reduce-scatters it: unsharded all through backward.
    full = not plan.is_lora
    unit_grad = 0
    if had_grads:
        unit_grad = _div(trainable_grad_bytes(spec, plan) - (root if full else 0),
                         spec.num_hidden_layers)
        if full:  # param_dtype gradients
            unit_grad = unit_grad * scale[0] // scale[1]
    unit, root = unit * scale[0] // scale[1], root * scale[0] // scale[1]
    root_grad = root if full and had_grads and s > 1 else 0
    full_shard = par.sharding_strategy == "FULL_SHARD" and s > 1
    grad_op = par.sharding_strategy == "SHARD_GRAD_OP" and s > 1
    if par.use_orig_params and plan.is_lora and had_grads:
        notes.append("use_orig_params=True: each layer's flat gradient covers its frozen "
                     "elements too (PEFT: keep it False to save memory)")
    # The foreach step (torch/optim/adamw.py _multi_tensor_adamw) runs over the parameters
    # the optimizer holds: each rank's FlatParameter shards (FSDP1 use_orig_params=False;
    # views of them with True), so its temporaries are 1/S of the one-GPU step's. With
    # CPUOffload(offload_params=True) the shards, their gradients and the optimizer states
    # are on the host and the step runs there (torch/distributed/fsdp/_runtime_utils.py
    # `_post_reduce_grad_callback` -> `_offload_grad` copies the sharded gradient to CPU).
    shard_step = 0 if offload else _div(step_transient, s)
    per_phase: dict[str, dict[str, int]] = {}
    slack_extra: dict[str, int] = {}
    host = 0
    gathered_of: dict[str, int] = {}
    grads_of: dict[str, int] = {}
    for phase, one in _phase_inputs(ref).items():
        c = dict(one)
        full_params = sum(c[k] for k in shardable)
        # gradients: the flat parameter's gradient. use_orig_params=False with PEFT's wrap
        # policy: LoRA units hold only trainable params. use_orig_params=True with frozen
        # and trainable params in one flat parameter: the gradient covers every element.
        if c["gradients"] and par.use_orig_params and plan.is_lora:
            c["gradients"] = full_params - c["adapter_weights"] + c["gradients"]
        phase_host = 0
        for k in (*shardable, "gradients", "optimizer_states", "optimizer_paged"):
            shard = _div(c[k], s)
            if offload:
                phase_host += shard
                c[k] = 0
                placement[k] = f"sharded 1/{s}, on host (CPU offload)"
            else:
                c[k] = shard
                placement[k] = f"sharded 1/{s}" if s > 1 else "replicated (NO_SHARD)"
        host = max(host, phase_host)
        _step_on_gpu(step_transient, phase, c, shard_step)
        _drop_casts(c, phase, casts)
        # All-gathered parameters. FULL_SHARD: _runtime_utils._post_forward_reshard does not
        # free the root's parameters after the forward, and layers are gathered
        # FSDP_UNITS_IN_FLIGHT at a time (forward and BACKWARD_PRE prefetch); every unit,
        # the root included, is resharded in the post-backward (`_post_backward_reshard`),
        # so the optimizer step sees shards only. SHARD_GRAD_OP: unsharded from the
        # forward to the backward. NO_SHARD with offload: the whole model on the GPU
        # while it computes.
        computing = phase in ("forward", "backward")
        if full_shard:
            gathered = FSDP_UNITS_IN_FLIGHT * unit + root if computing else 0
        elif grad_op:
            gathered = full_params - one["adapter_weights"] if computing else 0
            if mp:
                gathered = gathered * scale[0] // scale[1]
        else:
            gathered = full_params if offload and computing else 0
        # Backward: a unit's unsharded gradient (its FlatParameter's .grad) until its
        # post-backward hook reduce-scatters it (`_reduce_grad` -> `_get_reduce_scatter_
        # tensors`: the unsharded gradient is the input, `torch.empty_like(chunks[0])` the
        # 1/S output). The input is handed to the post-backward stream
        # (`_no_dispatch_record_stream`): freed (allocated stats drop) when `_reduce_grad`
        # returns, but its block is not reused until the reduce-scatter ends, while the next
        # unit's gradient is computed: one more unit's gradient reserved, not allocated.
        # NO_SHARD (S = 1): `_reduce_grad_no_shard` all-reduces the gradient in place.
        grads = (unit_grad + _div(unit_grad, s) + root_grad
                 if phase == "backward" and s > 1 else 0)
        if mp and s > 1 and phase in ("forward", "backward"):
            grads += _div(unit, s)  # the `_mp_shard` of the unit being gathered
        c["comm_buffers"] = gathered + grads
        slack_extra[phase] = unit_grad if phase == "backward" and s > 1 else 0
        c["allocator_slack"] += slack_extra[phase]
        c["cuda_context"] += NCCL_BUFFERS
        gathered_of[phase], grads_of[phase] = gathered, grads
        per_phase[phase] = c
    placement["quant_constants"] = "replicated (QuantState is not an FSDP parameter)"
    placement["comm_buffers"] = ("all-gathered units (2 layers + root) + one layer's unsharded "
                                 "grad and its reduce-scatter output")
    peak = _busiest_phase(per_phase, ref)
    detail = {"gathered_params": gathered_of[peak], "unsharded_unit_grad": grads_of[peak],
              "unsharded_root_grad": root_grad if peak == "backward" else 0,
              "reduce_scatter_in_flight": slack_extra[peak], "nccl": NCCL_BUFFERS}
    if plan.method == "qlora":
        notes.append("FSDP-QLoRA: bnb_4bit_quant_storage=bf16, no fp32 upcast (TRL "
                     "is_sharded_qlora); quantization constants replicated on every GPU")
    if step_transient:
        notes.append("the optimizer step runs on the host (CPU offload)" if offload else
                     f"the foreach optimizer step touches only this GPU's 1/{s} shard")
    c = per_phase[peak]
    terms = _terms(c, peak, {
        "gathered_params": (gathered_of[peak], "all-gathered units (FSDP_UNITS_IN_FLIGHT "
                            "layers + the root: embeddings, lm_head, norm)"),
        "unsharded_grads": (grads_of[peak], "one unit's unsharded gradient + its 1/S "
                            "reduce-scatter output (full: + the root unit's, all backward)"),
        "reduce_scatter_in_flight": (slack_extra[peak], "the previous unit's gradient, held "
                                     "by the post-backward stream (reserved)"),
    }, s, offload)
    return _Placed(comps=c, phases={p: _allocated(v) for p, v in per_phase.items()},
                   peak_phase=peak, phase_components=per_phase, placement=placement,
                   detail=detail, notes=notes, host=host * par.node_size, terms=terms)


def _zero(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, ref: Estimate,
          step_transient: int) -> _Placed:
    n = par.gpus
    stage3 = par.strategy == "zero3"
    placement: dict[str, str] = {}
    notes: list[str] = []
    p_t = trainable_count(spec, plan)
    # DeepSpeed bf16 (runtime/engine.py _configure_distributed_model casts the module with
    # module.bfloat16() up to v0.19.1; #8066 changed that): 16-bit trainable params on the
    # GPU, fp32 master partition (4 B) in the optimizer, 16-bit gradient partition; the
    # optimizer's own states partitioned, made by the client optimizer over the fp32 master
    # partition (torch AdamW `_init_group`: zeros_like(p), so fp32 exp_avg / exp_avg_sq;
    # bitsandbytes 8-bit states are uint8 + fp32 absmax whatever the parameter dtype).
    trainable16 = 2 * p_t
    master = _div(4 * p_t, n)
    offload = par.offload == "cpu"
    adam_torch = plan.optimizer in ("adamw_torch", "adamw_torch_fused")
    param_dtype = DTYPE_BYTES[plan.adapter_dtype if plan.is_lora else plan.load_dtype]
    ipg = 2 * par.zero_reduce_bucket_elems
    # The step, without offload: rank by rank over its fp32 partition, stage 3 one sub-group
    # at a time: the sub-group's 16-bit gradient partition flattened and cast to fp32
    # (stage3.py `_prepare_fp32_grad_for_sub_group`; stage_1_and_2.py `step`:
    # `single_grad_partition = ...to(fp32)`), and the foreach AdamW temporaries over that
    # fp32 tensor (one sqrt of exp_avg_sq, 4 B per element). With offload_optimizer cpu the
    # step is DeepSpeedCPUAdam on the host's fp32 partition (ops/adam/cpu_adam.py), nothing
    # of it on the GPU.
    part = _div(p_t, n)
    stepped = min(part, par.zero_sub_group_elems) if stage3 else part
    shard_step = 0 if offload else 4 * stepped + (4 * stepped if step_transient else 0)
    per_phase: dict[str, dict[str, int]] = {}
    host = 0
    gathered_of: dict[str, int] = {}
    unit = _layer_unit_bytes(spec, plan, ref)
    if casts_weights_down(plan):
        unit = unit * DTYPE_BYTES[plan.compute_dtype] // DTYPE_BYTES[plan.load_dtype]
    lm = max(spec.embedding_params(), spec.lm_head_params()) * 2
    # bf16 over fp32 weights: DeepSpeed casts the module to 16 bits (engine.py
    # `_configure_distributed_model`: module.bfloat16()): 16-bit weights, no autocast casts
    cast16 = casts_weights_down(plan)
    casts = _autocast_copies(spec, plan) if cast16 else (0, 0)
    if cast16:
        notes.append(f"DeepSpeed bf16 casts the {plan.load_dtype} module to "
                     f"{plan.compute_dtype}: 16-bit weights, no autocast weight copies")
    for phase, one in _phase_inputs(ref).items():
        c = dict(one)
        phase_host = 0
        if cast16:
            for k in ("base_weights", "unquantized_params", "expert_weights"):
                c[k] = c[k] * DTYPE_BYTES[plan.compute_dtype] // DTYPE_BYTES[plan.load_dtype]
            _drop_casts(c, phase, casts)
        if plan.is_lora and c["adapter_weights"]:
            c["adapter_weights"] = trainable16
        states = c["optimizer_states"]
        if adam_torch and states:
            states = states * 4 // param_dtype
        opt = _div(states, n) + (master if phase != "load" else 0)
        paged = _div(c["optimizer_paged"], n)
        grads16 = _div(2 * p_t, n) if c["gradients"] else 0
        if offload:  # ZeRO-Offload: optimizer states, fp32 master and fp32 grads on the host
            phase_host += opt + paged + (_div(4 * p_t, n) if phase != "load" else 0)
            opt = paged = 0
            grads16 = 0
        c["optimizer_states"], c["optimizer_paged"], c["gradients"] = opt, paged, grads16
        _step_on_gpu(step_transient, phase, c, 0)
        if phase == "optimizer":
            c["transient"] += shard_step
        gathered = 0
        if stage3:
            for k in ("base_weights", "unquantized_params", "expert_weights", "adapter_weights"):
                shard = _div(c[k], n)
                if offload:
                    phase_host += shard
                    c[k] = 0
                else:
                    c[k] = shard
                placement[k] = (f"sharded 1/{n}"
                                + (", on host (offload_param cpu)" if offload else ""))
            # partitioned_param_coordinator.py fetch_sub_module: the module being computed
            # (a layer, or the embedding / lm_head) and the prefetch bucket; both released
            # after the module's backward (`release_sub_module`), so the step sees none
            if phase in ("forward", "backward"):
                gathered = max(unit, lm) + 2 * par.zero_prefetch_bucket_elems
        else:
            for k in ("base_weights", "unquantized_params", "expert_weights", "adapter_weights"):
                if c[k]:
                    placement[k] = "replicated"
        host = max(host, phase_host)
        c["comm_buffers"] = gathered + (ipg if phase != "load" else 0)
        c["cuda_context"] += NCCL_BUFFERS
        gathered_of[phase] = gathered
        per_phase[phase] = c
    where = "host (offload_optimizer cpu)" if offload else f"sharded 1/{n}"
    placement.update(optimizer_states=f"{where} (+ fp32 master weights)",
                     optimizer_paged=where, gradients=where)
    placement["comm_buffers"] = ("gathered module + prefetch bucket + ipg gradient bucket"
                                 if stage3 else
                                 "ipg gradient bucket (reduce_bucket_size, 16-bit)")
    placement["quant_constants"] = "replicated"
    notes.append(f"ZeRO reduce_bucket_size {par.zero_reduce_bucket_elems:,} elements (DeepSpeed "
                 "default; 'auto' in a config file means hidden^2)")
    if offload:
        notes.append("offload_optimizer cpu: the optimizer step runs on the host "
                     "(DeepSpeedCPUAdam), not on the GPU")
    peak = _busiest_phase(per_phase, ref)
    c = per_phase[peak]
    detail = {"gathered_params": gathered_of[peak],
              "ipg_bucket": ipg if peak != "load" else 0, "nccl": NCCL_BUFFERS}
    terms = _terms(c, peak, {
        "gathered_params": (gathered_of[peak], "the module being computed (a layer, or the "
                            "embedding / lm_head) + stage3_prefetch_bucket_size"),
        "ipg_bucket": (detail["ipg_bucket"], "reduce_bucket_size elements in 16 bits"),
    }, n, offload)
    return _Placed(comps=c, phases={p: _allocated(v) for p, v in per_phase.items()},
                   peak_phase=peak, phase_components=per_phase, placement=placement,
                   detail=detail, notes=notes, host=host * par.node_size, terms=terms)


_TERM_WHY = {
    "base_weights": "weights", "quant_constants": "4-bit quantization constants (replicated)",
    "unquantized_params": "embeddings, lm_head, norms", "expert_weights": "MoE experts",
    "adapter_weights": "LoRA adapters", "gradients": "gradients",
    "optimizer_states": "optimizer states", "optimizer_paged": "paged optimizer states",
    "activations": "saved activations (as on one GPU, per-device batch)",
    "logits_loss": "logits and loss (as on one GPU)",
    "transient": "transients of the phase (as on one GPU; the optimizer step's: this GPU's)",
    "cublas_workspace": "cuBLAS workspaces",
    "allocator_slack": "reserved - allocated (the one-GPU replay's slack, not replayed per GPU)",
    "cuda_context": "CUDA context + kernels + NCCL buffers (assumed channel count)",
}


def _terms(c: dict[str, int], phase: str, comm: dict[str, tuple[int, str]], s: int,
           offload: bool) -> list[PeakTerm]:
    """The busiest GPU's peak (phase `phase`, components `c`) term by term, communication
    split into its parts; the terms add up to peak device bytes."""
    out = [PeakTerm(name="phase", bytes=0, why=f"the busiest phase on this GPU: {phase}")]
    sharded = ("base_weights", "unquantized_params", "expert_weights", "adapter_weights",
               "gradients", "optimizer_states", "optimizer_paged")
    for k, v in c.items():
        if k == "comm_buffers":
            for name, (b, why) in comm.items():
                if b and name != "reduce_scatter_in_flight":
                    out.append(PeakTerm(name=name, bytes=b, why=why))
            continue
        if k == "allocator_slack":
            held = comm.get("reduce_scatter_in_flight", (0, ""))
            if held[0]:
                out.append(PeakTerm(name="reduce_scatter_in_flight", bytes=held[0], why=held[1]))
                v -= held[0]
        if not v:
            continue
        why = _TERM_WHY.get(k, k)
        if k in sharded:
            why += f", this GPU's 1/{s} shard"
        out.append(PeakTerm(name=k, bytes=v, why=why))
    if offload:
        out.append(PeakTerm(name="offloaded", bytes=0, why="sharded weights, gradients, "
                            "optimizer states and the optimizer step are on the host"))
    return out


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
    load = DTYPE_BYTES[plan.param_dtype]  # fp32 after prepare_model_for_kbit_training
    embed = spec.embedding_params() * load
    head = (spec.lm_head_params() + spec.hidden_size) * load
    per_layer_unq = max(0, c.unquantized_params - embed - head)
    checkpoints = layers * plan.tokens * load * spec.hidden_size
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
    sharded_qlora = is_sharded_qlora(plan, parallel)
    storage = parallel.quant_storage
    if storage is not None and not sharded_qlora:
        raise PlanError("--quant-storage is the storage dtype of 4-bit weights: it needs "
                        "--method qlora --quant nf4|fp4 with --strategy fsdp or zero3")
    if storage is not None and parallel.strategy == "fsdp" and storage != plan.load_dtype:
        raise PlanError(f"FSDP flattens a layer's 4-bit weights with its {plan.load_dtype} "
                        f"norms into one FlatParameter, which needs one dtype "
                        f"(FlatParamHandle: 'Must flatten tensors with uniform dtype'): "
                        f"--quant-storage must be the load dtype {plan.load_dtype}, not "
                        f"{storage}")
    step_plan = plan
    ref = single
    if sharded_qlora:
        ref, step_plan = _sharded_qlora_reference(spec, plan, estimate_fn)
    # the one-GPU foreach step's temporaries (optimizer.optimizer_bytes), which a sharded
    # step replaces by its own
    step_transient = optimizer_bytes(spec, step_plan).step_transient
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
    if parallel.strategy == "ddp":
        comps, placement, detail, notes = _ddp(spec, plan, parallel, ref)
        est = _assemble(ref, comps, trainable=trainable_count(spec, plan),
                        expandable=plan.expandable_segments)
        return ParallelEstimate(
            parallel=parallel, busiest=est, busiest_gpu=0, per_gpu=[est] * parallel.gpus,
            single_gpu=single, placement=placement, comm_detail=detail, notes=tuple(notes))
    if parallel.strategy == "fsdp":
        placed = _fsdp(spec, plan, parallel, ref, step_transient)
        model_bytes = sum(ref.components[k] for k in (
            "base_weights", "quant_constants", "unquantized_params", "expert_weights"))
        copies = 1 if parallel.cpu_ram_efficient_loading else parallel.node_size
        host_loading = copies * model_bytes
    else:
        placed = _zero(spec, plan, parallel, ref, step_transient)
    # each phase placed on the GPU as the strategy puts it; the busiest phase is the peak
    est = _assemble(ref, placed.comps, trainable=trainable_count(spec, plan),
                    expandable=plan.expandable_segments, phases=placed.phases,
                    peak_phase=placed.peak_phase, phase_components=placed.phase_components)
    return ParallelEstimate(
        parallel=parallel, busiest=est, busiest_gpu=0, per_gpu=[est] * parallel.gpus,
        single_gpu=single, placement=placed.placement, comm_detail=placed.detail,
        host_offload_bytes=placed.host, host_loading_bytes=host_loading,
        notes=tuple(placed.notes), peak_terms=placed.terms)


# ---- what fits ----------------------------------------------------------------------------


class ParallelOption(BaseModel):
    """The smallest GPU count with which a strategy fits a per-GPU budget."""

    # built on first use: only check's several-GPU offers make one
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    strategy: str
    gpus: int
    offload: str
    required_device_bytes: int  # on the busiest GPU
    flags: str


SUGGESTED = (("ddp", "none"), ("fsdp", "none"), ("zero3", "none"), ("device-map", "none"),
             ("fsdp", "cpu"))


def smallest_fitting_parallel(spec: ModelSpec, plan: TrainPlan, memory_bytes: int,
                              margin_bytes: int, max_gpus: int = 8,
                              gpus_per_node: int | None = None,
                              single: SingleEstimate | None = None) -> list[ParallelOption]:
    """For each strategy, the smallest N in 2..max_gpus whose busiest GPU "fits" a card
    offering `memory_bytes` with `margin_bytes` to spare (verdict.fits_certainly, the rule
    of every suggestion); sorted by N (then by what the busiest GPU needs). On the full
    estimate: the one-GPU estimates every N and strategy start from are made once.
    `single`: the raw full estimate, memoized, where the caller has one with the plans it
    already estimated (check: corrections.planning.Estimators.raw); None: a new one."""
    from vramcalc.corrections.planning import memoized
    from vramcalc.sizing.verdict import fits_certainly

    if single is None:
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
