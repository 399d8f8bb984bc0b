"""`vramcalc plan`: the analytic estimate (no GPU, no torch)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vramcalc.commands.common import print_json, reports_errors, warn
from vramcalc.commands.from_config import announce_spec, with_from_config
from vramcalc.commands.options import (
    JsonOpt,
    ModelOpt,
    NoCalibrationOpt,
    build_plan,
    validate_targets,
    with_plan_options,
)
from vramcalc.errors import PlanError

GiB = 2**30
EXIT_DOES_NOT_FIT = 3

GpuMemOpt = Annotated[
    float | None,
    typer.Option("--gpu-memory", help="GPU memory in GiB (2**30) to check the plan against."),
]
MaxOpt = Annotated[
    str | None,
    typer.Option("--max", help="With --gpu-memory: the largest 'batch' or 'seq-len' that fits."),
]


@reports_errors
@with_from_config
@with_plan_options
def plan(
    model: ModelOpt,
    plan_options: dict[str, Any],
    gpu_memory: GpuMemOpt = None,
    max_: MaxOpt = None,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Estimate the peak GPU memory of one QLoRA / LoRA training step.

    \b
    Examples:
      vramcalc plan --model llama-7b --rank 16 --batch 4
      vramcalc plan -m meta-llama/Llama-3.1-8B --seq-len 2048 --gpu-memory 24
      vramcalc plan -m qwen2.5-7b --gpu-memory 24 --max batch --json
      vramcalc plan -m ./my-model/config.json --quant none --optimizer adamw_torch
      vramcalc plan --from-config axolotl.yaml --batch 2
    """
    from vramcalc.planning import calibration_note, estimator
    from vramcalc.render import estimate_to_dict
    from vramcalc.specs import resolve_model

    spec = resolve_model(model)
    announce_spec(spec)
    train = build_plan(**plan_options)
    validate_targets(spec, train)
    if gpu_memory is not None and gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory}")
    if max_ is not None:
        from vramcalc.search import SEARCHABLE

        if max_ not in SEARCHABLE:
            raise PlanError(f"--max takes one of {', '.join(SEARCHABLE)}, got '{max_}'")
        if gpu_memory is None:
            raise PlanError("--max needs --gpu-memory GIB (the budget to fit in)")
    estimate, corrections = estimator(None, use_calibration=not no_calibration)
    note = calibration_note(corrections)
    if note:
        warn(note)
    if max_ is not None:
        _answer_max(spec, train, max_, gpu_memory, json_output, estimate)
        return
    est = estimate(spec, train)
    fits = None if gpu_memory is None else est.required_device_bytes <= gpu_memory * GiB
    if json_output:
        out = estimate_to_dict(est, train)
        out["calibration"] = None if corrections is None else corrections.key
        if fits is not None:
            out["gpu_memory_bytes"] = int(gpu_memory * GiB)  # type: ignore[operator]
            out["fits"] = fits
        print_json(out)
    else:
        from rich.console import Console

        from vramcalc.render import print_breakdown

        console = Console()
        print_breakdown(est, train, console)
        if fits is not None:
            verdict = "[green]fits[/green]" if fits else "[red]does NOT fit[/red]"
            head = gpu_memory - est.required_device_bytes / GiB  # type: ignore[operator]
            console.print(f"{verdict} in {gpu_memory:g} GiB (headroom {head:+.2f} GiB)")
    if fits is False:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _answer_max(  # type: ignore[no-untyped-def]
    spec, train, what: str, gpu_memory: float | None, json_output: bool, estimate_fn
) -> None:
    from vramcalc.search import largest_fitting

    assert gpu_memory is not None  # checked by plan()
    best = largest_fitting(spec, train, what, int(gpu_memory * GiB), estimate_fn=estimate_fn)
    if json_output:
        print_json({"model": spec.name, "max": what, "value": best, "fits": best > 0,
                    "gpu_memory_bytes": int(gpu_memory * GiB)})
    else:
        typer.echo(
            f"largest {what} that fits {gpu_memory:g} GiB: {best}" if best
            else f"nothing fits in {gpu_memory:g} GiB, not even {what} 1"
        )
    if best == 0:
        raise typer.Exit(EXIT_DOES_NOT_FIT)
