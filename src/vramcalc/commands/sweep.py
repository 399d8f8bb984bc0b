"""`vramcalc sweep`: peak memory against one swept setting, with the GPUs' capacity lines.

The plan is estimated once per value of --over (seq-len, batch or rank); the terminal
chart stacks the breakdown in four groups per value, marks each GPU's memory (an empty
card's usable memory, as `plan --gpu` offers it), and says up to which value each GPU
fits: the largest swept value that `plan --gpu` calls "fits" (with --margin; "fits,
tight" does not count), the rule of `plan --max`. --json / --csv print the series; --plot
FILE.png|.svg draws it with matplotlib (the `plot` extra, imported only there).
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from vramcalc.api import SWEEPABLE
from vramcalc.commands.common import print_json, reports_errors, resolve_model_arg, warn
from vramcalc.commands.from_config import with_from_config
from vramcalc.commands.options import (
    JsonOpt,
    MarginOpt,
    ModelOpt,
    NoCalibrationOpt,
    build_plan,
    check_applies,
    margin_bytes,
    refuse_given,
    runnable_dropout,
    validate_targets,
    with_plan_options,
)
from vramcalc.errors import PlanError
from vramcalc.sizing.verdict import DEFAULT_MARGIN_GIB
from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.api import Capacity
    from vramcalc.memory.result import Estimate

CHART_WIDTH = 80
MAX_POINTS = 64
# --over name -> TrainPlan field (SWEEPABLE) and a card's line (Capacity): api.py
# The breakdown stacked in four groups (components of result.Components).
GROUPS: dict[str, tuple[str, ...]] = {
    "weights": ("base_weights", "quant_constants", "unquantized_params", "expert_weights",
                "adapter_weights"),
    "grads + optimizer": ("gradients", "optimizer_states", "optimizer_paged"),
    "activations + logits": ("activations", "kv_cache", "logits_loss", "transient"),
    "overhead": ("cublas_workspace", "comm_buffers", "allocator_slack", "cuda_context"),
}
GLYPHS = ("█", "▓", "▒", "░")

OverOpt = Annotated[
    str,
    typer.Option("--over", help="NAME=START:STOP[:STEP]: NAME is seq-len, batch or rank; "
                 "STEP is *F (multiply, default *2), +N (add) or N (N points, geometric)."),
]
SweepGpuOpt = Annotated[
    list[str] | None,
    typer.Option("--gpu", help="Draw this catalog GPU's memory and where it stops fitting "
                 "(repeatable); see 'vramcalc gpus'."),
]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print the series as CSV on stdout.")]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help="Write the chart to FILE.png or FILE.svg (needs the `plot` "
                 "extra: pip install 'qlora-vramcalc[plot]'). Writes a new file, or replaces "
                 "a regular file you can write (its mode kept); anything else is an "
                 "error."),
]


class Sweep(NamedTuple):
    name: str  # seq-len | batch | rank
    values: list[int]


def parse_over(text: str) -> Sweep:
    """NAME=START:STOP[:STEP] -> the values, START and STOP included."""
    m = re.fullmatch(r"([a-z-]+)=(\d+):(\d+)(?::(\*\d+(?:\.\d+)?|\+\d+|\d+))?", text.strip())
    if m is None:
        raise PlanError(f"--over '{text}': expected NAME=START:STOP[:STEP], e.g. "
                        "seq-len=512:32768 or batch=1:64:+4")
    name, start, stop, step = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or "*2"
    if name not in SWEEPABLE:
        raise PlanError(f"--over: cannot sweep '{name}'; use one of {', '.join(SWEEPABLE)}")
    if not 0 < start < stop:
        raise PlanError(f"--over {name}: need 0 < START < STOP, got {start}:{stop}")
    values: list[int] = []
    def too_many(count: int | str) -> PlanError:  # counted before the values are listed
        return PlanError(f"--over {name}: {count} points; use a larger step (at most "
                         f"{MAX_POINTS})")

    if step.startswith("*"):
        factor = float(step[1:])
        if factor <= 1:
            raise PlanError(f"--over {name}: the factor must be above 1, got {step}")
        about = math.log(stop / start) / math.log(factor)
        if about > 2 * MAX_POINTS:
            raise too_many(f"about {about:.0f}")
        v = float(start)
        while v < stop:
            values.append(int(v))
            v *= factor
    elif step.startswith("+"):
        inc = int(step[1:])
        if inc <= 0:
            raise PlanError(f"--over {name}: the step must be positive, got {step}")
        if len(range(start, stop, inc)) + 1 > MAX_POINTS:
            raise too_many(len(range(start, stop, inc)) + 1)
        values = list(range(start, stop, inc))
    else:
        n = int(step)
        if n < 2:
            raise PlanError(f"--over {name}: need at least 2 points, got {n}")
        if n > MAX_POINTS:
            raise too_many(n)
        values = [round(start * (stop / start) ** (i / (n - 1))) for i in range(n - 1)]
    values = sorted(set(values) | {stop})
    if len(values) > MAX_POINTS:
        raise PlanError(f"--over {name}: {len(values)} points; use a larger step (at most "
                        f"{MAX_POINTS})")
    return Sweep(name, values)


def group_bytes(est: Estimate) -> dict[str, int]:
    return {g: sum(est.components[c] for c in names) for g, names in GROUPS.items()}


def render_chart(sweep: Sweep, points: list[Estimate], caps: list[Capacity],
                 width: int = CHART_WIDTH) -> str:
    """Plain-text chart: one stacked bar per value, GPU lines as '|' (80 columns)."""
    label_w = max(len(str(v)) for v in sweep.values) + 1
    num_w = 9  # " 123.45 G"
    bar_w = width - label_w - num_w - 1
    top = max([e.peak_device_bytes for e in points] + [c.memory_bytes for c in caps])
    scale = bar_w / top
    marks = {min(bar_w - 1, int(c.memory_bytes * scale)): str(i + 1) for i, c in enumerate(caps)}
    lines = [f"peak device memory (GiB = 2**30) against {sweep.name}"]
    for v, e in zip(sweep.values, points, strict=True):
        cells: list[str] = []
        for glyph, nbytes in zip(GLYPHS, group_bytes(e).values(), strict=True):
            cells.extend(glyph * round(nbytes * scale))
        cells = (cells + [" "] * bar_w)[:bar_w]
        for col, mark in marks.items():
            cells[col] = "|" if cells[col] == " " else mark
        lines.append(f"{v:>{label_w}} {''.join(cells)} {e.peak_device_bytes / GiB:7.2f}")
    legend = "  ".join(f"{g} {n}" for g, n in zip(GLYPHS, GROUPS, strict=True))
    lines.append(" " * label_w + " " + legend)
    for i, c in enumerate(caps):
        where = (f"fits up to {sweep.name} {c.fits_up_to}" if c.fits_up_to is not None
                 else f"does not fit even at {sweep.name} {sweep.values[0]}")
        lines.append(f"  |{i + 1}: {c.name} ({c.memory_bytes / GiB:.1f} GiB): {where}")
    return "\n".join(lines)


def plot_format(path: Path) -> str:
    """'png' or 'svg' by the file's suffix; PlanError for any other."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise PlanError(f"--plot {path}: the file must end in .png or .svg")
    return fmt


