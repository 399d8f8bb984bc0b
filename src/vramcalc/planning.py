"""The estimate that `plan` and `check` show: raw, or with fitted corrections.

Which corrections apply, from where, and why not when none do, is decided by
`vramcalc.corrections.select_corrections` (GPU family, installed stack, held-out verdict;
a user's own fit beats the shipped one); `--no-calibration` skips all of it.
"""

from __future__ import annotations

from collections.abc import Callable

from vramcalc.corrections import Selection, corrected, select_corrections
from vramcalc.estimate import Estimate, estimate
from vramcalc.plan_settings import TrainPlan
from vramcalc.specs import ModelSpec

EstimateFn = Callable[[ModelSpec, TrainPlan], Estimate]


def estimator(gpu_name: str | None, use_calibration: bool) -> tuple[EstimateFn, Selection | None]:
    """The estimate function to use, and the corrections decision behind it (None when
    --no-calibration; `.key` is None when the raw estimate is used)."""
    if not use_calibration:
        return estimate, None
    selection = select_corrections(gpu_name)
    c = selection.corrections
    if c is None:
        return estimate, selection

    def corrected_estimate(spec: ModelSpec, plan: TrainPlan) -> Estimate:
        return corrected(estimate(spec, plan), c)

    return corrected_estimate, selection


def calibration_note(selection: Selection | None) -> str | None:
    """The stderr line saying which corrections were applied and from where, or why none."""
    return None if selection is None else selection.note or None
