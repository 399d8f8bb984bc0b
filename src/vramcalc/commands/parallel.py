"""Options and output for several GPUs (`plan` / `check` --gpus N --strategy ...).

Kept apart from plan.py / check.py so those commands only call `parallel_from_options`,
`plan_parallel` and `check_parallel`: parse -> api.parallel_step / api.largest_parallel ->
render. No torch; rich loads inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from vramcalc.errors import PlanError
from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.commands.time_options import TimeSettings
    from vramcalc.memory.multi_gpu import ParallelEstimate, ParallelPlan
    from vramcalc.models.spec import ModelSpec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.verdict import Target

# The choices of vramcalc.memory.multi_gpu's Literals (Strategy, Offload, ShardingStrategy,
# Balance),
# spelled here so that `plan` without --gpus never imports multi_gpu (issue 9: cold start);
# tests/test_light_imports.py keeps them equal.
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp", "zero2", "zero3", "device-map")
OFFLOADS: tuple[str, ...] = ("none", "cpu")
SHARDING_STRATEGIES: tuple[str, ...] = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
BALANCES: tuple[str, ...] = ("balanced", "sequential")

# Llama 3 405B trained on 16384 H100s (arXiv 2407.21783, section 3.3): the largest job
# a per-GPU plan is asked of.
MAX_GPUS = 16384

GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", help="Number of GPUs, 1 to 16384 (one process each; device-map: "
                 "one process)."),
]
StrategyOpt = Annotated[
    str | None,
    typer.Option("--strategy", help=f"Several GPUs: {'|'.join(STRATEGIES)} (default ddp; "
                 "needs --gpus)."),
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
    str, typer.Option("--sharding-strategy", help=f"--strategy fsdp only: "
                      f"{'|'.join(SHARDING_STRATEGIES)}.")
]
OrigParamsOpt = Annotated[
    bool, typer.Option("--use-orig-params/--no-use-orig-params",
                       help="--strategy fsdp only: use_orig_params (True makes LoRA "
                       "gradients cover frozen elements).")
]
QUANT_STORAGES: tuple[str, ...] = ("bf16", "fp16", "fp32", "uint8")
QuantStorageOpt = Annotated[
    str | None, typer.Option("--quant-storage", help=f"--strategy fsdp|zero3 with QLoRA: "
                             f"bnb_4bit_quant_storage {'|'.join(QUANT_STORAGES)} (default: the "
                             "load dtype, PEFT's recipe; FSDP needs it equal to the load dtype).")
]
BalanceOpt = Annotated[
    str, typer.Option("--device-map", help=f"--strategy device-map only: placement "
                      f"{'|'.join(BALANCES)}.")
]


def parallel_from_options(
    gpus: int | None, strategy: str | None, offload: str = "none",
    gpus_per_node: int | None = None, sharding_strategy: str = "FULL_SHARD",
    use_orig_params: bool = False, device_map: str = "balanced",
    max_memory_bytes: int | None = None, given: frozenset[str] = frozenset(),
    gpus_from: str = "--gpus N", quant_storage: str | None = None,
) -> ParallelPlan | None:
    """A ParallelPlan, or None when no multi-GPU option was given. One PlanError per problem,
    and one for an option given (`given`, parameter names) that the strategy does not use.
    `gpus_from` says where the GPU count comes from when --gpus is absent (check: the GPUs
    checked); None when it must be --gpus."""
    from vramcalc.commands.options import refuse_given

    per_strategy = ("sharding_strategy", "use_orig_params", "device_map", "quant_storage")
    if gpus is None and strategy is None and offload == "none" and gpus_per_node is None:
        refuse_given(given, per_strategy, "only with several GPUs (--gpus N --strategy ...)")
        return None
    if gpus is None and gpus_from == "--gpus N":
        refuse_given(given, ("strategy", "offload", "gpus_per_node"),
                     "needs --gpus N (the number of GPUs to split the step over)")
    from vramcalc.memory.multi_gpu import ParallelPlan

    if gpus is not None:
        from vramcalc.commands.options import bounded_count

        bounded_count("--gpus", gpus, MAX_GPUS, "the largest training job (16384 GPUs)")
    if gpus_per_node is not None:
        from vramcalc.commands.options import bounded_count

        bounded_count("--gpus-per-node", gpus_per_node, MAX_GPUS, "any machine")
    chosen = strategy or "ddp"
    if chosen != "fsdp":
        refuse_given(given, ("sharding_strategy", "use_orig_params"),
                     f"only with --strategy fsdp, not {chosen}")
    if chosen != "device-map":
        refuse_given(given, ("device_map",), f"only with --strategy device-map, not {chosen}")
    if chosen not in ("fsdp", "zero3"):
        refuse_given(given, ("quant_storage",), f"only with --strategy fsdp or zero3 (sharded "
                     f"QLoRA), not {chosen}")
    for name, value, valid in (("strategy", strategy or "ddp", STRATEGIES),
                               ("offload", offload, OFFLOADS),
                               ("sharding strategy", sharding_strategy, SHARDING_STRATEGIES),
                               ("device map", device_map, BALANCES),
                               ("quant storage", quant_storage or "bf16", QUANT_STORAGES)):
        if value not in valid:
            raise PlanError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
    try:
        return ParallelPlan(
            gpus=gpus or 1, strategy=strategy or "ddp", offload=offload,  # type: ignore[arg-type]
            gpus_per_node=gpus_per_node, sharding_strategy=sharding_strategy,  # type: ignore[arg-type]
            use_orig_params=use_orig_params, device_map_balance=device_map,  # type: ignore[arg-type]
            max_memory_bytes=max_memory_bytes, quant_storage=quant_storage,  # type: ignore[arg-type]
        )
    except ValidationError as err:
        raise PlanError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def parallel_to_dict(pe: ParallelEstimate, plan: TrainPlan) -> dict[str, Any]:
    """The busiest GPU's totals under the one-GPU keys, then per_gpu and host RAM
    (api.parallel_fields)."""
    from vramcalc.api import parallel_fields

    return parallel_fields(pe, plan)


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
    rows: list[tuple[int, int, list[str]]] = []  # first GPU, last GPU, cells
    for i, e in enumerate(pe.per_gpu):
        c = e.components
        weights = (c.base_weights + c.quant_constants + c.unquantized_params + c.expert_weights
                   + c.adapter_weights)
        layers = str(pe.layers_per_gpu[i]) if pe.layers_per_gpu else "all"
        cells = [layers, gib(weights), gib(c.gradients + c.optimizer_states + c.optimizer_paged),
                 gib(c.activations + c.logits_loss), gib(c.comm_buffers),
                 gib(e.peak_allocated_bytes), gib(e.required_device_bytes)]
        if rows and rows[-1][2] == cells:  # equal GPUs share one row: 0-7
            rows[-1] = (rows[-1][0], i, cells)
        else:
            rows.append((i, i, cells))
    for first, last, cells in rows:
        table.add_row(str(first) if first == last else f"{first}-{last}", *cells)
    console.print(table)
    if pe.peak_terms:
        console.print(f"busiest GPU's peak, term by term ({pe.peak_terms[0].why}):",
                      highlight=False)
        for t in pe.peak_terms[1:]:
            amount = f"{gib(t.bytes):>7} GiB" if t.bytes else " " * 11
            console.print(f"  {amount}  {t.name}: {t.why}", highlight=False)
    for comp, where in pe.placement.items():
        if comp in type(pe.busiest.components).model_fields and not pe.single_gpu.components[comp]:
            continue
        console.print(f"  {comp}: {where}", highlight=False)
    if pe.host_offload_bytes or pe.host_loading_bytes:
        console.print(f"host RAM per node: offloaded state {gib(pe.host_offload_bytes)} GiB, "
                      f"loading {gib(pe.host_loading_bytes)} GiB")
    console.print(f"one GPU would need {gib(pe.single_gpu.required_device_bytes)} GiB")
    for note in pe.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)


def plan_parallel(spec: ModelSpec, plan: TrainPlan, parallel: ParallelPlan,
                  target: Target | None, margin_b: int, max_: str | None,
                  json_output: bool, *, time_gpu: str | None = None,
                  timing: TimeSettings | None = None, calibration: bool = True
                  ) -> bool | None:
    """`plan --gpus N ...`: print the estimate (or --max per GPU) and return whether the
    busiest GPU fits each GPU's card (`target`, less `margin_b`; None when no card), by the
    rule of the one-GPU plan (vramcalc.sizing.verdict). --json keeps the one-GPU keys' meaning:
    gpu_memory_bytes is one card's memory, margin_bytes the margin. Raw estimate: the
    fitted corrections (calibration/) were measured on one GPU and are not applied."""
    from vramcalc.api import largest_parallel, parallel_step
    from vramcalc.commands.common import print_json

    if max_ is not None:
        assert target is not None  # checked by plan()
        best = largest_parallel(spec, plan, parallel, max_, target, margin_b)
        if json_output:
            print_json(best.to_json())
        else:
            other = ("--seq-len", plan.seq_len) if max_ == "batch" else ("--batch",
                                                                         plan.batch_size)
            where = (f"{target.name} ({target.free_bytes / GiB:.2f} GiB, margin "
                     f"{margin_b / GiB:.2f}) on each of {parallel.label}, at {other[0]} "
                     f"{other[1]}")
            typer.echo(f"largest {max_} per GPU that fits {where}: {best.value}" if best.fits
                       else f"nothing fits {where}, not even {max_} 1")
        return best.fits
    result = parallel_step(spec, plan, parallel, None if target is None else target.free_bytes,
                           margin_b, **_time_args(time_gpu, timing, calibration))
    _refuse_untimed(result, timing)
    v = result.verdict
    if json_output:
        print_json(result.plan_json(None if target is None else target.name))
    else:
        show_parallel(result.estimate, plan)
        if v is not None and target is not None:
            need = result.estimate.busiest.required_device_bytes
            typer.echo(f"{v.word} {target.name}, per GPU: the busiest needs {need / GiB:.2f} "
                       f"GiB + {margin_b / GiB:.2f} GiB margin, the card offers "
                       f"{target.free_bytes / GiB:.2f} GiB (headroom "
                       f"{v.headroom_bytes / GiB:+.2f} GiB)")
            if v.certainty == "tight":
                typer.echo(v.tight_reason)
        _echo_time(result)
    return result.fits


def _time_args(time_gpu: str | None, timing: TimeSettings | None,
               calibration: bool) -> dict[str, Any]:
    """parallel_step's time arguments: the catalog card to time on (None: no time)."""
    if time_gpu is None or timing is None:
        return {}
    return dict(time_gpu=time_gpu, prices=timing.table(), dataset_tokens=timing.dataset_tokens,
                epochs=timing.epochs, calibration=calibration)


