"""`vramcalc plan`: the analytic estimate (no GPU, no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from vramcalc.commands.common import (
    echo_max,
    print_json,
    reports_errors,
    resolve_model_arg,
    warn,
)
from vramcalc.commands.from_config import with_from_config
from vramcalc.commands.options import (
    GpuMemOpt,
    JsonOpt,
    MarginOpt,
    MaxOpt,
    ModelOpt,
    NoCalibrationOpt,
    build_plan,
    check_applies,
    check_max,
    for_target,
    margin_bytes,
    refuse_given,
    runnable_dropout,
    validate_targets,
    warn_long_sequence,
    with_plan_options,
)
from vramcalc.commands.parallel import (
    BalanceOpt,
    GpusOpt,
    GpusPerNodeOpt,
    OffloadOpt,
    OrigParamsOpt,
    QuantStorageOpt,
    ShardingOpt,
    StrategyOpt,
    parallel_from_options,
)
from vramcalc.commands.targets import plan_target
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
    from vramcalc.api import PlanResult
    from vramcalc.corrections.planning import EstimateFn
    from vramcalc.models.spec import ModelSpec
    from vramcalc.sizing.verdict import Target

EXIT_DOES_NOT_FIT = 3

PlanGpuOpt = Annotated[
    str | None,
    typer.Option("--gpu", help="Check against an empty card of this catalog GPU (its total "
                 "less the driver's reservation); see 'vramcalc gpus'."),
]


@reports_errors
@with_task_options("plan")  # --task infer|merge: commands/task_options.py
@with_from_config
@with_plan_options
def plan(
    model: ModelOpt,
    plan_options: dict[str, Any],
    gpu: PlanGpuOpt = None,
    gpu_memory: GpuMemOpt = None,
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    max_: MaxOpt = None,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
    gpus: GpusOpt = None,
    strategy: StrategyOpt = None,
    offload: OffloadOpt = "none",
    gpus_per_node: GpusPerNodeOpt = None,
    sharding_strategy: ShardingOpt = "FULL_SHARD",
    use_orig_params: OrigParamsOpt = False,
    device_map: BalanceOpt = "balanced",
    quant_storage: QuantStorageOpt = None,
    dataset_tokens: DatasetTokensOpt = None,
    epochs: EpochsOpt = None,
    price: PriceOpt = None,
    prices: PricesOpt = None,
) -> None:
    """Estimate the peak GPU memory of a training step, an inference or a merge.

    With --gpu NAME or --gpu-memory GIB it also says whether the step fits an
    empty card, by the rule `check` uses: required free memory + --margin
    (default 0.5 GiB) <= memory, where a catalog GPU offers its total less
    the driver's reservation. Required free memory is a band (the allocator's
    cache may fail to reuse the fp32 logits block): "does NOT fit" below its
    least, "fits, tight" inside it or within the estimate's spread (max(256
    MiB, 3 %)); tight still counts as fitting. The same with --task infer
    or merge. An option this plan does not use (--rank with --method full,
    --seq-len with --task infer, ...) is an error, never ignored.
    Exit 0 fits or fits tight (or no card given), 3 does not fit.
    With --gpu NAME it also gives seconds per step and tokens per second on
    that card (the time model: FLOPs and bytes on its peaks), and with
    --dataset-tokens N [--epochs E] the wall time and, at a $/GPU-hour price
    (shipped, --prices FILE or --price GPU=USD), the cost.

    \b
    Examples:
      vramcalc plan --model llama-7b --rank 16 --batch 4
      vramcalc plan -m meta-llama/Llama-3.1-8B --seq-len 2048 --gpu rtx-4090
      vramcalc plan -m qwen2.5-7b --gpu-memory 24 --max batch --json
      vramcalc plan -m ./my-model/config.json --quant none --optimizer adamw_torch
      vramcalc plan -m llama-2-70b --gpus 2 --strategy fsdp --gpu rtx-4090
      vramcalc plan --from-config axolotl.yaml --batch 2
      vramcalc plan -m llama-3.1-8b --gpu h100-sxm --dataset-tokens 5000000
    """
    from vramcalc.corrections.planning import calibration_note, estimator
    given: frozenset[str] = getattr(plan_options, "given", frozenset())
    check_max(max_)
    margin_b = margin_bytes(margin)
    timing = time_settings(dataset_tokens, epochs, price, prices)
    target = plan_target(gpu, gpu_memory)
    if max_ is not None and target is None:
        raise PlanError("--max needs --gpu NAME or --gpu-memory GIB (the card to fit in)")
    if target is None:
        refuse_given(given, ("margin",), "only with --gpu NAME or --gpu-memory GIB (the card "
                     "to fit in)")
    spec = resolve_model_arg(model)
    train = build_plan(**plan_options)
    check_applies(spec, train, given)
    train = runnable_dropout(spec, train, given)
    validate_targets(spec, train)
    long_seq = warn_long_sequence(spec, train)
    if long_seq:
        warn(long_seq)
    if target is not None:
        train = for_target(train, target, given)
    parallel = parallel_from_options(
        gpus, strategy, offload, gpus_per_node, sharding_strategy, use_orig_params, device_map,
        None if target is None else target.free_bytes - margin_b, given=given,
        quant_storage=quant_storage)
    if gpu is None:
        timing.refuse("need --gpu NAME (a catalog GPU: the time model uses its throughput)")
    if parallel is not None:
        if max_ is not None:
            timing.refuse("not with --max (which plan would they time?)")
        from vramcalc.commands.parallel import plan_parallel

        if plan_parallel(spec, train, parallel, target, margin_b, max_, json_output,
                         time_gpu=gpu, timing=timing,
                         calibration=not no_calibration) is False:
            raise typer.Exit(EXIT_DOES_NOT_FIT)
        return
    if max_ is not None:
        assert target is not None
        estimate, corrections = estimator(target.corrections_gpu,
                                          use_calibration=not no_calibration)
        note = calibration_note(corrections)
        if note:
            warn(note)
        timing.refuse("not with --max (which plan would they time?)")
        _answer_max(spec, train, max_, target, margin_b, json_output, estimate)
        return
    from vramcalc.api import plan_step

    result = plan_step(spec, train, target=target, margin_bytes=margin_b,
                       calibration=not no_calibration, time_gpu=gpu,
                       prices=None if gpu is None else timing.table(),
                       dataset_tokens=timing.dataset_tokens, epochs=timing.epochs)
    if result.calibration_note:
        warn(result.calibration_note)
    if result.time_missing is not None:
        warn(f"time: no throughput figures for {result.time_missing} "
             "(vramcalc/data/gpu_speed.yaml): no time or cost")
    if json_output:
        print_json(result.to_json())
    else:
        _render(result, margin_b)
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _render(result: PlanResult, margin_b: int) -> None:
    """plan's breakdown table, the card's verdict line and the time (rich)."""
    from rich.console import Console

    from vramcalc.render import print_breakdown

    est, gv = result.estimate, result.verdict
    # No :emoji: codes in a breakdown: not loading rich's emoji table saves ~3 ms.
    console = Console(emoji=False)
    print_breakdown(est, result.plan, console)
    if gv is not None:
        v, target = gv.now, gv.target
        color = {"fits": "green", "tight": "yellow"}.get(v.certainty, "red")
        word = f"[{color}]{v.word}[/{color}]"
        console.print(
            f"{word} {target.name}: needs {est.required_device_bytes / GiB:.2f} GiB "
            f"+ {margin_b / GiB:.2f} GiB margin, the card offers "
            f"{target.free_bytes / GiB:.2f} GiB (headroom {v.headroom_bytes / GiB:+.2f} GiB)",
            highlight=False,
        )
        if v.certainty == "tight":
            console.print(v.tight_reason, highlight=False)
    if result.time is not None:
        from vramcalc.timing.cost import describe

        console.print(describe(result.time), highlight=False)


def _answer_max(
    spec: ModelSpec, train: Any, what: str, target: Target, margin_b: int, json_output: bool,
    estimate_fn: EstimateFn,
) -> None:
    from vramcalc.api import largest

    result = largest(spec, train, what, target, margin_b, estimate_fn=estimate_fn)
    if json_output:
        print_json(result.to_json())
    else:
        other = ("--seq-len", train.seq_len) if what == "batch" else ("--batch", train.batch_size)
        echo_max(result, f"{other[0]} {other[1]}")
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)

