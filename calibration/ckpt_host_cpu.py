"""Host seconds per dispatched operator with and without non-reentrant checkpointing, on
the CPU (docs/time-model.md, time holdout 2's "what is left").

    python calibration/ckpt_host_cpu.py

A tiny random Llama (count_ops.build: hidden 256, 4 heads) at 2 and 8 layers, one thread,
batch 1 x 16 tokens under bf16 autocast: per layer, the dispatched operators of forward +
backward (count_ops.Count) and the CPU time (`time.process_time`, the lower quartile of
15 steps after 3 warm-up steps); full fine-tuning and peft LoRA (all-linear), each with
checkpointing off and on. The CPU's own kernels are in the times (tiny tensors); the CUDA
parts of torch.utils.checkpoint (the CUDA RNG state stashed and restored per block) do not
run here. Numbers move with the machine's load: compare rows of one run only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from count_ops import Count, build  # noqa: E402


def _step(model: Any, ids: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def per_layer(lora: bool, ckpt: bool, reps: int = 15) -> tuple[float, float]:
    """(operators, seconds) of one decoder layer's forward + backward."""
    out: dict[int, tuple[int, float]] = {}
    for layers in (2, 8):
        model: Any = build("llama", layers, lora, ckpt, "sdpa")
        model.train()
        ids = torch.randint(0, 1000, (1, 16))

        for _ in range(3):
            _step(model, ids)
        count = Count()
        with count:
            _step(model, ids)
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            _step(model, ids)
            times.append(time.process_time() - t0)
        times.sort()
        out[layers] = (count.n, times[len(times) // 4])
    return ((out[8][0] - out[2][0]) / 6, (out[8][1] - out[2][1]) / 6)


def main() -> None:
    torch.set_num_threads(1)
    for lora in (False, True):
        for ckpt in (False, True):
            ops, sec = per_layer(lora, ckpt)
            print(f"{'lora' if lora else 'full'} checkpointing={'on ' if ckpt else 'off'}: "
                  f"{ops:.0f} operators, {sec * 1e6:.0f} us per layer, "
                  f"{sec / ops * 1e6:.1f} us per operator")


if __name__ == "__main__":
    main()
