"""The inverse question: the largest batch size or sequence length that fits a budget.

Peak memory grows monotonically with batch and sequence length, and nearly linearly, so the
search guesses by the line through the points it has (secant steps while the answer is
unbounded, interpolation once it is bracketed) and falls back to doubling and bisection
whenever a guess does not shrink the search enough: the answer is exact for any monotone
estimate, and a near-linear one takes about five estimates instead of the ~40 of plain
doubling + bisection (`vramcalc fit` runs thousands of these: bench/fit_speed.py).

The searches of every command (`plan --max`, `check --max`, `fit`, the suggestions) answer
on the full estimate, the one `plan` shows, by the rule `plan` uses for "fits"
(verdict.fits_certainly); the phase formula only gives them their first guess and the
slope of its line, along which the full estimate's search steps from there
(`largest_near`): over the catalog on an RTX 4090 (`vramcalc fit`), 493 full estimates in
the searches where stepping from the guess one value at a time took 774 (2026-12-07).
fit's searches start where the row's batch-1 estimate is known (`largest_from_guess`'s
`anchor`): 444 full estimates in the searches, 484 unanchored, besides the 160 rows'
batch-1 estimates (2026-12-07, counted at 8525100 and after).
Where the full estimate is the raw one (no corrections for the card), a search reads its
required bytes without the allocator's replay (`raw_probes`: `estimate.required_bytes`, the
same bytes), and so do check's suggestions, `plan --max`/`check --max` and compare's
smallest-GPU column (sizing/advice.py, sizing/comparison.py smallest_gpu).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from weakref import WeakKeyDictionary

from vramcalc.corrections.planning import EstimateFn, Memoized, is_raw
from vramcalc.memory.estimate import Estimate, estimate, required_bytes
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import InferPlan, TrainPlan
from vramcalc.sizing.verdict import certain_need

SEARCHABLE = ("batch", "seq-len")
_FIELD = {"batch": "batch_size", "seq-len": "seq_len"}
UPPER_LIMIT = 1 << 22  # 4M tokens per sequence or sequences per batch: far past any GPU
# (spec, plan) -> the raw estimate's (required_device_bytes, required_low)
RequiredFn = Callable[[ModelSpec, TrainPlan], tuple[int, int]]


def quick_estimate(spec: ModelSpec, plan: TrainPlan) -> Estimate:
    """The phase formula without the replay (`estimate(..., replay=False)`): a first guess
    for a search, never a number shown."""
    return estimate(spec, plan, replay=False)


def memoized_quick() -> EstimateFn:
    """`quick_estimate`, each (spec, plan) once (the spec kept: its id stays its own)."""
    memo: dict[tuple[int, TrainPlan], tuple[ModelSpec, Estimate]] = {}

    def quick(spec: ModelSpec, plan: TrainPlan) -> Estimate:
        key = (id(spec), plan)
        hit = memo.get(key)
        if hit is None or hit[0] is not spec:
            hit = memo[key] = (spec, quick_estimate(spec, plan))
        return hit[1]

    return quick


def raw_required(quick: EstimateFn,
                 known: Callable[[ModelSpec, TrainPlan], Estimate | None] | None = None
                 ) -> RequiredFn:
    """The raw estimate's required bytes (`estimate.required_bytes`: no allocator replay),
    each (spec, plan) once, on the phase formula's estimate `quick` gives (a
    `memoized_quick`, which a search's guesses share: the same plans). `known`: the full
    raw estimate of a plan where it was made already (Memoized.known), read instead."""
    memo: dict[tuple[int, TrainPlan], tuple[ModelSpec, tuple[int, int]]] = {}

    def required(spec: ModelSpec, plan: TrainPlan) -> tuple[int, int]:
        key = (id(spec), plan)
        hit = memo.get(key)
        if hit is None or hit[0] is not spec:
            full = None if known is None else known(spec, plan)
            hit = memo[key] = (spec, required_bytes(spec, plan, quick(spec, plan))
                               if full is None else
                               (full.required_device_bytes, full.required_low))
        return hit[1]

    return required


class RawProbes(NamedTuple):
    """A search's probes of the raw estimate: the phase formula's estimate (memoized: the
    first guesses) and the required bytes read off it without the replay (raw_required)."""

    guess: EstimateFn
    required: RequiredFn


# a memoized raw estimate -> its probes, shared by every search of the command that made it
# (check's suggestions on each catalog GPU revisit the same plans); weak: they go with it
_PROBES: WeakKeyDictionary[EstimateFn, RawProbes] = WeakKeyDictionary()


def raw_probes(estimate_fn: EstimateFn) -> RawProbes | None:
    """The probes that read `estimate_fn`'s required bytes without the replay where it is
    the raw estimate (corrections.planning.is_raw), byte for byte the same; None where it
    is not (a corrected estimate reads the replay's allocated peak). A `memoized` raw
    estimate keeps its probes (one memo for the command); the bare `estimate` gets new."""
    if not is_raw(estimate_fn):
        return None
    if not isinstance(estimate_fn, Memoized):
        guess = memoized_quick()
        return RawProbes(guess, raw_required(guess))
    probes = _PROBES.get(estimate_fn)
    if probes is None:
        guess = memoized_quick()
        probes = _PROBES[estimate_fn] = RawProbes(
            guess, raw_required(guess, known=estimate_fn.known))
    return probes


def required_device(estimate_fn: EstimateFn) -> Callable[[ModelSpec, TrainPlan], int]:
    """(spec, plan) -> `estimate_fn`'s required_device_bytes: off the raw probes (no
    replay) where it is the raw estimate, else off the estimate itself."""
    probes = raw_probes(estimate_fn)
    if probes is None:
        return lambda spec, plan: estimate_fn(spec, plan).required_device_bytes
    required = probes.required
    return lambda spec, plan: required(spec, plan)[0]


def largest_fitting(
    spec: ModelSpec,
    plan: TrainPlan,
    what: str,
    memory_bytes: int,
    margin_bytes: int,
    estimate_fn: EstimateFn = estimate,
    guess_fn: EstimateFn | None = quick_estimate,
    anchored: bool = False,
    required_fn: RequiredFn | None = None,
) -> int:
    """Largest value of `what` (batch or seq-len), at most UPPER_LIMIT, that `plan` calls
    "fits" on a card offering `memory_bytes` with `margin_bytes` to spare
    (verdict.fits_certainly: "fits, tight" does not count); 0 when 1 does not fit.

    The answer is exact for `estimate_fn` (the full estimate, what `plan` shows): the
    phase formula (`guess_fn`, about 1 ms) finds a first guess and its slope there, and
    the search moves from there to `estimate_fn`'s own boundary, usually in two or three
    full estimates (each value is estimated once). `guess_fn=None` searches `estimate_fn`
    alone. `anchored`: `estimate_fn` has estimated `plan` itself already and remembers it
    (corrections.planning.memoized): the search starts from there (`largest_from_guess`'s
    `anchor`), at no cost. `required_fn` (`raw_required`, where `estimate_fn` is the raw
    `estimate`): its required bytes, the same, read without the replay; where it is not
    given and `estimate_fn` is the raw estimate with the default `guess_fn`, the search
    reads them so by itself (raw_probes)."""
    field = _FIELD[what]
    if required_fn is None and guess_fn is quick_estimate:
        probes = raw_probes(estimate_fn)
        if probes is not None:
            guess_fn, required_fn = probes

    def need_of(fn: EstimateFn) -> Callable[[int], int]:
        def need(n: int) -> int:
            est = fn(spec, plan.model_copy(update={field: n}))
            return certain_need(est.required_device_bytes, margin_bytes)

        return need

    def need_required(n: int) -> int:
        assert required_fn is not None
        return certain_need(required_fn(spec, plan.model_copy(update={field: n}))[0],
                            margin_bytes)

    full = need_of(estimate_fn) if required_fn is None else need_required
    return largest_from_guess(full, memory_bytes, UPPER_LIMIT,
                              None if guess_fn is None else need_of(guess_fn),
                              getattr(plan, field) if anchored else None)


def largest_from_guess(need: Callable[[int], int], budget: int, upper: int,
                       guess_need: Callable[[int], int] | None = None,
                       anchor: int | None = None) -> int:
    """`largest_at_most(need, budget, upper)` for a costly `need` (memoized here): searched
    from the answer of a cheap `guess_need` that tracks it, when one is given.

    `anchor`: a value whose `need` is known (or cheap): the cheap guess is shifted by its
    miss there (the formula's required memory is off the full estimate's by an offset
    that varies slowly: 0.43 % median, issue 26), and `largest_near` steps along the
    secant through the full estimates from there on. Over the catalog on an RTX 4090
    (`vramcalc fit`, each row anchored at its batch-1 estimate): 444 full estimates in
    the searches where the formula's guess alone took 484 (2026-12-07); the answers are
    the same (every search is exact for a non-decreasing need, whatever its guesses)."""
    memo: dict[int, int] = {}

    def cached(n: int) -> int:
        if n not in memo:
            memo[n] = need(n)
        return memo[n]

    if guess_need is None:
        return largest_at_most(cached, budget, upper)
    # the guess memoized too: the search below asks for some values twice (1, its answer
    # n and n + 1 for the slope); the same values, so the same path and estimates
    guess_memo: dict[int, int] = {}
    cheap = guess_need

    def guess(m: int) -> int:
        if m not in guess_memo:
            guess_memo[m] = cheap(m)
        return guess_memo[m]

    known = None  # a value and its need, for the secant
    offset = 0
    if anchor:
        known = (anchor, cached(anchor))
        offset = known[1] - guess(anchor)

    def shifted(m: int) -> int:
        return guess(m) + offset

    n = max(largest_at_most(shifted, budget, upper), 1)
    slope = shifted(n + 1) - shifted(n) if n < upper else 0
    return largest_near(cached, budget, n, upper, slope, known)


def largest_near(need: Callable[[int], int], budget: int, n: int, upper: int,
                 slope: int = 0, known: tuple[int, int] | None = None) -> int:
    """`largest_at_most(need, budget, upper)`, searched from a guess `n` close to it.

    With a `slope` > 0 (bytes per step of the cheap guess's own line, which the full
    estimate's tracks): from need(n), a step along that slope (along the secant through
    need(n) and the last value estimated, or `known`, a value and its need, where that
    rises) to the value it predicts fits last, then one to the neighbour that confirms
    it (the value after a fitting one, the one before one over budget); most searches
    end there, in two or three estimates: need(m) <= budget < need(m + 1) makes m the
    answer of a non-decreasing need. At most three values are tried so; what is left of
    the bracket they leave (the largest that fits, the smallest over) is searched by
    `largest_at_most`, so the answer is exact for any non-decreasing need, whatever the
    slope and the known point.
    Without a slope: up from n while n fits; else down from n in steps that double
    (n-1, n-2, n-4, ...) until one fits, then inside that bracket."""
    if slope > 0:
        lo, hi = 0, upper + 1  # need(lo) <= budget (lo 0: none known yet) < need(hi)
        guess = n
        for _ in range(3):
            f = need(guess)
            if f <= budget:
                lo = guess
            else:
                hi = guess
            if hi - lo <= 1:
                return lo
            # floor: a fitting value steps up by whole slopes that still fit (0: confirm
            # guess + 1); one over budget steps down at least one
            if known is not None and (f - known[1]) * (guess - known[0]) > 0:
                step = (budget - f) * (guess - known[0]) // (f - known[1])
            else:
                step = (budget - f) // slope
            known = (guess, f)
            guess = min(max(guess + step, lo + 1), hi - 1)
        return lo + largest_at_most(_shifted(need, lo), budget, hi - 1 - lo)
    if need(n) <= budget:
        return n - 1 + largest_at_most(_shifted(need, n - 1), budget, upper - n + 1)
    hi, step = n, 1  # need(hi) > budget
    while True:
        lo = hi - step
        if lo < 1:
            return largest_at_most(need, budget, hi - 1) if hi > 1 else 0
        if need(lo) <= budget:
            return lo - 1 + largest_at_most(_shifted(need, lo - 1), budget, hi - lo)
        hi, step = lo, 2 * step


def _shifted(need: Callable[[int], int], base: int) -> Callable[[int], int]:
    """need(base + m) as a function of m."""
    return lambda m: need(base + m)


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


def largest_fitting_infer(spec: ModelSpec, plan: InferPlan, what: str, memory_bytes: int,
                          margin_bytes: int) -> int:
    """Largest batch or prompt length that `plan --task infer` calls "fits" on a card
    offering `memory_bytes` with `margin_bytes` to spare (0: none), by the rule of every
    search (verdict.fits_certainly: "fits, tight" does not count)."""
    from vramcalc.memory.inference import estimate_inference
    from vramcalc.plans import MAX_BATCH, MAX_SEQ_LEN

    field = {"batch": "batch_size", "prompt-len": "prompt_len"}[what]

    def need(n: int) -> int:
        est = estimate_inference(spec, plan.model_copy(update={field: n}))
        return certain_need(est.required_device_bytes, margin_bytes)

    # the largest value the option itself accepts (build_infer_plan's bounds)
    limit = MAX_BATCH if what == "batch" else MAX_SEQ_LEN - plan.new_tokens
    return largest_from_guess(need, memory_bytes, limit)
