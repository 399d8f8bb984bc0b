"""Estimates and verdicts -> rich tables or JSON-ready dicts. GiB = 2**30, labelled GiB.

rich.table loads inside the functions that build a table, so `--json` (which only needs
the dict helpers here) never imports rich (issue 9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from vramcalc.plans import TrainPlan
from vramcalc.memory.result import COMPONENTS, Estimate
from vramcalc.units import GiB

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


def _estimate_fields(est: Estimate, plan: Any) -> dict[str, Any]:
    """The keys every estimate's JSON has, in their order (`plan` as given)."""
    return {
        "model": est.model,
        "params": est.params,
        "trainable_params": est.trainable_params,
        "plan": plan,
        "planned_as": est.planned_as,  # settings the stack really runs (see the notes)
        "components": dict(est.components.items()),
        "phases": est.phases,
        "peak_phase": est.peak_phase,
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "peak_device_bytes": est.peak_device_bytes,
        "required_device_bytes": est.required_device_bytes,
        # host memory of offloaded activations (0 without offloading)
        "host_bytes": est.host_bytes,
    }


def estimate_to_dict(est: Estimate, plan: TrainPlan) -> dict[str, Any]:
    return _estimate_fields(est, plan.model_dump(mode="json"))


def train_labels(plan: TrainPlan) -> dict[str, str]:
    """Component labels that say what the plan's tensors are (dtype, trained or frozen)."""
    labels = dict(LABELS)
    if plan.method == "full":
        labels["base_weights"] = f"model weights ({plan.load_dtype}, trained)"
        labels["gradients"] = f"gradients ({plan.load_dtype})"
        labels["unquantized_params"] = f"embeddings, lm_head, norms ({plan.load_dtype}, trained)"
    elif plan.method == "lora":
        labels["base_weights"] = f"base weights ({plan.load_dtype}, frozen)"
        labels["unquantized_params"] = f"embeddings, lm_head, norms ({plan.load_dtype})"
    else:
        labels["base_weights"] = f"quantized base weights ({plan.quant})"
        labels["unquantized_params"] = (
            f"unquantized params (emb, lm_head, norms; {plan.param_dtype})")
    if plan.method != "full":
        labels["adapter_weights"] = f"LoRA parameters ({plan.adapter_dtype})"
        labels["gradients"] = f"LoRA gradients ({plan.adapter_dtype})"
    labels["expert_weights"] = ("MoE experts (3-D, not quantized)" if plan.method != "full"
                                else "MoE experts (trained)")
    return labels


def breakdown_table(est: Estimate, title: str, labels: dict[str, str] | None = None) -> Table:
    from rich.table import Table

    labels = labels or LABELS
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
        table.add_row(labels[name], gib(nbytes), f"{100 * share:.1f}%", bar)
    table.add_section()
    table.add_row("peak allocated (torch max_memory_allocated)", gib(est.peak_allocated_bytes))
    table.add_row("peak reserved (torch max_memory_reserved)", gib(est.peak_reserved_bytes))
    table.add_row("peak device (NVML, when memory is plentiful)", gib(est.peak_device_bytes))
    table.add_row("[bold]required free memory (decides fit)[/bold]",
                  f"[bold]{gib(est.required_device_bytes)}[/bold]")
    return table


