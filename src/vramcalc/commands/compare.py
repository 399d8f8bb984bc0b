"""`vramcalc compare`: one model under every fine-tuning method, side by side.

Parse -> vramcalc.sizing.comparison.compare (pure) -> vramcalc.render. The method, its
quantization and weights dtype are set per row; every other plan option applies to all
rows, and --optimizer, when given, replaces each method's usual optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from vramcalc.commands.common import print_json, reports_errors, resolve_model_arg, warn
from vramcalc.commands.options import (
    JsonOpt,
    MarginOpt,
    ModelOpt,
    NoCalibrationOpt,
    build_plan,
    margin_bytes,
    runnable_dropout,
    validate_targets,
    warn_long_sequence,
    without_per_method_options,
)
from vramcalc.commands.time_options import (
    DatasetTokensOpt,
    EpochsOpt,
    PriceOpt,
    PricesOpt,
    time_settings,
)
from vramcalc.sizing.verdict import DEFAULT_MARGIN_GIB

if TYPE_CHECKING:
    from vramcalc.plans import Optimizer


def user_optimizer(ctx: typer.Context, plan_options: dict[str, Any]) -> Optimizer | None:
    """The --optimizer the user gave, or None (each method then uses its usual one)."""
    source = ctx.get_parameter_source("optimizer")
    if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
        return None
    return plan_options["optimizer"]  # type: ignore[no-any-return]


@reports_errors
@without_per_method_options
def compare(
    ctx: typer.Context,
    model: ModelOpt,
    plan_options: dict[str, Any],
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
    dataset_tokens: DatasetTokensOpt = None,
    epochs: EpochsOpt = None,
    price: PriceOpt = None,
    prices: PricesOpt = None,
) -> None:
    """Compare full fine-tuning, LoRA, QLoRA and 8-bit LoRA of one model.

    One row per method: full fine-tuning in the compute dtype (bf16) and
    with fp32 master weights, LoRA on a 16-bit base, QLoRA (nf4) and 8-bit
    LoRA (int8). Each shows the peak allocated memory, the required free
    memory and the smallest catalog GPU it fits, by the rule of plan and
    check (required free memory + --margin <= the card's memory less the
    driver's reservation): the smallest on which plan --gpu says "fits"
    (a GPU where it is only "fits, tight", inside the allocator's band or
    the estimate's spread, does not count).
    The method, its quantization and weights dtype are set per row (no
    options for them); every other option applies to all rows. The
    optimizer is each method's usual one, adamw_torch_fused for full and
    paged_adamw_8bit for the LoRA methods (the rule of plan too), unless
    --optimizer is given. A method that cannot start says why.
    Each method is also timed on its smallest GPU (seconds per step, tokens
    per second; with --dataset-tokens N [--epochs E] the wall time and the
    cost at that GPU's $/GPU-hour).

    \b
    Examples:
      vramcalc compare --model llama-3.1-8b
      vramcalc compare -m qwen2.5-7b --batch 4 --seq-len 2048 --json
      vramcalc compare -m mistral-7b --optimizer adamw_8bit --rank 64
    """
    from vramcalc.hardware.catalog import catalog
    from vramcalc.sizing.comparison import compare as compare_methods

    margin_b = margin_bytes(margin)
    timing = time_settings(dataset_tokens, epochs, price, prices)
    spec = resolve_model_arg(model)
    base = build_plan(**plan_options)
    given: frozenset[str] = getattr(plan_options, "given", frozenset())
    lora_row = runnable_dropout(spec, base.model_copy(update={"method": "lora",
                                                              "quant": "none"}), given)
    base = base.model_copy(update={"lora_dropout": lora_row.lora_dropout})
    validate_targets(spec, base)
    long_seq = warn_long_sequence(spec, base)
    if long_seq:
        warn(long_seq)
    from vramcalc.corrections.planning import Estimators

    estimators = Estimators(use_calibration=not no_calibration)
    rows = compare_methods(spec, base, margin_b, catalog(),
                           optimizer=user_optimizer(ctx, plan_options),
                           estimate_for=lambda gpu: estimators(gpu.name),
                           estimate_fn=estimators(None))
    for selection in estimators.applied():
        warn(selection.note)
    times = _row_times(spec, rows, timing)
    if not any(times):
        timing.refuse("no method fits a catalog GPU with throughput figures: nothing to time")
    if json_output:
        from vramcalc.render import comparison_to_dict

        out = comparison_to_dict(spec.name, rows, margin_b)
        for entry, t in zip(out["methods"], times, strict=True):
            entry["time"] = None if t is None else t.fields()
        print_json(out)
        return
    from rich.console import Console

    from vramcalc.render import print_comparison
    from vramcalc.render_time import print_times

    console = Console()
    print_comparison(spec.name, spec.num_params(), rows, margin_b, console)
    print_times("Time on each method's smallest GPU", [
        (r.label, r.smallest_gpu.gpu if r.smallest_gpu else "-", t)
        for r, t in zip(rows, times, strict=True)], console)


def _row_times(spec: Any, rows: list[Any], timing: Any) -> list[Any]:
    """Each method row's time on its smallest GPU (None: no GPU fits, or no peaks known)."""
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.timing.cost import train_time

    table = timing.table()
    out: list[Any] = []
    for r in rows:
        if r.estimate is None or r.smallest_gpu is None:
            out.append(None)
            continue
        plan = r.plan.model_copy(update={"compute_dtype": r.smallest_gpu.compute_dtype})
        out.append(train_time(spec, plan, resolve_gpu(r.smallest_gpu.gpu), table,
                              timing.dataset_tokens, timing.epochs))
    return out
