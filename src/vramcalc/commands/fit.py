"""`vramcalc fit`: every catalog model and method that fits one GPU.

Parse -> vramcalc.comparison.fit_rows (pure) -> vramcalc.render. Each model x method
(full, lora, qlora, int8) is checked at batch 1 and the plan's seq-len on an empty card
of the GPU (the rule of plan and check); for those that fit, the largest batch at that
seq-len and the longest sequence at the plan's batch (vramcalc.search.largest_fitting).
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
from vramcalc.verdict import DEFAULT_MARGIN_GIB

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

    \b
    Examples:
      vramcalc fit --gpu rtx-4090
      vramcalc fit --gpu a100-80gb --seq-len 4096 --json
      vramcalc fit --gpu l4 --rank 64 --batch 4
    """
    from vramcalc.comparison import fit_rows
    from vramcalc.gpu_catalog import resolve_gpu
    from vramcalc.planning import calibration_note, estimator
    from vramcalc.specs import catalog

    margin_b = margin_bytes(margin)
    card = resolve_gpu(gpu)
    base = build_plan(**plan_options)
    estimate_fn, corrections = estimator(card.name, use_calibration=not no_calibration)
    note = calibration_note(corrections)
    if note:
        warn(note)
    rows = fit_rows(catalog(), base, card, margin_b, optimizer=user_optimizer(ctx, plan_options),
                    estimate_fn=estimate_fn)
    if json_output:
        from vramcalc.render import fit_to_dict

        print_json(fit_to_dict(card.name, card.usable_bytes, rows, margin_b, base))
        return
    from rich.console import Console

    from vramcalc.render import print_fit

    print_fit(card.name, card.usable_bytes, rows, margin_b, base, Console())
