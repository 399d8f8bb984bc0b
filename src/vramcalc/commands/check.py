"""`vramcalc check`: the GPUs of this machine, and whether a plan fits them.

Alone it lists the detected GPUs. With --model it estimates the plan once per compute dtype
and gives a verdict per GPU; with --gpu NAME or --gpu-memory GIB it checks an empty card
instead and never calls NVML. rich, pynvml and the catalog load inside the function bodies.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from vramcalc.commands.common import print_json, reports_errors, warn
from vramcalc.commands.from_config import announce_spec, with_from_config
from vramcalc.commands.options import (
    JsonOpt,
    NoCalibrationOpt,
    build_plan,
    validate_targets,
    with_plan_options,
)
from vramcalc.errors import PlanError

if TYPE_CHECKING:
    from vramcalc.advice import Suggestion
    from vramcalc.estimate import Estimate
    from vramcalc.gpus import DeviceInfo
    from vramcalc.plan_settings import TrainPlan
    from vramcalc.planning import EstimateFn
    from vramcalc.specs import ModelSpec

GiB = 2**30
EXIT_DOES_NOT_FIT = 3
DEFAULT_MARGIN_GIB = 0.5

CheckModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Catalog name, alias (HF hub id), spec YAML, or config.json path. "
        "Without it, check lists the detected GPUs.",
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option("--gpu", help="Plan for this catalog GPU (empty card) instead of detecting; "
                 "see 'vramcalc gpus'."),
]
GpuMemOpt = Annotated[
    float | None,
    typer.Option("--gpu-memory", help="Plan for an empty card of this many GiB (2**30) "
                 "instead of detecting."),
]
MarginOpt = Annotated[
    float,
    typer.Option("--margin", help="Safety margin in GiB kept free on top of the estimate, "
                 "for estimation error and fragmentation (default 0.5 GiB)."),
]


def _detect_devices() -> list[DeviceInfo]:
    """The GPUs NVML sees; tests replace this function with a fake."""
    from vramcalc.gpus import query_devices  # pynvml loads inside

    return query_devices()


class Target(NamedTuple):
    """A card to check against: a detected GPU, or an empty catalog / sized one."""

    name: str
    index: int | None  # NVML index; None for --gpu / --gpu-memory
    label: str | None  # "0", or "0:1" for a MIG instance
    total_bytes: int
    free_bytes: int
    bf16_supported: bool
    compute_capability: str | None


class Verdict(NamedTuple):
    target: Target
    plan: TrainPlan
    estimate: Estimate
    fits_free: bool
    fits_empty: bool
    headroom_bytes: int  # free - peak device (the margin not subtracted)

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {
            "name": t.name,
            "index": t.index,
            "label": t.label,
            "total_bytes": t.total_bytes,
            "free_bytes": t.free_bytes,
            "compute_capability": t.compute_capability,
            "compute_dtype": self.plan.compute_dtype,
            "peak_device_bytes": self.estimate.peak_device_bytes,
            "required_device_bytes": self.estimate.required_device_bytes,
            "fits_free": self.fits_free,
            "fits_empty": self.fits_empty,
            "headroom_bytes": self.headroom_bytes,
        }


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
                         no_wrap=col != "Name")
    for d in devices:
        major, minor = d.compute_capability
        table.add_row(
            d.label, d.name, _gib(d.total_bytes), _gib(d.free_bytes), _gib(d.used_bytes),
            _gib(d.other_processes_bytes), f"{major}.{minor}",
            "yes" if d.bf16_supported else "no", "MIG" if d.is_mig else "",
        )
    Console().print(table)


# ---- checking -----------------------------------------------------------------------------


def _targets(gpu: str | None, gpu_memory: float | None) -> list[Target]:
    if gpu is not None:
        from vramcalc.gpu_catalog import resolve_gpu

        g = resolve_gpu(gpu)
        return [Target(g.name, None, None, g.memory_bytes, g.memory_bytes, g.bf16_supported,
                       g.compute_capability)]
    if gpu_memory is not None:
        size = int(gpu_memory * GiB)
        return [Target(f"{gpu_memory:g} GiB card", None, None, size, size, True, None)]
    return [
        # An empty card offers its total less what the driver reserves (NVML v2 `reserved`:
        # 480 MiB on our H100), not the whole total.
        Target(d.name, d.index, d.label, d.total_bytes - (d.reserved_bytes or 0), d.free_bytes,
               d.bf16_supported, "{}.{}".format(*d.compute_capability))
        for d in _detect_devices()
    ]


def _verdicts(
    spec: ModelSpec, train: TrainPlan, targets: list[Target], margin: int,
    estimate: EstimateFn,
) -> list[Verdict]:
    from vramcalc.advice import for_gpu

    cache: dict[str, Estimate] = {}
    out = []
    for t in targets:
        p = for_gpu(train, t.bf16_supported)
        if p is not train:
            where = f"GPU {t.label} ({t.name})" if t.label is not None else t.name
            warn(f"note: {where}, compute capability {t.compute_capability}, has no "
                 "bf16; planning with --compute-dtype fp16 for it")
        est = cache.get(p.compute_dtype) or cache.setdefault(p.compute_dtype, estimate(spec, p))
        peak = est.required_device_bytes
        out.append(Verdict(t, p, est, peak + margin <= t.free_bytes,
                           peak + margin <= t.total_bytes, t.free_bytes - peak))
    return out


def _where(v: Verdict) -> str:
    t = v.target
    return f"GPU {t.label} ({t.name})" if t.label is not None else t.name


def _render(
    verdicts: list[Verdict],
    best: Verdict,
    margin: int,
    suggestions: list[Suggestion],
    larger: str | None,
    detected: bool,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from vramcalc.render import print_breakdown

    console = Console()
    print_breakdown(best.estimate, best.plan, console)
    table = Table(title=f"Verdict per GPU in GiB (2**30 bytes); fits: peak + {_gib(margin)} "
                  "GiB margin <= memory; headroom: memory - peak")
    for col in ("GPU", "Name", "Free", "Total", "Needs", "Fits free", "Fits empty", "Headroom"):
        table.add_column(col, justify="left" if col in ("GPU", "Name") else "right",
                         no_wrap=True)
    for v in verdicts:
        t = v.target
        table.add_row(
            t.label or "-", t.name, _gib(t.free_bytes), _gib(t.total_bytes),
            _gib(v.estimate.required_device_bytes),
            "[green]yes[/green]" if v.fits_free else "[red]no[/red]",
            "[green]yes[/green]" if v.fits_empty else "[red]no[/red]",
            f"{v.headroom_bytes / GiB:+.2f}",
        )
    console.print(table)
    memory = "free memory" if detected else "memory"
    if best.fits_free:
        console.print(f"[green]fits[/green] on {_where(best)}: {best.headroom_bytes / GiB:+.2f} "
                      f"GiB headroom in {memory} (margin {_gib(margin)} GiB)")
        return
    console.print(f"[red]does NOT fit[/red] on {_where(best)}: needs "
                  f"{_gib(best.estimate.required_device_bytes)} GiB + {_gib(margin)} GiB margin, "
                  f"{_gib(best.target.free_bytes)} GiB {memory}")
    if detected and best.fits_empty:
        console.print("it would fit on the empty card: other processes hold the memory it "
                      "needs")
    if suggestions:
        console.print("Changes that make it fit (each estimated):")
        for s in suggestions:
            acc = (f", gradient accumulation {s.gradient_accumulation_steps}"
                   if s.gradient_accumulation_steps else "")
            console.print(f"  - {s.description}: needs {_gib(s.required_device_bytes)} GiB  "
                          f"[dim]({s.flags}{acc})[/dim]", highlight=False)
        return
    console.print(f"it does not fit {_where(best)} even at batch 1 with every memory-saving "
                  "switch")
    if larger is not None:
        console.print(f"smallest catalog GPU it fits: {larger} (vramcalc check ... --gpu {larger})")
    else:
        console.print("no GPU of the catalog fits it")


@reports_errors
@functools.partial(with_from_config, model_required=False)
@with_plan_options
def check(
    model: CheckModelOpt = None,
    plan_options: dict[str, Any] | None = None,
    gpu: GpuOpt = None,
    gpu_memory: GpuMemOpt = None,
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """List this machine's GPUs, or check whether a plan fits them.

    Without --model: the detected GPUs (NVML). With --model: the estimate, a
    verdict per GPU (fits in free memory now; fits on the empty card), and
    when it does not fit, changes that make it fit, each estimated. Fits
    means peak device memory + --margin (default 0.5 GiB, for estimation
    error and fragmentation) <= memory. Several GPUs: the plan is shown for
    the one with the most free memory. Exit 0 fits, 3 does not fit, 4 no GPU.

    \b
    Examples:
      vramcalc check
      vramcalc check --model llama-3.1-8b --batch 4 --seq-len 2048
      vramcalc check -m qwen2.5-7b --gpu rtx-4090 --json
      vramcalc check -m llama-3.1-8b --gpu-memory 24 --margin 1
    """
    if model is None:
        if gpu is not None or gpu_memory is not None:
            raise PlanError("--gpu and --gpu-memory need --model MODEL (the plan to check)")
        _list_devices(_detect_devices(), json_output)
        return
    if gpu is not None and gpu_memory is not None:
        raise PlanError("give either --gpu NAME or --gpu-memory GIB, not both")
    if gpu_memory is not None and gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory}")
    if margin < 0:
        raise PlanError(f"--margin must be zero or more GiB, got {margin}")

    from vramcalc import advice
    from vramcalc.planning import calibration_note, estimator
    from vramcalc.specs import resolve_model

    spec = resolve_model(model)
    announce_spec(spec)
    train = build_plan(**(plan_options or {}))
    validate_targets(spec, train)
    margin_bytes = int(margin * GiB)
    detected = gpu is None and gpu_memory is None
    targets_ = _targets(gpu, gpu_memory)
    # Corrections are fitted per GPU family: those of the first detected / named GPU.
    estimate_fn, corrections = estimator(
        targets_[0].name if gpu_memory is None else None, use_calibration=not no_calibration
    )
    note = calibration_note(corrections)
    if note:
        warn(note)
    verdicts = _verdicts(spec, train, targets_, margin_bytes, estimate_fn)
    best = max(verdicts, key=lambda v: v.target.free_bytes)  # first of equals
    suggestions: list[Suggestion] = []
    larger = None
    if not best.fits_free:
        suggestions = advice.suggest(
            spec, best.plan, best.target.free_bytes - margin_bytes, estimate_fn
        )
        if not suggestions:
            from vramcalc.gpu_catalog import catalog

            found = advice.smallest_fitting_gpu(spec, train, margin_bytes, catalog(), estimate_fn)
            larger = found.name if found is not None else None

    if json_output:
        from vramcalc.render import estimate_to_dict

        print_json({
            "fits": best.fits_free,
            "margin_bytes": margin_bytes,
            "best_gpu": best.to_dict(),
            "gpus": [v.to_dict() for v in verdicts],
            "estimate": estimate_to_dict(best.estimate, best.plan),
            "suggestions": [s.model_dump(mode="json") for s in suggestions],
            "larger_gpu": larger,
            "calibration": None if corrections is None else corrections.key,
        })
    else:
        _render(verdicts, best, margin_bytes, suggestions, larger, detected)
    if not best.fits_free:
        raise typer.Exit(EXIT_DOES_NOT_FIT)
