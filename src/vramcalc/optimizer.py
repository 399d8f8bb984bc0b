"""Optimizer states: torch AdamW, bitsandbytes 8-bit and paged optimizers, SGD."""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.plan_settings import TrainPlan
from vramcalc.specs import ModelSpec
from vramcalc.trainable import lora_param_bytes, lora_tensor_numels
from vramcalc.weights import DYNAMIC_MAP_BYTES, ceil_div, rounded

ADAM_8BIT_MIN_SIZE = 4096  # bnb optim.Optimizer8bit min_8bit_size: smaller tensors stay 32-bit
ADAM_8BIT_BLOCKSIZE = 256  # bnb blockwise 8-bit optimizer states: one fp32 absmax per 256
PAGED_MIN_NUMEL = 100_000  # bnb Optimizer8bit.get_state_buffer: numel < 1e5 is never paged


# ---- optimizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerBytes:
    device: int  # allocated through torch (counted by max_memory_allocated)
    paged: int  # cudaMallocManaged by bitsandbytes: outside torch's statistics
    step_transient: int  # extra allocated while optimizer.step() runs


def _adam8bit_state(numel: int) -> int:
    """Two uint8 states + one fp32 absmax per 256-block each (bnb 8-bit blockwise Adam)."""
    if numel < ADAM_8BIT_MIN_SIZE:
        return 2 * rounded(4 * numel)
    absmax = rounded(4 * ceil_div(numel, ADAM_8BIT_BLOCKSIZE))
    return 2 * (rounded(numel) + absmax)


def optimizer_bytes(spec: ModelSpec, plan: TrainPlan) -> OptimizerBytes:
    """Optimizer state of the LoRA parameters after the first step.

    adamw_torch / _fused: exp_avg + exp_avg_sq, fp32 (torch/optim/adamw.py); the foreach
    implementation allocates one fp32 copy of the params while stepping (measured).
    adamw_8bit / paged_adamw_8bit: bnb blockwise 8-bit states; paged_* put tensors of
    >= 1e5 elements in managed memory. sgd without momentum keeps no state.
    """
    numels = lora_tensor_numels(spec, plan)
    layers = spec.num_hidden_layers
    opt = plan.optimizer
    if opt == "sgd":
        return OptimizerBytes(0, 0, 0)
    if opt in ("adamw_torch", "adamw_torch_fused"):
        device = layers * sum(2 * rounded(4 * n) for n in numels)
        fused_steps = layers * len(numels) * rounded(4) if opt == "adamw_torch_fused" else 0
        transient = lora_param_bytes(spec, plan) if opt == "adamw_torch" else 0
        return OptimizerBytes(device + fused_steps, 0, transient)
    paged_flag = opt.startswith("paged_")
    eight_bit = opt.endswith("8bit")
    device = paged = 0
    for n in numels:
        state = _adam8bit_state(n) if eight_bit else 2 * rounded(4 * n)
        if paged_flag and n >= PAGED_MIN_NUMEL:
            paged += state
        else:
            device += state
    shared_maps = 2 * rounded(DYNAMIC_MAP_BYTES) if eight_bit else 0
    return OptimizerBytes(layers * device + shared_maps, layers * paged, 0)