def print_breakdown(est: Estimate, plan: TrainPlan, console: Console) -> None:
    p = plan
    if p.method == "full":
        what = f"full fine-tuning, {p.load_dtype} weights"
    elif p.method == "lora":
        what = f"16-bit LoRA ({p.load_dtype} base), r={p.rank}"
    else:
        dq = "+dq" if p.double_quant and p.quant in ("nf4", "fp4") else ""
        what = f"QLoRA {p.quant}{dq}, r={p.rank}"
        if not p.kbit_prep:
            what += ", no kbit prep"
    if p.method != "full" and p.adapter_dtype != "fp32":
        what += f", {p.adapter_dtype} adapters"
    title = (
        f"{est.model} ({est.params / 1e9:.2f} B params, {est.trainable_params / 1e6:.1f} M "
        f"trainable): {what}, {p.compute_dtype} compute, batch {p.batch_size} x {p.seq_len} "
        f"tokens, {p.optimizer}, {'grad ckpt' if p.gradient_checkpointing else 'no grad ckpt'}, "
        f"{p.attn}{'' if p.loop == 'trainer' else f', {p.loop} loop'}"
        f"{'' if p.use_cache is None else ', use_cache ' + ('on' if p.use_cache else 'off')}"
        f"{'' if p.layout == 'padded' else f', {p.layout} ({p.tokens} tokens)'}"
        f"{'' if p.offload_activations == 'none' else f', offload {p.offload_activations}'}"
    )
    # label the tensors the stack really holds (est.planned_as: e.g. an unquantized base)
    labels = train_labels(p.model_copy(update=est.planned_as) if est.planned_as else p)
    console.print(breakdown_table(est, title, labels))
    console.print(f"peak phase: {est.peak_phase}", highlight=False)  # no highlighter to build
    if est.host_bytes:
        console.print(f"host memory (offloaded activations, {p.offload_activations}): "
                      f"{gib(est.host_bytes)} GiB", highlight=False)
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)


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
    return {"model": est.model, "task": est.task, **_estimate_fields(est, plan),
            "notes": list(est.notes)}


def print_task_breakdown(est: Estimate, title: str, console: Console,
                         adapter_dtype: str | None = None) -> None:
    """Breakdown of an inference or merge estimate, labelled for the task."""
    labels = {name: task_label(est.task, name, adapter_dtype) for name in COMPONENTS}
    console.print(breakdown_table(est, title, labels))
    console.print(f"peak phase: {est.peak_phase}", highlight=False)
    for note in est.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)


# ---- compare (one model, every method) and fit (every model, one GPU) -----------------------

_CERTAINTY_CELL = {"fits": "yes", "tight": "[yellow]tight[/yellow]", "does_not_fit": "no"}


def _count(n: int) -> str:
    """Parameters as 8.03B / 41.9M."""
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M"


def comparison_to_dict(model: str, rows: list[Any], margin_bytes: int) -> dict[str, Any]:
    """`compare --json`: one entry per method (comparison.MethodRow)."""
    out = []
    for r in rows:
        e, s = r.estimate, r.smallest_gpu
        out.append({
            "method": r.method,
            "label": r.label,
            "plan": r.plan.model_dump(mode="json"),
            "error": r.error,
            "trainable_params": None if e is None else e.trainable_params,
            "peak_allocated_bytes": None if e is None else e.peak_allocated_bytes,
            "peak_device_bytes": None if e is None else e.peak_device_bytes,
            "required_device_bytes": None if e is None else e.required_device_bytes,
            "planned_as": None if e is None else e.planned_as,
            # the same plan under each loss kernel (comparison.kernel_cells)
            "loss_kernels": {
                k: {"peak_allocated_bytes": None if c.estimate is None
                    else c.estimate.peak_allocated_bytes,
                    "required_device_bytes": None if c.estimate is None
                    else c.estimate.required_device_bytes,
                    "error": c.error}
                for k, c in r.loss_kernels.items()},
            # the same plan with each value of the other switches (comparison.switch_cells):
            # field -> value -> cell; host_bytes is the offloaded activations' host memory
            "switches": {
                field: {v: _cell(c) for v, c in cells.items()}
                for field, cells in r.switches.items()},
            "smallest_gpu": None if s is None else {
                "name": s.gpu, "compute_dtype": s.compute_dtype,
                "memory_bytes": s.verdict.memory_bytes,
                "required_device_bytes": s.verdict.required_bytes,
                "certainty": s.verdict.certainty, "spread_bytes": s.verdict.spread_bytes,
                "headroom_bytes": s.verdict.headroom_bytes,
            },
        })
    return {"model": model, "margin_bytes": margin_bytes, "methods": out}


