"""`vramcalc check`: the GPUs of this machine, and whether a plan fits them.

Alone it lists the detected GPUs. With --model it estimates the plan once per compute dtype
and corrections and gives a verdict per GPU (vramcalc.sizing.verdict: required free memory + margin
<= memory); with --gpu NAME (repeatable) or --gpu-memory GIB it checks empty cards instead
and never calls NVML. rich, pynvml and the catalog load inside the function bodies.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vramcalc.commands import targets as gpu_targets
from vramcalc.commands.common import print_json, reports_errors, resolve_model_arg, warn
from vramcalc.commands.from_config import with_from_config
from vramcalc.commands.options import (
    GpuMemOpt,
    JsonOpt,
    MarginOpt,
    MaxOpt,
    NoCalibrationOpt,
    build_plan,
    check_applies,
    check_max,
    for_target,
    gpu_memory_bytes,
    margin_bytes,
    refuse_given,
    runnable_dropout,
    validate_targets,
    warn_long_sequence,
    with_plan_options,
)
from vramcalc.commands.parallel import GpusOpt, OffloadOpt, StrategyOpt
from vramcalc.commands.task_options import with_task_options
from vramcalc.commands.time_options import (
    DatasetTokensOpt,
    EpochsOpt,
    PriceOpt,
    PricesOpt,
    time_settings,
)
from vramcalc.errors import PlanError
from vramcalc.sizing.verdict import DEFAULT_MARGIN_GIB
from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.api import Checked
    from vramcalc.hardware.devices import DeviceInfo
    from vramcalc.sizing.advice import GpuAnswer, Suggestion
    from vramcalc.sizing.verdict import Verdict

EXIT_DOES_NOT_FIT = 3

CheckModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Catalog name, alias (HF hub id), spec YAML, or config.json path. "
        "Without it, check lists the detected GPUs.",
    ),
]
GpuOpt = Annotated[
    list[str] | None,
    typer.Option("--gpu", help="Check an empty card of this catalog GPU (its total less the "
                 "driver's reservation) instead of detecting; repeat for several; see "
                 "'vramcalc gpus'."),
]


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f}"


# ---- listing ------------------------------------------------------------------------------


def _list_devices(devices: list[DeviceInfo], json_output: bool) -> None:
    if json_output:
        print_json([d.model_dump(mode="json") for d in devices])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Detected GPUs (NVML; GiB = 2**30 bytes; other: other processes)")
    for col in ("GPU", "Name", "Total", "Free", "Used", "Other", "CC", "bf16", "MIG"):
        # numbers never wrap; a long name does
        table.add_column(col, justify="left" if col in ("GPU", "Name") else "right",
                         no_wrap=col != "Name", min_width=len(col))
    for d in devices:
        major, minor = d.compute_capability
        table.add_row(
            d.label, d.name, _gib(d.total_bytes), _gib(d.free_bytes), _gib(d.used_bytes),
            _gib(d.other_processes_bytes), f"{major}.{minor}",
            "yes" if d.bf16_supported else "no", "MIG" if d.is_mig else "",
        )
    Console(emoji=False).print(table)


# ---- checking -----------------------------------------------------------------------------


def _fits_cell(v: Verdict) -> str:
    return {"fits": "[green]yes[/green]", "tight": "[yellow]tight[/yellow]"}.get(
        v.certainty, "[red]no[/red]")


def _verdict_table(verdicts: list[Checked], margin: int, detected: bool) -> Any:
    from rich.table import Table

    table = Table(title=f"Per GPU, GiB: fits = required free memory + {_gib(margin)} margin "
                  "<= memory", title_justify="left")
    cols = ["GPU", "Name", "Free" if detected else "Memory", "Needs", "Fits", "Headroom"]
    if detected:
        cols.insert(3, "Empty")
        cols.insert(6, "Empty fits")
    for col in cols:
        table.add_column(col, justify="left" if col in ("GPU", "Name") else "right",
                         no_wrap=col != "Name", min_width=len(col) if col != "Name" else 4)
    for v in verdicts:
        t = v.target
        row = [t.label or "-", t.name, _gib(t.free_bytes), _gib(v.estimate.required_device_bytes),
               _fits_cell(v.now),
               f"{v.headroom_bytes / GiB:+.2f}"]
        if detected:
            row.insert(3, _gib(t.empty_bytes))
            row.insert(6, _fits_cell(v.empty))
        table.add_row(*row)
    return table


def _render(
    verdicts: list[Checked],
    best: Checked,
    margin: int,
    suggestions: list[Suggestion],
    larger: GpuAnswer | None,
    detected: bool,
) -> None:
    from rich.console import Console

    from vramcalc.render import print_breakdown

    # no :emoji: codes in what check and compare print (plan._render does the same):
    # rich loads its emoji table (~2.5 ms) on the first string it would search for them
    console = Console(emoji=False)
    print_breakdown(best.estimate, best.plan, console)
    console.print(_verdict_table(verdicts, margin, detected))
    memory = "free memory" if detected else "memory"
    if best.fits_free:
        tight = best.now.certainty == "tight"
        word = "[yellow]fits, tight[/yellow]" if tight else "[green]fits[/green]"
        console.print(f"{word} on {best.target.where}: "
                      f"{best.headroom_bytes / GiB:+.2f} GiB headroom in {memory} "
                      f"(margin {_gib(margin)} GiB)", highlight=False)
        if tight:
            console.print(best.now.tight_reason, highlight=False)
        for s in suggestions:  # only the allocator switch is offered for a tight fit
            console.print(f"more room: {s.description}: needs "
                          f"{_gib(s.required_device_bytes)} GiB  [dim]({s.command_flags})[/dim]",
                          highlight=False)
        return
    console.print(f"[red]does NOT fit[/red] on {best.target.where}: needs "
                  f"{_gib(best.estimate.required_device_bytes)} GiB required free memory + "
                  f"{_gib(margin)} GiB margin, {_gib(best.target.free_bytes)} GiB {memory}",
                  highlight=False)
    if detected and best.fits_empty:
        console.print("it would fit on the empty card: other processes hold the memory it "
                      "needs")
    if suggestions:
        console.print("Changes that make it fit (each estimated; the cheapest first):")
        for s in suggestions:
            cost = f"; costs {s.cost}" if s.cost else ""
            console.print(f"  - {s.description}: needs {_gib(s.required_device_bytes)} GiB  "
                          f"[dim]({s.command_flags}{cost})[/dim]", highlight=False)
        return
    console.print(f"it does not fit {best.target.where} even at batch 1 with every "
                  "memory-saving change", highlight=False)
    if larger is None:
        console.print("no GPU of the catalog fits it, not even with the changes above")
    elif larger.suggestion is None:
        console.print(f"smallest catalog GPU it fits: {larger.gpu.name} "
                      f"(vramcalc check ... --gpu {larger.gpu.name})", highlight=False)
    else:
        console.print(f"smallest catalog GPU it fits with a change: {larger.gpu.name}, "
                      f"{larger.suggestion.description} ({larger.suggestion.command_flags})",
                      highlight=False)


def _render_max(
    what: str, rows: list[tuple[Checked, int]], margin: int, json_output: bool
) -> None:
    if json_output:
        print_json({"max": what, "margin_bytes": margin,
                    "gpus": [{**v.to_dict(), "value": n} for v, n in rows]})
        return
    from rich.console import Console
    from rich.table import Table

    plan = rows[0][0].plan if rows else None
    at = "" if plan is None else (f" at --seq-len {plan.seq_len}" if what == "batch"
                                  else f" at --batch {plan.batch_size}")
    table = Table(title=f"Largest {what} per GPU{at} (fits = required free memory + "
                  f"{_gib(margin)} GiB margin <= memory)", title_justify="left")
    for col in ("GPU", "Name", "Memory", what):
        table.add_column(col, justify="left" if col in ("GPU", "Name") else "right",
                         no_wrap=col != "Name", min_width=len(col))
    for v, n in rows:
        table.add_row(v.target.label or "-", v.target.name, _gib(v.target.free_bytes),
                      str(n) if n else "none fits")
    Console(emoji=False).print(table)


def _time_table(ranking: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from vramcalc.timing.cost import format_duration

    table = Table(title="Time and cost on the GPUs that fit (cheapest to finish first)",
                  title_justify="left")
    for col in ("GPU", "Name", "s/step", "tokens/s", "Total", "$/h", "Cost", "Basis"):
        table.add_column(col, justify="left" if col in ("GPU", "Name", "Basis") else "right",
                         no_wrap=col != "Name")
    for r in ranking:
        total = r.get("total_seconds")
        table.add_row(r["label"] or "-", r["name"], f"{r['step_seconds']:.3g}",
                      f"{r['tokens_per_second']:,.0f}",
                      "-" if total is None else format_duration(total),
                      "-" if r.get("usd_per_hour") is None else f"{r['usd_per_hour']:g}",
                      "-" if r.get("cost_usd") is None else f"${r['cost_usd']:,.2f}",
                      r["time_basis"])
    return table


@reports_errors
@with_task_options("check")  # --task infer|merge: commands/task_options.py
@functools.partial(with_from_config, model_required=False)
@with_plan_options
def check(
    model: CheckModelOpt = None,
    plan_options: dict[str, Any] | None = None,
    gpu: GpuOpt = None,
    gpu_memory: GpuMemOpt = None,
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    max_: MaxOpt = None,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
    gpus: GpusOpt = None,
    strategy: StrategyOpt = None,
    offload: OffloadOpt = "none",
    dataset_tokens: DatasetTokensOpt = None,
    epochs: EpochsOpt = None,
    price: PriceOpt = None,
    prices: PricesOpt = None,
) -> None:
    """List this machine's GPUs, or check whether a plan fits them.

    Without --model: the detected GPUs (NVML). With --model: the estimate and
    a verdict per GPU, and when it does not fit, changes that make it fit,
    each estimated. Fits: required free memory + --margin (default 0.5 GiB,
    for estimation error and fragmentation) <= memory: NVML's free memory
    for a detected GPU; for an empty card (--gpu, or "Empty" of a detected
    one) its total less the driver's reservation. --gpu repeats (one verdict
    each); --max batch|seq-len answers the largest that fits, per GPU. The
    plan is shown for the GPU with the most memory; the exit code is its
    verdict: 0 fits (also "fits, tight": inside the required-memory band of
    the allocator, or within the estimate's spread, max(256 MiB, 3 %)), 3
    does not fit, 4 no GPU. Each catalog (or recognized detected) GPU also
    gets seconds per step and tokens per second; with --dataset-tokens N
    [--epochs E] the wall time and the cost at its $/GPU-hour (shipped
    prices, --prices FILE, --price GPU=USD), and the GPUs that fit are
    ranked by cost to finish.

    \b
    Examples:
      vramcalc check
      vramcalc check --model llama-3.1-8b --batch 4 --seq-len 2048
      vramcalc check -m qwen2.5-7b --gpu rtx-4090 --gpu a100-40gb --json
      vramcalc check -m llama-3.1-8b --gpu-memory 24 --margin 1
      vramcalc check -m llama-3.1-8b --gpu rtx-4090 --max batch
      vramcalc check -m llama-2-70b --gpu rtx-4090 --gpus 2 --strategy fsdp
      vramcalc check -m qwen2.5-7b --gpu l4 --gpu a10 --dataset-tokens 9000000
    """
    given: frozenset[str] = getattr(plan_options, "given", frozenset())
    gpu = list(gpu or [])
    timing = time_settings(dataset_tokens, epochs, price, prices)
    if model is None:
        timing.refuse("need --model MODEL (the plan to time)")
        if gpu or gpu_memory is not None or max_ is not None:
            raise PlanError("--gpu, --gpu-memory and --max need --model MODEL (the plan to "
                            "check)")
        refuse_given(given, [n for n in given if n != "json_output"],
                     "plan options need --model MODEL (without it, check lists the GPUs)")
        _list_devices(gpu_targets.detect_devices(), json_output)
        return
    if gpu and gpu_memory is not None:
        raise PlanError("give either --gpu NAME or --gpu-memory GIB, not both")
    check_max(max_)
    margin_b = margin_bytes(margin)
    if gpu_memory is not None:
        gpu_memory_bytes(gpu_memory)  # validated before the model loads


    spec = resolve_model_arg(model)
    train = build_plan(**(plan_options or {}))
    check_applies(spec, train, given)
    train = runnable_dropout(spec, train, given)
    validate_targets(spec, train)
    long_seq = warn_long_sequence(spec, train)
    if long_seq:
        warn(long_seq)
    detected = not gpu and gpu_memory is None
    targets_ = gpu_targets.check_targets(gpu, gpu_memory)
    from vramcalc.commands.parallel import parallel_from_options

    for t in targets_:  # an explicit --compute-dtype bf16 on a card without bf16: refused
        for_target(train, t, given, note=False)
    parallel = parallel_from_options(gpus or (len(targets_) if strategy else None), strategy,
                                     offload, given=given, gpus_from="the GPUs checked")
    if parallel is not None:  # several GPUs: the busiest one against the smallest of them
        if max_ is not None:
            timing.refuse("not with --max (which plan would they time?)")
        from vramcalc.commands.parallel import check_parallel

        used = targets_ if detected else targets_ * parallel.gpus
        if len(used) < parallel.gpus:
            raise PlanError(f"--gpus {parallel.gpus} but {len(used)} GPU(s) detected; use "
                            "--gpu NAME --gpus N to plan for GPUs this machine lacks")
        smallest = min(used[: parallel.gpus], key=lambda t: t.free_bytes)
        where = f"{parallel.gpus} x {smallest.name}"
        from vramcalc.api import catalog_gpu_of

        # the time of one kind of card (data parallel runs at the slowest GPU's pace, over
        # the slowest link: mixed cards are not timed)
        kinds = {t.name for t in used[: parallel.gpus]}
        card = catalog_gpu_of(smallest) if len(kinds) == 1 else None
        if len(kinds) > 1:
            mixed = f"the time of mixed GPUs ({', '.join(sorted(kinds))}) is not modelled"
            timing.refuse(mixed)
            warn(f"time: {mixed}")
        elif card is None:
            timing.refuse(f"{smallest.name} is no catalog GPU (the time model needs its "
                          "throughput)")
        if not check_parallel(spec, train, parallel, smallest.free_bytes, margin_b, where,
                              json_output, time_gpu=None if card is None else card.name,
                              timing=timing, calibration=not no_calibration):
            raise typer.Exit(EXIT_DOES_NOT_FIT)
        return
    from vramcalc.api import check_step, checked_on, estimators_saying, largest

    if max_ is not None:
        estimators = estimators_saying(not no_calibration, warn)
        verdicts = checked_on(spec, train, targets_, margin_b, estimators, warn)
        timing.refuse("not with --max (which plan would they time?)")
        rows = [(v, largest(spec, v.plan, max_, v.target, margin_b,
                            estimate_fn=v.estimate_fn).value)
                for v in verdicts]
        _render_max(max_, rows, margin_b, json_output)
        if not any(n for _, n in rows):
            raise typer.Exit(EXIT_DOES_NOT_FIT)
        return
    report = check_step(spec, train, targets_, margin_b, calibration=not no_calibration,
                        say=warn, prices=timing.table(), dataset_tokens=timing.dataset_tokens,
                        epochs=timing.epochs, padding_free=_padding_free_step(plan_options))
    if not report.times:
        timing.refuse("no GPU checked here has throughput figures (name catalog GPUs with "
                      "--gpu; see vramcalc/data/gpu_speed.yaml)")
    best = report.best
    if json_output:
        print_json(report.to_json())
    else:
        _render(list(report.verdicts), best, margin_b, list(report.suggestions), report.larger,
                detected)
        if report.ranking:
            from rich.console import Console

            Console(emoji=False).print(_time_table(report.ranking))
            notes = {r["name"]: r["time_calibration"] for r in report.ranking
                     if r.get("time_calibration")}
            for gpu, note in notes.items():
                typer.echo(f"time on {gpu} calibrated: {note}")
        for o in report.several[:3]:
            t = o["time"]
            when = "" if t is None else (
                f"; {t['step_seconds']:.3g} s/step, {t['tokens_per_second']:,.0f} tokens/s"
                + ("" if t.get("cost_usd") is None else f", ${t['cost_usd']:,.2f}")
                + " (derived)")
            typer.echo(f"  on several {best.target.name}: {o['flags']} needs "
                       f"{_gib(o['required_device_bytes'])} GiB per GPU{when}")
    if not best.fits_free:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _padding_free_step(plan_options: dict[str, Any] | None) -> tuple[int, int] | None:
    """The padding-free worst step of --lengths (advice.padding_free_step), for check to
    offer padding-free batches: the padded plan keeps only the longest row."""
    options = plan_options or {}
    if options.get("lengths") is None:
        return None
    from vramcalc.commands.options import read_lengths
    from vramcalc.sizing.advice import padding_free_step

    return padding_free_step(read_lengths(options["lengths"]), options["batch"],
                             options["seq_len"])
