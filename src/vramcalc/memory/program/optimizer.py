"""Optimizer states: torch AdamW, bitsandbytes 8-bit and paged optimizers, SGD."""

from __future__ import annotations

from vramcalc.memory.program.trainable import trainable_tensors
from vramcalc.memory.program.weights import DYNAMIC_MAP_BYTES, ceil_div, rounded
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.records import Frozen

ADAM_8BIT_MIN_SIZE = 4096  # bnb optim.Optimizer8bit min_8bit_size: smaller tensors stay 32-bit
ADAM_8BIT_BLOCKSIZE = 256  # bnb blockwise 8-bit optimizer states: one fp32 absmax per 256
PAGED_MIN_NUMEL = 100_000  # bnb Optimizer8bit.get_state_buffer: numel < 1e5 is never paged


# ---- optimizer ---------------------------------------------------------------------------


class OptimizerBytes(Frozen):
    _fields = ("device", "paged", "step_transient")
    device: int  # allocated through torch (counted by max_memory_allocated)
    paged: int  # cudaMallocManaged by bitsandbytes: outside torch's statistics
    step_transient: int  # extra allocated while optimizer.step() runs

    def __init__(self, device: int, paged: int, step_transient: int) -> None:
        self.__dict__.update(device=device, paged=paged, step_transient=step_transient)


def _states_32bit(embedding: bool, plan: TrainPlan) -> bool:
    """An nn.Embedding weight under a bitsandbytes 8-bit optimizer keeps 32-bit states when
    a Trainer built the optimizer: transformers trainer.py `Trainer.create_optimizer`
    registers `{"optim_bits": 32}` for every nn.Embedding weight
    (`GlobalOptimManager.register_module_override`). One built directly (`--loop plain`:
    `bnb.optim.AdamW8bit(model.parameters())`) has no override: 8-bit states like the rest."""
    return embedding and plan.trainer_built


def _absmax_bytes(numel: int) -> int:
    """The two fp32 absmax tensors of a blockwise 8-bit state pair (0 under 4096 elements,
    whose states stay 32-bit). Plain device tensors even for paged optimizers: bitsandbytes
    optim/optimizer.py `Optimizer8bit.init_state` makes them with torch.zeros on the
    parameter's device, only `get_state_buffer` (state1, state2) pages."""
    if numel < ADAM_8BIT_MIN_SIZE:
        return 0
    return 2 * rounded(4 * ceil_div(numel, ADAM_8BIT_BLOCKSIZE))


def _adam8bit_state(numel: int) -> int:
    """Two uint8 states + one fp32 absmax per 256-block each (bnb 8-bit blockwise Adam)."""
    if numel < ADAM_8BIT_MIN_SIZE:
        return 2 * rounded(4 * numel)
    absmax = rounded(4 * ceil_div(numel, ADAM_8BIT_BLOCKSIZE))
    return 2 * (rounded(numel) + absmax)


def optimizer_bytes(spec: ModelSpec, plan: TrainPlan) -> OptimizerBytes:
    """Optimizer state of the trainable tensors after the first step.

    adamw_torch / _fused: exp_avg + exp_avg_sq in the parameter's dtype (torch/optim/
    adamw.py `_init_group`: zeros_like(p)); fused keeps a device `step` per tensor. The
    foreach implementation (`_multi_tensor_adamw`) allocates `torch._foreach_sqrt(exp_avg_sqs)`
    while stepping: one more copy of the states' size. adamw_8bit / paged_adamw_8bit:
    bitsandbytes blockwise 8-bit states (Optimizer8bit: tensors under 4096 elements keep
    32-bit states); paged_* put tensors of >= 1e5 elements in managed memory. sgd without
    momentum keeps no state.
    """
    tensors = trainable_tensors(spec, plan)
    opt = plan.optimizer
    if opt == "sgd":
        return OptimizerBytes(0, 0, 0)
    if opt in ("adamw_torch", "adamw_torch_fused"):
        device = sum(2 * t.allocated for t in tensors)
        if opt == "adamw_torch_fused":
            steps = sum(t.copies for t in tensors) * rounded(4)
            return OptimizerBytes(device + steps, 0, 0)
        return OptimizerBytes(device, 0, sum(t.allocated for t in tensors))
    paged_flag = opt.startswith("paged_")
    eight_bit = opt.endswith("8bit")
    device = paged = 0
    for t in tensors:
        eight = eight_bit and not _states_32bit(t.embedding, plan)
        state = _adam8bit_state(t.numel) if eight else 2 * rounded(4 * t.numel)
        if paged_flag and t.numel >= PAGED_MIN_NUMEL:
            absmax = _absmax_bytes(t.numel) if eight else 0
            paged += t.copies * (state - absmax)
            device += t.copies * absmax
        else:
            device += t.copies * state
    shared_maps = 2 * rounded(DYNAMIC_MAP_BYTES) if eight_bit else 0
    return OptimizerBytes(device + shared_maps, paged, 0)


def optimizer_state_sizes(spec: ModelSpec, plan: TrainPlan) -> list[int]:
    """The allocated size of every state tensor the optimizer makes on the device at its
    first step (the tensors behind `optimizer_bytes(...).device`, one by one), parameter
    by parameter in the model's order (layer by layer: torch/optim/adamw.py `_init_group`
    and bitsandbytes `Optimizer8bit.init_state` make a parameter's states together)."""
    return [size for group in optimizer_state_groups(spec, plan) for size in group]


def optimizer_state_groups(spec: ModelSpec, plan: TrainPlan) -> list[list[int]]:
    """`optimizer_state_sizes` cut by copy: group k holds the states of the k-th copy of
    every tensor that has more than k (the model-wide tensors in group 0 only, then a
    layer's tensors, or its k-th norm); each parameter's states stay together."""
    opt = plan.optimizer
    if opt == "sgd":
        return []
    per_tensor: list[tuple[list[int], int]] = []  # (one parameter's states, copies)
    for t in trainable_tensors(spec, plan):
        if opt in ("adamw_torch", "adamw_torch_fused"):
            per_tensor.append(([rounded(t.numel * t.dtype_bytes)] * 2, t.copies))
            continue
        eight = (opt.endswith("8bit") and not _states_32bit(t.embedding, plan)
                 and t.numel >= ADAM_8BIT_MIN_SIZE)
        if opt.startswith("paged_") and t.numel >= PAGED_MIN_NUMEL:
            # the states are managed memory, outside the caching allocator; the absmax
            # tensors are not (init_state: state1, state2, absmax1, absmax2)
            if eight:
                per_tensor.append(([_absmax_bytes(t.numel) // 2] * 2, t.copies))
            continue
        if eight:
            absmax = _absmax_bytes(t.numel) // 2
            per_tensor.append(([rounded(t.numel), absmax] * 2, t.copies))
        else:
            per_tensor.append(([rounded(4 * t.numel)] * 2, t.copies))
    return [[size for states, copies in per_tensor if copy < copies for size in states]
            for copy in range(max((c for _, c in per_tensor), default=0))]
