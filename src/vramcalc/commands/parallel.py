"""Options and output for several GPUs (`plan` / `check` --gpus N --strategy ...).

Kept apart from plan.py / check.py so those commands only call `parallel_from_options`,
`show_parallel` and `parallel_suggestions`. No torch; rich loads inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from vramcalc.errors import PlanError

if TYPE_CHECKING:
    from vramcalc.multi_gpu import ParallelEstimate, ParallelPlan
    from vramcalc.plan_settings import TrainPlan
    from vramcalc.specs import ModelSpec

GiB = 2**30
# The choices of vramcalc.multi_gpu's Literals (Strategy, Offload, ShardingStrategy, Balance),
# spelled here so that `plan` without --gpus never imports multi_gpu (issue 9: cold start);
# tests/test_light_imports.py keeps them equal.
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp", "zero2", "zero3", "device-map")
OFFLOADS: tuple[str, ...] = ("none", "cpu")
SHARDING_STRATEGIES: tuple[str, ...] = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
BALANCES: tuple[str, ...] = ("balanced", "sequential")

GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", help="Number of GPUs (one process each; device-map: one process)."),
]
StrategyOpt = Annotated[
    str | None,
    typer.Option("--strategy", help=f"Several GPUs: {'|'.join(STRATEGIES)} (default ddp)."),
]
OffloadOpt = Annotated[
    str, typer.Option("--offload", help=f"{'|'.join(OFFLOADS)}: move sharded state to host RAM "
                      "(fsdp, zero2, zero3).")
]
GpusPerNodeOpt = Annotated[
    int | None,
    typer.Option("--gpus-per-node", help="GPUs per machine (FSDP then shards within a node: "
                 "HYBRID_SHARD)."),
]
ShardingOpt = Annotated[
    str, typer.Option("--sharding-strategy", help=f"FSDP: {'|'.join(SHARDING_STRATEGIES)}.")
]
OrigParamsOpt = Annotated[
    bool, typer.Option("--use-orig-params/--no-use-orig-params",
                       help="FSDP use_orig_params (True makes LoRA gradients cover frozen "
                       "elements).")
]
BalanceOpt = Annotated[
    str, typer.Option("--device-map", help=f"device-map placement: {'|'.join(BALANCES)}.")
]


def parallel_from_options(
    gpus: int | None, strategy: str | None, offload: str = "none",
    gpus_per_node: int | None = None, sharding_strategy: str = "FULL_SHARD",
    use_orig_params: bool = False, device_map: str = "balanced",
    max_memory_bytes: int | None = None,
) -> ParallelPlan | None:
    """A ParallelPlan, or None when no multi-GPU option was given. One PlanError per problem."""
    if gpus is None and strategy is None and offload == "none" and gpus_per_node is None:
        return None
    from vramcalc.multi_gpu import ParallelPlan

    if gpus is not None and gpus <= 0:
        raise PlanError(f"--gpus must be a positive integer, got {gpus}")
    if gpus_per_node is not None and gpus_per_node <= 0:
        raise PlanError(f"--gpus-per-node must be a positive integer, got {gpus_per_node}")
    for name, value, valid in (("strategy", strategy or "ddp", STRATEGIES),
                               ("offload", offload, OFFLOADS),
                               ("sharding strategy", sharding_strategy, SHARDING_STRATEGIES),
                               ("device map", device_map, BALANCES)):
        if value not in valid:
            raise PlanError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
    try:
        return ParallelPlan(
            gpus=gpus or 1, strategy=strategy or "ddp", offload=offload,  # type: ignore[arg-type]
            gpus_per_node=gpus_per_node, sharding_strategy=sharding_strategy,  # type: ignore[arg-type]
            use_orig_params=use_orig_params, device_map_balance=device_map,  # type: ignore[arg-type]
            max_memory_bytes=max_memory_bytes,
        )
    except ValidationError as err:
        raise PlanError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def parallel_to_dict(pe: ParallelEstimate, plan: TrainPlan) -> dict[str, Any]:
    """The busiest GPU's totals under the one-GPU keys, then per_gpu and host RAM."""
    from vramcalc.render import estimate_to_dict

    out = estimate_to_dict(pe.busiest, plan)
    out["parallel"] = pe.parallel.model_dump(mode="json")
    out["busiest_gpu"] = pe.busiest_gpu
    out["per_gpu"] = [
        {"gpu": i, **{k: v for k, v in estimate_to_dict(e, plan).items() if k != "plan"}}
        for i, e in enumerate(pe.per_gpu)
    ]
    out["placement"] = pe.placement
    out["comm_detail"] = pe.comm_detail
    out["layers_per_gpu"] = pe.layers_per_gpu
    out["host_offload_bytes"] = pe.host_offload_bytes
    out["host_loading_bytes"] = pe.host_loading_bytes
    out["single_gpu_required_device_bytes"] = pe.single_gpu.required_device_bytes
    out["notes"] = list(pe.notes)
    return out


