"""Estimates and verdicts -> rich tables or JSON-ready dicts. GiB = 2**30, labelled GiB."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from vramcalc.plan_settings import TrainPlan
from vramcalc.result import COMPONENTS, Estimate

GiB = 2**30
BAR_WIDTH = 24

LABELS = {
    "base_weights": "quantized base weights",
    "quant_constants": "quantization constants",
    "unquantized_params": "unquantized params (emb, lm_head, norms)",
    "expert_weights": "MoE experts (not quantized)",
    "adapter_weights": "LoRA parameters",
    "gradients": "LoRA gradients",
    "optimizer_states": "optimizer states",
    "optimizer_paged": "optimizer states (paged, managed)",
    "activations": "activations",
    "kv_cache": "KV cache",
    "logits_loss": "logits + loss",
    "transient": "transients (dequant, casts, grads)",
    "cublas_workspace": "cuBLAS workspaces",
    "comm_buffers": "communication buffers",
    "allocator_slack": "allocator slack (reserved - allocated)",
    "cuda_context": "CUDA context + kernels",
}


def gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f}"


def estimate_to_dict(est: Estimate, plan: TrainPlan) -> dict[str, Any]:
    return {
        "model": est.model,
        "params": est.params,
        "trainable_params": est.trainable_params,
        "plan": plan.model_dump(mode="json"),
        "components": dict(est.components.items()),
        "phases": est.phases,
        "peak_phase": est.peak_phase,
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "peak_device_bytes": est.peak_device_bytes,
        "required_device_bytes": est.required_device_bytes,
    }


def breakdown_table(est: Estimate, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    table.add_column("", no_wrap=True)
    peak = max(est.peak_device_bytes, 1)
    for name in COMPONENTS:
        nbytes = est.components[name]
        if nbytes == 0:
            continue
        share = nbytes / peak
        bar = "█" * max(1, round(share * BAR_WIDTH))
        table.add_row(LABELS[name], gib(nbytes), f"{100 * share:.1f}%", bar)
    table.add_section()
    table.add_row("peak allocated (torch max_memory_allocated)", gib(est.peak_allocated_bytes))
    table.add_row("peak reserved (torch max_memory_reserved)", gib(est.peak_reserved_bytes))
    table.add_row("peak device (NVML, when memory is plentiful)", gib(est.peak_device_bytes))
    table.add_row("[bold]required free memory (decides fit)[/bold]",
                  f"[bold]{gib(est.required_device_bytes)}[/bold]")
    return table


def print_breakdown(est: Estimate, plan: TrainPlan, console: Console) -> None:
    p = plan
    title = (
        f"{est.model} ({est.params / 1e9:.2f} B params, {est.trainable_params / 1e6:.1f} M "
        f"trainable): {p.quant}{'+dq' if p.double_quant and p.quant in ('nf4', 'fp4') else ''}, "
        f"r={p.rank}, batch {p.batch_size} x {p.seq_len} tokens, {p.optimizer}, "
        f"{'grad ckpt' if p.gradient_checkpointing else 'no grad ckpt'}, {p.attn}"
    )
    console.print(breakdown_table(est, title))
    console.print(f"peak phase: {est.peak_phase}")
