"""How long one training step takes on several GPUs of one machine: each GPU's own step,
plus the collectives its strategy adds, less what of them hides behind the compute.

Pure arithmetic on the spec and the plans, like step_time: no torch. Every GPU of a
data-parallel strategy (ddp, fsdp, zero2, zero3) runs the one-GPU step of the per-device
batch (`step_time.train_work` of the plan), its optimizer over its shard where the
strategy shards it; the step's tokens are every GPU's. device-map runs the model's layers
on the GPUs in turn, one process: the one-GPU step, no more tokens.

The collectives, with the bytes each GPU sends (and receives) in a ring, as nccl-tests'
PERFORMANCE.md counts bus bytes: all-reduce 2(n-1)/n of the buffer, all-gather and
reduce-scatter (n-1)/n of the whole. Their time is those bytes over the link's bandwidth
times its efficiency (gpu_speed.yaml `links`), plus NCCL_CALL_S per call.

- ddp: the gradients all-reduced in 25 MiB buckets as backward makes them
  (torch/nn/parallel/distributed.py, bucket_cap_mb=25), in their own dtype
  (multi_gpu.trainable_grad_bytes). They overlap the backward; the last bucket follows it.
- fsdp FULL_SHARD: every unit all-gathered in forward and again in backward (resharded
  after forward, but the root: torch/distributed/fsdp/_runtime_utils.py
  `_post_forward_reshard`), its gradient reduce-scattered in backward; prefetched one unit
  ahead (limit_all_gathers, BACKWARD_PRE), so they overlap the compute but the first
  unit's gather and the last one's reduce-scatter. SHARD_GRAD_OP gathers once (forward);
  NO_SHARD all-reduces each unit's gradient. Under MixedPrecision(param_dtype=bf16) over
  fp32 weights the gathers and gradients are 16-bit (multi_gpu._fsdp).
- zero3: the same gathers and reduce-scatter (DeepSpeed prefetches and overlaps: stage 3's
  `overlap_comm` defaults to True, deepspeed/runtime/zero/config.py `overlap_comm_valid`),
  16-bit (DeepSpeed bf16 casts the module, multi_gpu._zero).
- zero2: the 16-bit gradients reduce-scattered as backward makes them, then the updated
  16-bit parameters all-gathered after the step. `overlap_comm` defaults to False below
  stage 3 (same validator): both wait for the compute, none overlaps.

What it leaves out, each stated where the time is shown: CPU offload (the host's
optimizer step), several machines (inter-node links), the SMs NCCL's kernels take from
the compute, and the activations device-map passes between GPUs. No multi-GPU step has
been timed by us: every number here is derived (docs/memory-model.md "Time on several
GPUs").
"""

from __future__ import annotations

import math
from typing import NamedTuple

from vramcalc.errors import PlanError
from vramcalc.memory.multi_gpu import (
    ParallelPlan,
    casts_weights_down,
    is_sharded_qlora,
    root_unit_bytes,
    trainable_count,
    trainable_grad_bytes,
)
from vramcalc.memory.program.trainable import lora_param_bytes
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    expert_bytes,
    unquantized_param_bytes,
    weight_bytes,
)
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.timing.gpu_speed import Link
from vramcalc.timing.step_time import GpuSpeed, StepTime, step_time, train_work
from vramcalc.units import MiB

# Fixed cost of one NCCL collective call (launch and ring latency): an assumption, of the
# order nccl-tests reports for small messages on one machine (tens of microseconds).
NCCL_CALL_S = 20e-6
# DDP's gradient buckets (torch/nn/parallel/distributed.py _DEFAULT_BUCKET_CAP_MB).
DDP_BUCKET_BYTES = 25 * MiB


class Collective(NamedTuple):
    """One kind of collective in a step: the bus bytes each GPU moves, in how many calls,
    and when (forward, backward, after: once the optimizer step is done)."""

    name: str
    phase: str
    bus_bytes: float
    calls: int
    seconds: float


class ParallelStepTime(NamedTuple):
    """One step on several GPUs: each GPU's compute, the collectives, and what of them the
    compute does not hide (`exposed_seconds`)."""

    gpu: str
    gpus: int
    strategy: str
    link: str
    tokens: int  # every GPU's tokens (device-map: the one step's)
    compute_seconds: float  # one GPU's step, its optimizer over its shard
    comm_seconds: float  # every collective, back to back
    exposed_seconds: float
    step_seconds: float
    collectives: tuple[Collective, ...]
    step: StepTime  # the one GPU's step that `compute_seconds` is

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds

    @property
    def communication_share(self) -> float:
        """The share of the step spent waiting for collectives."""
        return self.exposed_seconds / self.step_seconds


def not_timed(plan: TrainPlan, par: ParallelPlan) -> str | None:
    """Why the time of `par` is not modelled (None: it is)."""
    if par.offload == "cpu":
        return "the optimizer step on the host (--offload cpu) is not modelled"
    if par.nodes > 1:
        return "links between machines (--gpus-per-node) are not modelled"
    return None


def _seconds(bus_bytes: float, calls: int, link: Link) -> float:
    return bus_bytes / (link.bandwidth * link.efficiency) + calls * NCCL_CALL_S


def _gather_scale(plan: TrainPlan) -> tuple[int, int]:
    """(numerator, denominator) from the weights' bytes as loaded to as gathered: the
    compute dtype's over the load dtype's where the strategy casts the weights down
    (multi_gpu.casts_weights_down), else 1."""
    if casts_weights_down(plan):
        return DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.load_dtype]
    return 1, 1