def show_parallel(pe: ParallelEstimate, plan: TrainPlan) -> None:
    """Busiest GPU's breakdown, then one row per GPU, then host RAM and notes."""
    from rich.console import Console
    from rich.table import Table

    from vramcalc.render import breakdown_table, gib

    console = Console()
    title = (f"{pe.busiest.model}: {pe.parallel.label}; busiest GPU {pe.busiest_gpu}, "
             f"batch {plan.batch_size} x {plan.seq_len} tokens per GPU")
    console.print(breakdown_table(pe.busiest, title))
    table = Table(title="Per GPU (GiB = 2**30 bytes)", title_justify="left")
    cols = ["GPU", "layers", "weights", "grad+opt", "act", "comm", "alloc", "needs"]
    for col in cols:
        table.add_column(col, justify="left" if col == "GPU" else "right", no_wrap=True)
    for i, e in enumerate(pe.per_gpu):
        c = e.components
        weights = (c.base_weights + c.quant_constants + c.unquantized_params + c.expert_weights
                   + c.adapter_weights)
        layers = str(pe.layers_per_gpu[i]) if pe.layers_per_gpu else "all"
        table.add_row(str(i), layers, gib(weights),
                      gib(c.gradients + c.optimizer_states + c.optimizer_paged),
                      gib(c.activations + c.logits_loss), gib(c.comm_buffers),
                      gib(e.peak_allocated_bytes), gib(e.required_device_bytes))
    console.print(table)
    for comp, where in pe.placement.items():
        if comp in pe.busiest.components.model_fields and not pe.single_gpu.components[comp]:
            continue
        console.print(f"  {comp}: {where}", highlight=False)
    if pe.host_offload_bytes or pe.host_loading_bytes:
        console.print(f"host RAM per node: offloaded state {gib(pe.host_offload_bytes)} GiB, "
                      f"loading {gib(pe.host_loading_bytes)} GiB")
    console.print(f"one GPU would need {gib(pe.single_gpu.required_device_bytes)} GiB")
    for note in pe.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)


def parallel_suggestions(spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
                         max_gpus: int = 8) -> list[dict[str, Any]]:
    """For `check`: the smallest N per strategy that fits cards offering `memory_bytes`
    each with `margin_bytes` to spare (the rule of every suggestion)."""
    from vramcalc.multi_gpu import smallest_fitting_parallel

    return [o.model_dump(mode="json")
            for o in smallest_fitting_parallel(spec, plan, memory_bytes, margin_bytes, max_gpus)]


