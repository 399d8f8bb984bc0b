"""Time and cost tables for compare and fit (vramcalc.timing.cost.TrainTime rows)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from vramcalc.timing.cost import TrainTime


def print_times(title: str, rows: list[tuple[str, str, TrainTime | None]],
                console: Console) -> None:
    """One row per (label, gpu, time): s/step, tokens/s, and total and cost when known."""
    from rich.table import Table

    from vramcalc.timing.cost import format_duration

    with_total = any(t is not None and t.total_seconds is not None for _, _, t in rows)
    table = Table(title=title, title_justify="left")
    cols = ["Plan", "GPU", "s/step", "tokens/s"] + (["Total", "Cost"] if with_total else [])
    for col in cols:
        table.add_column(col, justify="left" if col in ("Plan", "GPU") else "right",
                         no_wrap=col != "Plan")
    for label, gpu, t in rows:
        if t is None:
            table.add_row(label, gpu, "-", "-", *(["-", "-"] if with_total else []))
            continue
        cells = [label, gpu, f"{t.step_seconds:.3g}", f"{t.tokens_per_second:,.0f}"]
        if with_total:
            cells.append("-" if t.total_seconds is None else format_duration(t.total_seconds))
            cells.append("-" if t.cost_usd is None else f"${t.cost_usd:,.2f}")
        table.add_row(*cells)
    console.print(table)
    bases = sorted({t.time_basis for _, _, t in rows if t is not None})
    if bases:
        console.print(f"time basis: {', '.join(bases)} (derived: catalog peaks x efficiencies "
                      "by architecture, docs/time-model.md)", highlight=False)
    for gpu, note in calibration_notes(t for _, _, t in rows):
        console.print(f"time on {gpu} calibrated: {note}", highlight=False)


def calibration_notes(times: Iterable[TrainTime | None]) -> list[tuple[str, str]]:
    """(GPU, note) of each GPU timed under this machine's host factor, once each."""
    seen: dict[str, str] = {}
    for t in times:
        if t is not None and t.time_calibration is not None:
            seen.setdefault(t.gpu, t.time_calibration)
    return list(seen.items())
