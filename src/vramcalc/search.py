"""The inverse question: the largest batch size or sequence length that fits a budget.

Peak memory grows monotonically with batch and sequence length, and nearly linearly, so the
search guesses by the line through the points it has (secant steps while the answer is
unbounded, interpolation once it is bracketed) and falls back to doubling and bisection
whenever a guess does not shrink the search enough: the answer is exact for any monotone
estimate, and a near-linear one takes about five estimates instead of the ~40 of plain
doubling + bisection (`vramcalc fit` runs thousands of these: bench/fit_speed.py).
"""

from __future__ import annotations

from collections.abc import Callable

from vramcalc.estimate import Estimate, estimate, required_only_context
from vramcalc.plan_settings import TrainPlan
from vramcalc.planning import EstimateFn
from vramcalc.specs import ModelSpec

SEARCHABLE = ("batch", "seq-len")
_FIELD = {"batch": "batch_size", "seq-len": "seq_len"}
UPPER_LIMIT = 1 << 22  # 4M tokens per sequence or sequences per batch: far past any GPU


def largest_fitting(
    spec: ModelSpec,
    plan: TrainPlan,
    what: str,
    budget_bytes: int,
    measure: Callable[[Estimate], int] = lambda e: e.required_device_bytes,
    estimate_fn: EstimateFn = estimate,
    confirm: bool = False,
) -> int:
    """Largest value of `what` (batch or seq-len), at most UPPER_LIMIT, whose estimate
    fits `budget_bytes`; 0 when even 1 does not fit.

    The search runs on the quick estimate (required_only: the phase formula). `confirm`
    checks its answer with the full one (the replayed step program, what `plan` and
    `check` report for a single plan, within a few percent of the formula) and moves it
    to that estimate's own boundary: a few full estimates more (bench/fit_speed.py)."""
    field = _FIELD[what]

    def need(n: int) -> int:
        return measure(estimate_fn(spec, plan.model_copy(update={field: n})))

    with required_only_context():
        quick = largest_at_most(need, budget_bytes, UPPER_LIMIT)
    if not confirm:
        return quick
    return largest_near(need, budget_bytes, max(quick, 1), UPPER_LIMIT)


def largest_near(need: Callable[[int], int], budget: int, n: int, upper: int) -> int:
    """`largest_at_most(need, budget, upper)`, searched from a guess `n` close to it: up
    from n while n fits, else down among 1..n-1."""
    if need(n) <= budget:
        return n - 1 + largest_at_most(lambda m: need(n - 1 + m), budget, upper - n + 1)
    return largest_at_most(need, budget, n - 1) if n > 1 else 0


def largest_at_most(need: Callable[[int], int], budget: int, upper: int) -> int:
    """The largest n in [1, upper] with need(n) <= budget, for a non-decreasing `need`;
    0 when need(1) > budget.

    Invariant: need(lo) <= budget, and every n >= hi is over it (hi = upper + 1 is a
    sentinel never evaluated). Each guess lies strictly inside (lo, hi), so the loop ends;
    a guess that fits while hi is unknown is followed by at least a doubling, and a
    bracketed guess that leaves more than half the interval by a bisection, so the worst
    case stays within about twice the plain search's estimates.
    """
    f_lo = need(1)
    if f_lo > budget:
        return 0
    lo, hi = 1, upper + 1
    f_hi: int | None = None  # need(hi), once hi is a measured point
    prev, f_prev = 0, 0  # the fitting point before lo (for the secant); 0: none yet
    undershot = False  # the last unbounded guess fitted: gallop next time
    bisect = False  # the last bracketed guess shrank the interval by less than half
    while hi - lo > 1:
        if f_hi is None:  # unbounded: extend the line through the last two fitting points
            if prev and f_lo > f_prev:
                guess = lo + (budget - f_lo) * (lo - prev) // (f_lo - f_prev)
            else:
                guess = 2 * lo
            if undershot:
                guess = max(guess, 2 * lo)
        elif bisect:
            guess = (lo + hi) // 2
        else:  # interpolate between lo (fits) and hi (over budget)
            guess = lo + (budget - f_lo) * (hi - lo) // (f_hi - f_lo)
        guess = min(max(guess, lo + 1), hi - 1)
        width = hi - lo
        f = need(guess)
        if f <= budget:
            prev, f_prev, lo, f_lo = lo, f_lo, guess, f
            undershot = f_hi is None
        else:
            hi, f_hi = guess, f
        bisect = f_hi is not None and not bisect and 2 * (hi - lo) > width
    return lo