def write_plot(path: Path, model: str, sweep: Sweep, points: list[Estimate],
               caps: list[Capacity]) -> None:
    """PNG or SVG by the file's suffix, written by vramcalc.user_files.replacing."""
    fmt = plot_format(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'qlora-vramcalc[plot]'") from None
    xs = sweep.values
    stacks = [[group_bytes(e)[g] / GiB for e in points] for g in GROUPS]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.stackplot(xs, stacks, labels=list(GROUPS), alpha=0.85)
    ax.plot(xs, [e.required_device_bytes / GiB for e in points], "k--", lw=1,
            label="required free memory")
    for c in caps:
        ax.axhline(c.memory_bytes / GiB, color="red", lw=0.8)
        ax.text(xs[0], c.memory_bytes / GiB, f" {c.name}", va="bottom", fontsize=8)
        if c.fits_up_to is not None:
            ax.axvline(c.fits_up_to, color="red", lw=0.6, ls=":")
    if xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(sweep.name)
    ax.set_ylabel("GiB (2**30 bytes)")
    ax.set_title(f"{model}: peak memory against {sweep.name}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    from vramcalc.user_files import replacing

    try:
        with replacing(path, "--plot") as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)


@reports_errors
@with_from_config
@with_plan_options
def sweep(
    model: ModelOpt,
    plan_options: dict[str, Any],
    over: OverOpt = "seq-len=512:32768",
    gpu: SweepGpuOpt = None,
    plot: PlotOpt = None,
    csv_output: CsvOpt = False,
    margin: MarginOpt = DEFAULT_MARGIN_GIB,
    no_calibration: NoCalibrationOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Peak memory against sequence length, batch size or LoRA rank, with GPU lines.

    Each --gpu is an empty card offering its total less the driver's
    reservation, as in plan --gpu. "fits up to" is the largest swept value
    that plan --gpu calls "fits" (required free memory + --margin <= memory,
    outside the estimate's spread); a "fits, tight" value does not count, as
    for plan --max, which answers between the swept values.

    \b
    Examples:
      vramcalc sweep -m qwen2.5-7b --over seq-len=512:4096 --gpu l4 --gpu h100
      vramcalc sweep -m qwen2.5-7b --over batch=1:64 --seq-len 2048 --json
      vramcalc sweep -m llama-3.1-8b --over rank=8:256 --plot rank.svg
    """
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.sizing.verdict import catalog_target

    if plot is not None:  # before the sweep: a path that cannot be written fails at once
        from vramcalc.user_files import check_writable

        plot_format(plot)
        check_writable(plot, "--plot")
    if json_output and csv_output:
        raise PlanError("give either --json or --csv, not both")
    sw = parse_over(over)
    option = {"seq-len": "seq_len", "batch": "batch", "rank": "rank"}[sw.name]
    given: frozenset[str] = getattr(plan_options, "given", frozenset())
    refuse_given(given, (option,), f"--over {sw.name} sets it; drop one of the two")
    margin_b = margin_bytes(margin)
    targets = [catalog_target(resolve_gpu(g)) for g in gpu or []]
    spec = resolve_model_arg(model)
    train = build_plan(**plan_options)
    build_plan(**{**plan_options, option: sw.values[-1]})  # the largest swept value: bounds
    check_applies(spec, train, given)
    if sw.name == "rank" and train.method == "full":
        raise PlanError("--over rank: --method full has no LoRA rank")
    train = runnable_dropout(spec, train, given)
    validate_targets(spec, train)

    from vramcalc.api import sweep as sweep_plan

    result = sweep_plan(spec, train, sw.name, sw.values, targets, margin_b,
                        calibration=not no_calibration, say=warn)
    points, caps = result.points, result.gpus
    if plot is not None:
        write_plot(plot, spec.name, sw, points, caps)
        warn(f"wrote {plot}")
    if json_output:
        print_json(result.to_json())
    elif csv_output:
        rows = result.series()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        typer.echo(render_chart(sw, points, caps))
