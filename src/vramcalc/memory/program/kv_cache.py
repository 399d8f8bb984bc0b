"""The KV cache's bytes per token and the tokens a layer's cache tensor holds, and the
cuBLAS workspace of inference: what the inference estimate (memory/inference.py) and the
generate() program (memory/program/infer.py) both build on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramcalc.memory.allocator.constants import CUBLAS_WORKSPACES
from vramcalc.memory.program.weights import DTYPE_BYTES

if TYPE_CHECKING:
    from vramcalc.models.spec import ModelSpec
    from vramcalc.plans import InferPlan

# torch CublasHandlePool.cpp: one 32 MiB cuBLAS workspace per handle on Hopper. Inference
# runs under no_grad on the main thread only: one handle (training has two, allocator.py).
CUBLAS_WORKSPACE_INFER = CUBLAS_WORKSPACES // 2


def kv_token_bytes(spec: ModelSpec, plan: InferPlan) -> int:
    """Bytes of one token of one layer's keys (or values) for the whole batch."""
    return plan.batch_size * spec.kv_heads * spec.head_size * DTYPE_BYTES[plan.compute_dtype]


def cached_len(length: int, window: int | None, after_prefill: bool) -> int:
    """Tokens held by one layer's tensor when `length` tokens have gone through it.

    DynamicSlidingWindowLayer.update keeps `full[:, :, -window + 1:]`, a view of the
    concatenated tensor: its storage is the whole concatenation, `window` tokens once
    decoding, the whole prompt right after the prefill.
    """
    if window is None or after_prefill:
        return length
    return min(length, window)