def _cell(c: Any) -> dict[str, Any]:
    e = c.estimate
    return {"peak_allocated_bytes": None if e is None else e.peak_allocated_bytes,
            "required_device_bytes": None if e is None else e.required_device_bytes,
            "host_bytes": None if e is None else e.host_bytes,
            "error": c.error}


# compare's switch columns: (field, value, header)
_SWITCH_COLUMNS = (("offload_activations", "none", "no offload"),
                   ("offload_activations", "checkpoints", "offload ckpts"),
                   ("offload_activations", "all", "offload all"),
                   ("layout", "padded", "padded"),
                   ("layout", "packed", "packed"),
                   ("layout", "padding-free", "padding-free"))


def _print_switches(rows: list[Any], console: Console) -> None:
    """What activation offloading and the batch layouts buy: every method's required
    free memory with each (comparison.switch_cells), the host memory offloading takes in
    parentheses; '-' where a value does not apply."""
    from rich.table import Table

    if not any(r.switches for r in rows):
        return
    table = Table(title="Needs (GiB) with activation offloading (--offload-activations; "
                  "host GiB in parentheses) and each batch layout (--batch-layout)",
                  title_justify="left")
    table.add_column("Method", no_wrap=True)
    for _, _, header in _SWITCH_COLUMNS:
        table.add_column(header, justify="right")
    for r in rows:
        if not r.switches:
            continue
        cells = []
        for field, value, _ in _SWITCH_COLUMNS:
            c = r.switches[field][value]
            if c.estimate is None:
                cells.append("-")
                continue
            text = gib(c.estimate.required_device_bytes)
            if c.estimate.host_bytes:
                text += f" ({gib(c.estimate.host_bytes)})"
            cells.append(text)
        table.add_row(r.label, *cells)
    console.print(table)


def _print_loss_kernels(rows: list[Any], console: Console) -> None:
    """What each loss kernel buys: every method's required free memory under each
    (comparison.kernel_cells); '-' where the kernel does not apply."""
    from rich.table import Table

    kernels = [k for k in next((r.loss_kernels for r in rows if r.loss_kernels), {})]
    if not kernels:
        return
    table = Table(title="Needs (GiB) with each loss kernel (--loss-kernel): torch is "
                  "transformers' lm_head + cross-entropy", title_justify="left")
    table.add_column("Method", no_wrap=True)
    for k in kernels:
        table.add_column(k, justify="right")
    for r in rows:
        if not r.loss_kernels:
            continue
        cells = []
        for k in kernels:
            c = r.loss_kernels[k]
            cells.append("-" if c.estimate is None else gib(c.estimate.required_device_bytes))
        table.add_row(r.label, *cells)
    console.print(table)


def print_comparison(model: str, params: int, rows: list[Any], margin_bytes: int,
                     console: Console) -> None:
    """The methods side by side; rows that cannot start say why under the table."""
    from rich.table import Table

    first = rows[0].plan
    table = Table(
        title=f"{model} ({_count(params)} params), batch {first.batch_size} x "
        f"{first.seq_len} tokens, r={first.rank}; GiB. Peak: peak allocated; Needs: "
        f"required free memory; smallest catalog GPU it fits (+ {gib(margin_bytes)} margin)",
        title_justify="left")
    for col in ("Method", "Trainable", "Peak", "Needs", "Smallest GPU"):
        table.add_column(col, justify="left" if col in ("Method", "Smallest GPU") else "right",
                         no_wrap=col != "Smallest GPU", min_width=len(col))
    errors: dict[str, list[str]] = {}  # the same reason is said once
    for r in rows:
        e = r.estimate
        if e is None:
            table.add_row(r.label, "-", "-", "-", "[red]cannot start[/red]")
            errors.setdefault(str(r.error), []).append(r.label)
            continue
        s = r.smallest_gpu
        if s is None:
            where = "[red]none in the catalog[/red]"
        else:
            where = s.gpu + (" [yellow](tight)[/yellow]" if s.verdict.certainty == "tight"
                             else "")
        table.add_row(r.label, _count(e.trainable_params), gib(e.peak_allocated_bytes),
                      gib(e.required_device_bytes), where)
    console.print(table)
    _print_loss_kernels(rows, console)
    _print_switches(rows, console)
    by_optimizer: dict[str, list[str]] = {}
    for r in rows:
        by_optimizer.setdefault(r.plan.optimizer, []).append(r.method)
    used = "; ".join(f"{o} for {', '.join(m)}" for o, m in by_optimizer.items())
    console.print(f"optimizer: {used}", highlight=False)
    for reason, labels in errors.items():
        reason = reason.removeprefix("this run cannot start: ")
        console.print(f"[red]{', '.join(labels)} cannot start:[/red] {reason}",
                      highlight=False)
    # where the stack runs something else than asked (effective.py), each reason once
    planned: dict[str, list[str]] = {}
    for r in rows:
        if r.estimate is not None and r.estimate.planned_as:
            for note in r.estimate.notes:
                if "planned as" in note:
                    planned.setdefault(note, []).append(r.label)
    for note, labels in planned.items():
        console.print(f"{', '.join(labels)}: {note}", highlight=False)


