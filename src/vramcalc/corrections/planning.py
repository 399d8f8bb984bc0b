"""The estimate that `plan` and `check` show: raw, or with fitted corrections.

Which corrections apply, from where, and why not when none do, is decided by
`vramcalc.corrections.factors.select_corrections` (GPU family, installed stack, held-out verdict;
a user's own fit beats the shipped one); `--no-calibration` skips all of it.
"""

from __future__ import annotations

from collections.abc import Callable

from vramcalc.corrections.selection import Selection, without_files
from vramcalc.memory.estimate import Estimate, estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

EstimateFn = Callable[[ModelSpec, TrainPlan], Estimate]


class Memoized:
    """`fn` estimating each (spec, plan) once: for a command whose searches revisit plans
    (the suggestions on each catalog GPU, a search after the verdict). The estimate is
    pure, so a repeat is the same answer; a raised error is not kept."""

    def __init__(self, fn: EstimateFn) -> None:
        self.wrapped = fn  # what it memoizes (is_raw)
        self._memo: dict[tuple[int, TrainPlan], tuple[ModelSpec, Estimate]] = {}

    def __call__(self, spec: ModelSpec, plan: TrainPlan) -> Estimate:
        key = (id(spec), plan)
        hit = self._memo.get(key)
        if hit is None or hit[0] is not spec:
            # the spec kept: its id stays its own
            hit = self._memo[key] = (spec, self.wrapped(spec, plan))
        return hit[1]

    def known(self, spec: ModelSpec, plan: TrainPlan) -> Estimate | None:
        """The estimate of (spec, plan) if it was made already, else None (nothing made)."""
        hit = self._memo.get((id(spec), plan))
        return None if hit is None or hit[0] is not spec else hit[1]


def memoized(fn: EstimateFn) -> Memoized:
    """`fn` estimating each (spec, plan) once (Memoized)."""
    return Memoized(fn)


def is_raw(fn: EstimateFn) -> bool:
    """Whether `fn` is the raw `estimate` (no corrections), bare or `memoized`: its
    required bytes can be read without the replay (estimate.required_bytes)."""
    return fn is estimate or (isinstance(fn, Memoized) and fn.wrapped is estimate)


def estimator(gpu_name: str | None, use_calibration: bool) -> tuple[EstimateFn, Selection | None]:
    """The estimate function to use, and the corrections decision behind it (None when
    --no-calibration; `.key` is None when the raw estimate is used)."""
    if not use_calibration:
        return estimate, None
    selection = without_files(gpu_name)  # plan without a GPU: factors is not imported
    if selection is None:
        from vramcalc.corrections.factors import select_corrections

        selection = select_corrections(gpu_name)
    c = selection.corrections
    if c is None:
        return estimate, selection
    from vramcalc.corrections.factors import corrected

    def corrected_estimate(spec: ModelSpec, plan: TrainPlan) -> Estimate:
        return corrected(estimate(spec, plan), c)

    return corrected_estimate, selection


def calibration_note(selection: Selection | None) -> str | None:
    """The stderr line saying which corrections were applied and from where, or why none."""
    return None if selection is None else selection.note or None


class Estimators:
    """One estimate function per GPU name, built once (that GPU family's corrections, as
    `check --gpu` applies them) and memoized: GPUs under the same corrections (or none)
    share one function, so a plan is estimated once per command. Each corrections decision
    met is kept by key in first-use order, and `on_new` hears of it the first time (check
    prints its note then)."""

    def __init__(self, use_calibration: bool,
                 on_new: Callable[[Selection | None], None] | None = None) -> None:
        self.use = use_calibration
        self.on_new = on_new
        self._fns: dict[str | None, EstimateFn] = {}
        self._by_key: dict[str | None, EstimateFn] = {}
        self.selections: dict[str | None, Selection | None] = {}

    def __call__(self, gpu_name: str | None) -> EstimateFn:
        if gpu_name not in self._fns:
            fn, selection = estimator(gpu_name, use_calibration=self.use)
            key = None if selection is None else selection.key
            if key not in self._by_key:
                self._by_key[key] = memoized(fn)
            self._fns[gpu_name] = self._by_key[key]
            if key not in self.selections:
                self.selections[key] = selection
                if self.on_new is not None:
                    self.on_new(selection)
        return self._fns[gpu_name]

    def raw(self) -> EstimateFn:
        """The raw estimate, memoized: the function of every GPU without corrections (or of
        all of them with --no-calibration), shared with them, so a plan one of them
        estimated is not estimated again (check's multi-GPU options start from it)."""
        if None not in self._by_key:
            self._by_key[None] = memoized(estimate)
        return self._by_key[None]

    def applied(self) -> list[Selection]:
        """The corrections entries actually applied, in first-use order."""
        return [s for k, s in self.selections.items() if k is not None and s is not None]