def plan_parallel(spec: ModelSpec, plan: TrainPlan, parallel: ParallelPlan,
                  memory_bytes: int | None, margin_bytes: int, max_: str | None,
                  json_output: bool) -> bool | None:
    """`plan --gpus N ...`: print the estimate (or --max per GPU) and return whether it fits
    each GPU's `memory_bytes` with `margin_bytes` to spare, by the rule of `plan` (None when
    no card is given). Raw estimate: the fitted corrections (calibration/) were measured on
    one GPU and are not applied."""
    from vramcalc.commands.common import print_json
    from vramcalc.multi_gpu import estimate_parallel
    from vramcalc.verdict import verdict

    if max_ is not None:
        from vramcalc.search import largest_fitting, quick_estimate

        assert memory_bytes is not None  # checked by plan()
        best = largest_fitting(
            spec, plan, max_, memory_bytes, margin_bytes,
            estimate_fn=lambda s, p: estimate_parallel(s, p, parallel).busiest,
            guess_fn=lambda s, p: estimate_parallel(s, p, parallel, quick_estimate).busiest)
        if json_output:
            print_json({"model": spec.name, "max": max_, "value": best, "fits": best > 0,
                        "gpu_memory_bytes": memory_bytes, "margin_bytes": margin_bytes,
                        "gpus": parallel.gpus, "strategy": parallel.strategy, "per_gpu": True})
        else:
            where = f"{memory_bytes / GiB:.2f} GiB (margin {margin_bytes / GiB:.2f})"
            typer.echo(f"largest {max_} per GPU that fits {where} on each of "
                       f"{parallel.label}: {best}" if best else
                       f"nothing fits in {where} per GPU, not even {max_} 1")
        return best > 0
    pe = estimate_parallel(spec, plan, parallel)
    need = pe.busiest.required_device_bytes
    v = None if memory_bytes is None else verdict(memory_bytes, need, margin_bytes,
                                                  pe.busiest.required_low)
    if json_output:
        out = parallel_to_dict(pe, plan)
        if v is not None:
            out["gpu_memory_bytes"] = memory_bytes
            out["margin_bytes"] = margin_bytes
            out["fits"] = v.fits
            out["certainty"] = v.certainty
            out["spread_bytes"] = v.spread_bytes
            out["headroom_bytes"] = v.headroom_bytes
        print_json(out)
    else:
        show_parallel(pe, plan)
        if v is not None:
            typer.echo(f"{v.word} in {memory_bytes / GiB:.2f} GiB per GPU with "  # type: ignore[operator]
                       f"{margin_bytes / GiB:.2f} GiB margin (busiest GPU headroom "
                       f"{v.headroom_bytes / GiB:+.2f} GiB)")
            if v.certainty == "tight":
                typer.echo(v.tight_reason)
    return None if v is None else v.fits


def check_parallel(spec: ModelSpec, plan: TrainPlan, parallel: ParallelPlan, memory_bytes: int,
                   margin_bytes: int, where: str, json_output: bool) -> bool:
    """`check --gpus N --strategy ...`: whether the busiest GPU fits `memory_bytes` (the
    smallest GPU's) with `margin_bytes` to spare, by the rule of `check`; `where` names
    the GPUs."""
    from vramcalc.commands.common import print_json
    from vramcalc.multi_gpu import estimate_parallel
    from vramcalc.verdict import verdict

    pe = estimate_parallel(spec, plan, parallel)
    need = pe.busiest.required_device_bytes
    v = verdict(memory_bytes, need, margin_bytes, pe.busiest.required_low)
    if json_output:
        out = parallel_to_dict(pe, plan)
        out.update(fits=v.fits, certainty=v.certainty, spread_bytes=v.spread_bytes,
                   budget_bytes_per_gpu=memory_bytes - margin_bytes,
                   gpu_memory_bytes=memory_bytes, margin_bytes=margin_bytes, gpus_checked=where)
        print_json(out)
    else:
        show_parallel(pe, plan)
        typer.echo(f"{v.word} on {where}: busiest GPU needs {need / GiB:.2f} GiB + "
                   f"{margin_bytes / GiB:.2f} GiB margin of {memory_bytes / GiB:.2f} GiB")
        if v.certainty == "tight":
            typer.echo(v.tight_reason)
    return v.fits
