"""`vramcalc fit`: every catalog model and method that fits one GPU.

Parse -> vramcalc.sizing.comparison.fit_rows (pure) -> vramcalc.render. Each model x method
(full, lora, qlora, int8) is checked at batch 1 and the plan's seq-len on an empty card
of the GPU (the rule of plan and check); for those that fit, the largest batch at that
seq-len and the longest sequence at the plan's batch (vramcalc.sizing.search.largest_fitting).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vramcalc.commands.common import print_json, reports_errors, warn
from vramcalc.commands.compare import user_optimizer
from vramcalc.commands.options import (
    JsonOpt,
    MarginOpt,
    NoCalibrationOpt,
    build_plan,
    margin_bytes,
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

FitGpuOpt = Annotated[
    str,
    typer.Option("--gpu", help="The catalog GPU (an empty card: its total less the driver's "
                 "reservation); see 'vramcalc gpus'."),
]


@reports_errors
@without_per_method_options
def fit(
    ctx: typer.Context,
    gpu: FitGpuOpt,
    plan_options: dict[str, Any],
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
    dataset_tokens: DatasetTokensOpt = None,
    epochs: EpochsOpt = None,
    price: PriceOpt = None,
    prices: PricesOpt = None,
) -> None:
    """Every catalog model and method that fits one GPU, with its largest batch.

    Each catalog model is tried with full fine-tuning, LoRA (16-bit base),
    QLoRA (nf4) and 8-bit LoRA (int8) at batch 1 and --seq-len on an empty
    card of --gpu, by the rule of plan and check (required free memory +
    --margin <= memory; "tight" inside the allocator's band or the estimate's
    spread).
    For each that fits: the largest batch at --seq-len and the longest
    sequence at --batch, as plan --max answers them: the largest value plan
    calls "fits" ("fits, tight" does not count: "-" when batch 1 is only
    tight). The method, its quantization and weights dtype are set per
    method; the optimizer is adamw_torch_fused for full and paged_adamw_8bit
    for the LoRA methods unless --optimizer is given. --json lists every
    pair, fitting or not, and why a pair cannot start.
    Each pair that fits is timed on the GPU at --batch (or its largest batch
    when --batch does not fit): seconds per step, tokens per second, and with
    --dataset-tokens N [--epochs E] the wall time and the cost.

    \b
    Examples:
      vramcalc fit --gpu rtx-4090
      vramcalc fit --gpu a100-80gb --seq-len 4096 --json
      vramcalc fit --gpu l4 --rank 64 --batch 4
    """
    from vramcalc.api import fit as fit_gpu
    from vramcalc.hardware.catalog import resolve_gpu

    margin_b = margin_bytes(margin)
    timing = time_settings(dataset_tokens, epochs, price, prices)
    resolve_gpu(gpu)  # an unknown GPU: its Error line before any plan option's
    base = build_plan(**plan_options)
    result = fit_gpu(gpu, base, margin_b, optimizer=user_optimizer(ctx, plan_options),
                     calibration=not no_calibration, prices=timing.table(),
                     dataset_tokens=timing.dataset_tokens, epochs=timing.epochs)
    if result.calibration_note:
        warn(result.calibration_note)
    if not any(result.times):
        timing.refuse(f"nothing on {result.gpu} can be timed (no pair fits, or the card has "
                      "no throughput figures in vramcalc/data/gpu_speed.yaml)")
    if json_output:
        print_json(result.to_json())
        return
    from rich.console import Console

    from vramcalc.render import print_fit
    from vramcalc.render_time import print_times

    console = Console()
    print_fit(result.gpu, result.gpu_memory_bytes, result.rows, margin_b, base, console)
    timed = [(f"{r.model} {r.method} b{t.tokens_per_step // base.seq_len}", result.gpu, t)
             for r, t in zip(result.rows, result.times, strict=True) if t is not None]
    if timed:
        print_times(f"Time on {result.gpu} at --batch {base.batch_size} (or the largest batch "
                    "that fits)", timed, console)
