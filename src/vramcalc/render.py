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


# ---- inference and merging (task "infer" / "merge") -----------------------------------------

TASK_LABELS: dict[str, dict[str, str]] = {
    "infer": {
        "base_weights": "base weights (quantized or 16-bit)",
        "unquantized_params": "embeddings, lm_head, norms",
        "activations": "prefill / decode live tensors",
        "logits_loss": "logits (fp32 copies in generate)",
        "transient": "old cache tensor during torch.cat",
        "allocator_slack": "allocator slack (outgrown cache segments)",
    },
    "merge": {
        "base_weights": "base weights",
        "unquantized_params": "embeddings, lm_head, norms",
        "transient": "merge transient (delta weight)",
    },
}


def task_label(task: str, name: str, adapter_dtype: str | None = None) -> str:
    if name == "adapter_weights" and adapter_dtype:
        return f"adapter ({adapter_dtype})"
    return TASK_LABELS.get(task, {}).get(name, LABELS[name])


def task_estimate_to_dict(est: Estimate, plan: dict[str, Any]) -> dict[str, Any]:
    """The same keys as a training estimate, plus the task and its notes."""
    return {
        "model": est.model,
        "task": est.task,
        "params": est.params,
        "trainable_params": est.trainable_params,
        "plan": plan,
        "components": dict(est.components.items()),
        "phases": est.phases,
        "peak_phase": est.peak_phase,
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "peak_device_bytes": est.peak_device_bytes,
        "required_device_bytes": est.required_device_bytes,
        "notes": list(est.notes),
    }


def print_task_breakdown(est: Estimate, title: str, console: Console,
                         adapter_dtype: str | None = None) -> None:
    """Breakdown of an inference or merge estimate, labelled for the task."""
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
        table.add_row(task_label(est.task, name, adapter_dtype), gib(nbytes),
                      f"{100 * share:.1f}%", "█" * max(1, round(share * BAR_WIDTH)))
    table.add_section()
    table.add_row("peak allocated (torch max_memory_allocated)", gib(est.peak_allocated_bytes))
    table.add_row("peak reserved (torch max_memory_reserved)", gib(est.peak_reserved_bytes))
    table.add_row("peak device (NVML, when memory is plentiful)", gib(est.peak_device_bytes))
    table.add_row("[bold]required free memory (decides fit)[/bold]",
                  f"[bold]{gib(est.required_device_bytes)}[/bold]")
    console.print(table)
    console.print(f"peak phase: {est.peak_phase}")
    for note in est.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)
