"""Bytes an MLP activation moves through memory per element, forward and backward
(step_time's *_ACT_BYTES), counted on the CPU.

    python calibration/count_act_bytes.py [ACT ...]   (default: gelu_new silu gelu_pytorch_tanh)

A TorchDispatchMode sums, for every operator that is not a view, the bytes of its tensor
inputs and outputs (numel x element size), over `ACT2FN[act](x)` in forward and
`y.backward(g)` in backward, for a bf16 x of 2^20 elements that requires grad (as fc1's
output under autocast). What is counted is each kernel's reads and writes as eager PyTorch
issues them (no fusion); scalars and 0-d tensors count nothing.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

N = 1 << 20


class Bytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or not getattr(func, "is_view", False):
            tensors = [t for t in tree_leaves((args, kwargs or {}, out))
                       if isinstance(t, torch.Tensor) and t.dim() > 0]
            if not any(t.numel() == 0 for t in tensors) and func.__name__ not in (
                    "detach.default", "view.default", "_unsafe_view.default"):
                self.ops += 1
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count(act: str) -> tuple[float, float, int, int]:
    from transformers.activations import ACT2FN

    fn = ACT2FN[act]
    x = torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(N, dtype=torch.bfloat16)
    f = Bytes()
    with f:
        y = fn(x)
    b = Bytes()
    with b:
        y.backward(g)
    return f.bytes / N, b.bytes / N, f.ops, b.ops


def main(argv: list[str]) -> None:
    print(f"{'act':20} {'fwd B/elt':>10} {'bwd B/elt':>10} {'fwd ops':>8} {'bwd ops':>8}")
    for act in argv or ["gelu_new", "silu", "gelu_pytorch_tanh", "gelu"]:
        fb, bb, fo, bo = count(act)
        print(f"{act:20} {fb:10.1f} {bb:10.1f} {fo:8d} {bo:8d}")


if __name__ == "__main__":
    main(sys.argv[1:])