def _refuse_untimed(result: Any, timing: TimeSettings | None) -> None:
    """Time options given where the time of these GPUs is not modelled: one error line."""
    if timing is not None and result.time_missing is not None:
        timing.refuse(f"no time here: {result.time_missing}")


def _echo_time(result: Any) -> None:
    """The time line of several GPUs, or why there is none."""
    if result.time is not None:
        from vramcalc.timing.cost import describe

        typer.echo(describe(result.time))
        typer.echo("  (derived: no multi-GPU step has been timed by vramcalc; the NCCL "
                   "kernels' share of the SMs is left out)")
    elif result.time_missing is not None:
        from vramcalc.commands.common import warn

        warn(f"time: {result.time_missing}")


def check_parallel(spec: ModelSpec, plan: TrainPlan, parallel: ParallelPlan,
                   memory_bytes: int, margin_b: int, where: str, json_output: bool, *,
                   time_gpu: str | None = None, timing: TimeSettings | None = None,
                   calibration: bool = True) -> bool:
    """`check --gpus N --strategy ...`: whether the busiest GPU fits `memory_bytes` (the
    smallest GPU's) with `margin_b`, by the rule of the one-GPU check (vramcalc.sizing.verdict);
    `where` names the GPUs; timed on `time_gpu` (the smallest one, where it is a catalog
    GPU)."""
    from vramcalc.api import parallel_step
    from vramcalc.commands.common import print_json

    result = parallel_step(spec, plan, parallel, memory_bytes, margin_b,
                           **_time_args(time_gpu, timing, calibration))
    _refuse_untimed(result, timing)
    v = result.verdict
    assert v is not None
    if json_output:
        print_json(result.check_json(where))
    else:
        need = result.estimate.busiest.required_device_bytes
        show_parallel(result.estimate, plan)
        typer.echo(f"{v.word} on {where}: busiest GPU needs {need / GiB:.2f} GiB + "
                   f"{margin_b / GiB:.2f} GiB margin, each GPU offers "
                   f"{memory_bytes / GiB:.2f} GiB")
        if v.certainty == "tight":
            typer.echo(v.tight_reason)
        _echo_time(result)
    return v.fits