def fit_to_dict(gpu: str, memory_bytes: int, rows: list[Any], margin_bytes: int,
                plan: TrainPlan) -> dict[str, Any]:
    """`fit --json`: every model x method (comparison.FitRow), fitting or not."""
    return {
        "gpu": gpu, "gpu_memory_bytes": memory_bytes, "margin_bytes": margin_bytes,
        "batch_size": plan.batch_size, "seq_len": plan.seq_len,
        "rows": [{
            "model": r.model, "params": r.params, "method": r.method, "label": r.label,
            "fits": r.fits,
            "certainty": None if r.verdict is None else r.verdict.certainty,
            "spread_bytes": None if r.verdict is None else r.verdict.spread_bytes,
            "required_device_bytes": r.required_device_bytes,
            "max_batch": r.max_batch, "max_seq_len": r.max_seq_len,
            "max_position_embeddings": r.max_position_embeddings, "error": r.error,
        } for r in rows],
    }


def print_fit(gpu: str, memory_bytes: int, rows: list[Any], margin_bytes: int,
              plan: TrainPlan, console: Console) -> None:
    """The rows that fit at batch 1; a count of the rest; * past max_position_embeddings."""
    from rich.table import Table

    table = Table(
        title=f"Fits {gpu} ({gib(memory_bytes)} GiB, margin {gib(margin_bytes)}) at batch 1 x "
        f"{plan.seq_len} tokens. Needs: required free memory at batch 1, GiB; max batch "
        f"at {plan.seq_len} tokens; max seq-len at batch {plan.batch_size}",
        title_justify="left")
    for col in ("Model", "Params", "Method", "Needs", "Fits", "Max batch", "Max seq"):
        table.add_column(col, justify="left" if col in ("Model", "Method") else "right",
                         no_wrap=True, min_width=len(col))
    past = False
    for r in rows:
        if not r.fits:
            continue
        seq = str(r.max_seq_len) if r.max_seq_len else "-"
        limit = r.max_position_embeddings
        if r.max_seq_len and limit is not None and r.max_seq_len > limit:
            seq += "*"
            past = True
        table.add_row(r.model, _count(r.params), r.method, gib(r.required_device_bytes),
                      _CERTAINTY_CELL[r.verdict.certainty], str(r.max_batch or "-"), seq)
    console.print(table)
    if past:
        console.print("* longer than the model's max_position_embeddings")
    short = sum(1 for r in rows if not r.fits and r.error is None)
    console.print(f"{short} model x method pairs do not fit at batch 1", highlight=False)
    cannot: dict[str, list[str]] = {}
    for r in rows:
        if r.error is not None:
            cannot.setdefault(r.model, []).append(r.method)
    for model, methods in cannot.items():
        console.print(f"cannot start: {model} {', '.join(methods)} (--json says why)",
                      highlight=False)