def gathered_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """The parameters a sharded strategy all-gathers per pass, as it gathers them: the
    weights as loaded (QLoRA: the packed 4-bit bytes, which quant_storage keeps the same;
    quantization constants stay replicated), LoRA adapters included, in the compute dtype
    where the strategy casts fp32 weights down (`_gather_scale`)."""
    load = DTYPE_BYTES[plan.load_dtype]
    wb = weight_bytes(spec, plan)
    total = (wb.base_weights + unquantized_param_bytes(spec, load)
             + spec.num_hidden_layers * expert_bytes(spec, load))
    if plan.is_lora:
        total += lora_param_bytes(spec, plan)
    num, den = _gather_scale(plan)
    return total * num // den


def _reduced_grad_bytes(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan) -> int:
    """The gradients a step reduces: DDP in their own dtype; FSDP in param_dtype where it
    casts fp32 weights down; DeepSpeed in 16 bits."""
    if par.strategy in ("zero2", "zero3"):
        return 2 * trainable_count(spec, plan)
    grads = trainable_grad_bytes(spec, plan)
    if par.strategy == "fsdp" and not plan.is_lora:
        num, den = _gather_scale(plan)
        grads = grads * num // den
    return grads


def collectives(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan, link: Link
                ) -> list[Collective]:
    """The collectives of one step of `plan` under `par` (module docstring)."""
    n = par.gpus
    if n == 1 or par.strategy == "device-map":
        return []
    ring = (n - 1) / n
    units = spec.num_hidden_layers + 1  # a unit per decoder layer, and the root
    grads = _reduced_grad_bytes(spec, plan, par)
    out: list[Collective] = []

    def add(name: str, phase: str, bus: float, calls: int) -> None:
        out.append(Collective(name, phase, bus, calls, _seconds(bus, calls, link)))

    if par.strategy == "ddp" or (par.strategy == "fsdp" and par.sharding_strategy == "NO_SHARD"):
        calls = (max(1, math.ceil(grads / DDP_BUCKET_BYTES)) if par.strategy == "ddp"
                 else units)
        add("all-reduce gradients", "backward", 2 * ring * grads, calls)
        return out
    gathered = gathered_bytes(spec, plan)
    if par.strategy == "zero2":
        add("reduce-scatter gradients", "backward", ring * grads,
            max(1, math.ceil(grads / (2 * par.zero_reduce_bucket_elems))))
        add("all-gather updated parameters", "after", ring * 2 * trainable_count(spec, plan), 1)
        return out
    # fsdp FULL_SHARD / SHARD_GRAD_OP, zero3
    add("all-gather parameters (forward)", "forward", ring * gathered, units)
    if par.strategy == "zero3" or par.sharding_strategy == "FULL_SHARD":
        # FSDP keeps the root unit gathered after the forward (_post_forward_reshard)
        num, den = _gather_scale(plan)
        root = root_unit_bytes(spec, plan) * num // den if par.strategy == "fsdp" else 0
        add("all-gather parameters (backward)", "backward", ring * max(0, gathered - root),
            units - (1 if root else 0))
    add("reduce-scatter gradients", "backward", ring * grads, units)
    return out


def _sharded_work_step(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan,
                       speed: GpuSpeed) -> StepTime:
    """One GPU's step: the plan's own, its optimizer's kernels over 1/n of the parameters
    where the strategy shards the optimizer (fsdp but NO_SHARD, zero2, zero3). Sharded
    QLoRA (fsdp or zero3 over 4-bit weights) runs without kbit preparation, as the memory
    of several GPUs has it (TRL's `is_sharded_qlora` skips prepare_model_for_kbit_training:
    multi_gpu._sharded_qlora_reference): no fp32 norms, embeddings or residual stream."""
    if is_sharded_qlora(plan, par):
        plan = plan.model_copy(update={"kbit_prep": False})
    work = train_work(spec, plan)
    n = par.shard_group  # 1 where nothing is sharded (ddp, device-map, fsdp NO_SHARD)
    if n > 1:
        o = work.optimizer
        work = work._replace(optimizer=o._replace(
            flops=o.flops / n, bytes=o.bytes / n, sm_ops=o.sm_ops / n,
            sm_bytes=o.sm_bytes / n))
    return step_time(work, speed)


def parallel_step_time(spec: ModelSpec, plan: TrainPlan, par: ParallelPlan,
                       speed: GpuSpeed, link: Link) -> ParallelStepTime:
    """The step of `plan` (per-device batch) on `par.gpus` GPUs of `speed`'s kind joined
    by `link`. PlanError where `not_timed` says the model does not cover it."""
    why = not_timed(plan, par)
    if why is not None:
        raise PlanError(f"time of several GPUs: {why}")
    step = _sharded_work_step(spec, plan, par, speed)
    data_parallel = par.strategy != "device-map"
    tokens = step.tokens * (par.gpus if data_parallel else 1)
    found = collectives(spec, plan, par, link)
    comm = sum(c.seconds for c in found)
    exposed = 0.0
    overlapped = par.strategy != "zero2"  # overlap_comm: False below stage 3
    for phase, compute in (("forward", step.forward_seconds),
                           ("backward", step.backward_seconds)):
        mine = [c for c in found if c.phase == phase]
        total = sum(c.seconds for c in mine)
        if not total:
            continue
        if overlapped:
            # prefetched or bucketed: what outlasts the compute, and one call's share of
            # each collective that cannot overlap (the first gather, the last reduction)
            edge = sum(c.seconds / c.calls for c in mine)
            exposed += max(0.0, total - compute) + edge
        else:
            exposed += total
    exposed += sum(c.seconds for c in found if c.phase == "after")
    return ParallelStepTime(
        gpu=speed.name, gpus=par.gpus, strategy=par.label, link=link.kind, tokens=tokens,
        compute_seconds=step.step_seconds, comm_seconds=comm, exposed_seconds=exposed,
        step_seconds=step.step_seconds + exposed, collectives=tuple(found), step=step)
