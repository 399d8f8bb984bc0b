"""`vramcalc compare`: one model under every fine-tuning method, side by side.

Parse -> vramcalc.sizing.comparison.compare (pure) -> vramcalc.render. The method, its
quantization and weights dtype are set per row; every other plan option applies to all
rows, and --optimizer, when given, replaces each method's usual optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

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
    switches: Annotated[bool, typer.Option(
        "--switches", help="Also estimate every method under each loss kernel, activation "
        "offloading mode and batch layout: what each memory saver buys (about a dozen more "
        "estimates a method).")] = False,
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
      vramcalc compare -m llama-3.1-8b --batch 8 --seq-len 4096 --switches
    """
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
    from vramcalc.api import compare as compare_methods

    result = compare_methods(spec, base, margin_b, optimizer=user_optimizer(ctx, plan_options),
                             calibration=not no_calibration, prices=timing.table(),
                             dataset_tokens=timing.dataset_tokens, epochs=timing.epochs,
                             switches=switches)
    for note in result.calibration_notes:
        warn(note)
    if not any(result.times):
        timing.refuse("no method fits a catalog GPU with throughput figures: nothing to time")
    if json_output:
        print_json(result.to_json())
        return
    from rich.console import Console

    from vramcalc.render import print_comparison
    from vramcalc.render_time import print_times

    # no :emoji: codes in what check and compare print (plan._render does the same):
    # rich loads its emoji table (~2.5 ms) on the first string it would search for them
    console = Console(emoji=False)
    print_comparison(result.model, result.params, result.rows, margin_b, console)
    print_times("Time on each method's smallest GPU", [
        (r.label, r.smallest_gpu.gpu if r.smallest_gpu else "-", t)
        for r, t in zip(result.rows, result.times, strict=True)], console)
