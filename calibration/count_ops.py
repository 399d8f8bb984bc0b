"""Count the operators one decoder block dispatches in a training step (step_time's OPS_*).

    python calibration/count_ops.py [ARCH ...]     (default: llama qwen2 qwen3 gemma2)

On the CPU, no GPU needed: a TorchDispatchMode counts every operator that reaches the
dispatcher (aten ops, views included) in the forward (under bf16 autocast, use_cache off)
and in loss.backward() of a tiny random model of each transformers architecture, at 1 and
3 layers; the difference over 2 is one block's count. Rows: full fine-tuning (every weight
trains) and peft LoRA on all Linears (dropout 0.05), each without and with non-reentrant
checkpointing, and the block with eager attention instead of sdpa. The second step is the
one counted (the first builds caches). What each operator costs the host on a machine is
not counted here: step_time's HOST_FWD_OP_S / HOST_BWD_OP_S were fitted on runs 28, 30,
31 and 32 (docs/time-model.md). `count_ops.py phi` gives phi-2's block (OPS_PHI_LAYER),
`count_ops.py gemma` Gemma (1)'s (OPS_GEMMA).

bitsandbytes' Linear4bit / Linear8bitLt ops are CUDA paths (backends/cuda/ops.py) that do
not run here; step_time counts them from the source (OPS_NF4_*, OPS_INT8_*).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def build(arch: str, layers: int, lora: bool, ckpt: bool, attn: str) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=256, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=layers, vocab_size=1000, head_dim=64)
    cfg._attn_implementation = attn
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if lora:
        if ckpt:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if ckpt:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def count(arch: str, layers: int, lora: bool, ckpt: bool, attn: str) -> tuple[int, int]:
    model = build(arch, layers, lora, ckpt, attn)
    ids = torch.randint(0, 1000, (1, 32))
    fwd = bwd = 0
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = Count()
            with c:
                out = model(input_ids=ids, labels=ids, use_cache=False)
            fwd = c.n
        c = Count()
        with c:
            out.loss.backward()
        bwd = c.n
        model.zero_grad(set_to_none=True)
    return fwd, bwd


def main(argv: list[str]) -> None:
    archs = argv or ["llama", "qwen2", "qwen3", "gemma2"]
    print(f"{'arch':8} {'attn':6} {'method':6} {'ckpt':5} {'fwd':>6} {'bwd':>6}")
    for arch in archs:
        attn = "eager" if arch == "gemma2" else "sdpa"  # Gemma-2 has no sdpa path
        rows = [(lora, ckpt, attn) for lora in (False, True) for ckpt in (False, True)]
        if attn == "sdpa":
            rows.append((False, False, "eager"))
        for lora, ckpt, impl in rows:
            f1, b1 = count(arch, 1, lora, ckpt, impl)
            f3, b3 = count(arch, 3, lora, ckpt, impl)
            print(f"{arch:8} {impl:6} {'lora' if lora else 'full':6} {str(ckpt):5} "
                  f"{(f3 - f1) / 2:6.1f} {(b3 - b1) / 2:6.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
