"""What `plan` / `check` do about corrections (`Selection`), and the two decisions that
read no file: corrections turned off ($VRAMCALC_CORRECTIONS set empty) and no GPU named.

`vramcalc.corrections.factors.select_corrections` makes every decision; this module holds
what `plan` without --gpu needs of it, so that plan does not import factors (its pydantic
models and file readers, ~2.5 ms of a cold plan, 2026-12-07).
"""

from __future__ import annotations

import os
from typing import Any

from vramcalc.records import Frozen

ENV_PATH = "VRAMCALC_CORRECTIONS"  # one file instead of shipped + user ("" disables)
NO_GPU_NOTE = ("calibration: raw estimate (corrections are fitted per GPU family and no GPU "
               "is named; 'vramcalc check --gpu NAME' applies them)")


class Selection(Frozen):
    """What `plan` / `check` do about corrections: the entry applied (None: the raw
    estimate), where it came from, and the one-line note saying so or why not."""

    _fields = ("corrections", "origin", "note")
    # a factors.Corrections entry or None; typed Any because this module imports nothing
    # of factors (not even for type checking: tests/test_layout.py finds no import circle)
    corrections: Any
    origin: str | None
    note: str

    def __init__(self, corrections: Any, origin: str | None, note: str) -> None:
        self.__dict__.update(corrections=corrections, origin=origin, note=note)

    @property
    def key(self) -> str | None:
        return self.corrections.key if self.corrections is not None else None


def without_files(gpu_name: str | None) -> Selection | None:
    """The selection when it needs no corrections file (turned off, or no GPU named: the
    raw estimate), else None: select_corrections reads the files."""
    if os.environ.get(ENV_PATH) == "":
        return Selection(None, None, "")  # turned off on purpose: nothing to say
    if gpu_name is None:  # `plan`: no file to read
        return Selection(None, None, NO_GPU_NOTE)
    return None
