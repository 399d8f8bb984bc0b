"""The step requests of one plan at many batch sizes or sequence lengths, generated once.

A sweep (`vramcalc sweep --over batch=1:64:+1`) or a long search estimates one plan at
many values of one field (batch_size or seq_len). The generator (program.step.
step_requests) reads that field only through arithmetic on sizes and through decisions
(comparisons, `if`): where every decision comes out the same at two values, the two
request sequences are the same but for their sizes, and each size is the same polynomial
of the field.

`trace` runs the generator once with the field set to a `Sym`: a polynomial in the field
(integer coefficients) that also knows the field's concrete value x0. Arithmetic on a Sym
(+, -, *, a floor division that is exact) gives a polynomial; a decision (==, <, bool,
min, max...) answers at x0, and the polynomial whose sign it asked is kept with that sign
(`Trace`). Anything else (a floor division that is not exact, %, a hash, int(), float(),
an index, a C function that wants an int) raises, and the trace is dropped: the plan is
generated as usual. A Sym is no int, so no C function reads its value without a trace.
At any value x of the field where every kept polynomial has the sign it had at x0
(`Trace.holds`), the generator takes the same path, so its requests are the traced ones
with each size its polynomial at x (`Traced.sizes`), byte for byte.
tests/memory/program/test_symbolic.py compares traced and generated sequences on catalog
plans at values where the trace holds; bench/estimates_digest.py's digest is unchanged.

In llama-3.1-8b's 6-layer cut (LoRA, batch 8, seq 512) the sizes are lines in the batch,
and the 27 decisions are sizes against MIN_REQUEST (64 KiB: `x * 16384 < 65536`...): the
traced sequence holds for batch 5 to 31. A trace costs about twice a generation, a read
about a sixth (2026-12-07, this 2-core machine: 13.1 / 6.5 / 1.2 ms).

`StepCache` keeps the traces of the plans it saw (program.step.step_program): a plan
(but its batch_size and seq_len) met for the first time is generated as usual, and so
are its next points until `trace_after` of them moved along one field only (a sweep);
the next such point is traced, and the later ones where a trace holds are read from it.
`fit` and `plan --max` search in two to four points (bench/engine_speed.py), where a
trace would cost more than it saves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import repeat
from operator import add, mul
from typing import Any

FIELDS = ("batch_size", "seq_len")


class Untraceable(Exception):
    """The generator did something with a Sym that a trace does not follow."""


class Trace:
    """The field's concrete value `x0`, and every decision made on it: the polynomials
    whose sign was asked (a comparison is the sign of a difference) and the sign each had
    at x0. At any other value where each of them has the same sign, the generator decides
    alike: `holds`."""

    __slots__ = ("x0", "signs")

    def __init__(self, x0: int) -> None:
        self.x0 = x0
        self.signs: dict[tuple[int, ...], int] = {}

    def keep(self, poly: tuple[int, ...]) -> int:
        """The sign of `poly` at x0 (-1, 0, 1), kept as a decision."""
        s = self.signs.get(poly)
        if s is None:
            v = _at(poly, self.x0)
            s = (v > 0) - (v < 0)
            if len(poly) > 1:  # (a number's sign is the same everywhere)
                self.signs[poly] = s
        return s

    def holds(self, x: int) -> bool:
        """Every decision is the same at `x` as at x0."""
        for poly, s in self.signs.items():
            v = _at(poly, x)
            if (v > 0) - (v < 0) != s:
                return False
        return True


def _at(poly: tuple[int, ...], x: int) -> int:
    v = 0
    for c in reversed(poly):
        v = v * x + c
    return v


def _trim(poly: list[int]) -> tuple[int, ...]:
    while len(poly) > 1 and poly[-1] == 0:
        poly.pop()
    return tuple(poly)


class Sym:
    """A size that is a polynomial of the traced field (coefficients from degree 0),
    answering every comparison at the trace's x0 (module docstring)."""

    __slots__ = ("poly", "trace")

    def __init__(self, poly: tuple[int, ...], trace: Trace) -> None:
        self.poly, self.trace = poly, trace

    def _of(self, other: object) -> tuple[int, ...]:
        if type(other) is Sym:
            if other.trace is not self.trace:
                raise Untraceable("two traces")
            return other.poly
        if type(other) is int or type(other) is bool:
            return (int(other),)
        raise Untraceable(f"a Sym with {type(other).__name__}")

    def _new(self, poly: tuple[int, ...]) -> Sym | int:
        return poly[0] if len(poly) == 1 else Sym(poly, self.trace)

    # -- arithmetic: polynomials ---------------------------------------------------------
    def __add__(self, other: object) -> Sym | int:
        p = self.poly
        if type(other) is int:
            return Sym((p[0] + other, *p[1:]), self.trace) if other else self
        q = self._of(other)
        n = max(len(p), len(q))
        return self._new(_trim([(p[i] if i < len(p) else 0) + (q[i] if i < len(q) else 0)
                                for i in range(n)]))

    __radd__ = __add__

    def __neg__(self) -> Sym | int:
        return self._new(tuple(-c for c in self.poly))

    def __pos__(self) -> Sym:
        return self

    def __sub__(self, other: object) -> Sym | int:
        return self + (-Sym(self._of(other), self.trace))

    def __rsub__(self, other: object) -> Sym | int:
        return Sym(self._of(other), self.trace) + (-self)

    def __mul__(self, other: object) -> Sym | int:
        p = self.poly
        if type(other) is int:
            if not other:
                return 0
            if len(p) == 2:
                return Sym((p[0] * other, p[1] * other), self.trace)
            return Sym(tuple([c * other for c in p]), self.trace)
        q = self._of(other)
        out = [0] * (len(p) + len(q) - 1)
        for i, a in enumerate(p):
            if a:
                for j, b in enumerate(q):
                    out[i + j] += a * b
        return self._new(_trim(out))

    __rmul__ = __mul__

    def __floordiv__(self, other: object) -> Sym | int:
        p, q = self.poly, self._of(other)
        if len(q) == 1:  # by a number: exact where it divides every coefficient
            if q[0] == 0 or any(c % q[0] for c in p):
                raise Untraceable("a floor division that is not exact")
            return self._new(tuple(c // q[0] for c in p))
        # by a polynomial: exact where self is an integer multiple k of it (then k at
        # every value where `other` is not 0: a decision on its sign)
        k, r = divmod(p[-1], q[-1])
        if r or len(p) != len(q) or any(a != k * b for a, b in zip(p, q, strict=True)):
            raise Untraceable("a floor division that is not exact")
        if Sym(q, self.trace)._sign(0) == 0:
            raise Untraceable("a division by 0")
        return k

    def __rfloordiv__(self, other: object) -> Sym | int:
        return Sym(self._of(other), self.trace) // self

    # -- decisions: answered at x0, the interval narrowed ----------------------------------
    def _sign(self, other: object) -> int:
        p = self.poly
        if type(other) is int:
            return self.trace.keep((p[0] - other, *p[1:]))
        q = self._of(other)
        n = max(len(p), len(q))
        return self.trace.keep(_trim([(p[i] if i < len(p) else 0) - (q[i] if i < len(q) else 0)
                                      for i in range(n)]))

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        return self._sign(other) == 0

    def __ne__(self, other: object) -> bool:  # type: ignore[override]
        return self._sign(other) != 0

    def __lt__(self, other: object) -> bool:
        if type(other) is int:  # (inline: the generator's most frequent decision)
            p = self.poly
            key = (p[0] - other, *p[1:])
            return self.trace.keep(key) < 0
        return self._sign(other) < 0

    def __le__(self, other: object) -> bool:
        return self._sign(other) <= 0

    def __gt__(self, other: object) -> bool:
        return self._sign(other) > 0

    def __ge__(self, other: object) -> bool:
        return self._sign(other) >= 0

    def __bool__(self) -> bool:
        return self._sign(0) != 0

    def __abs__(self) -> Sym | int:
        return -self if self._sign(0) < 0 else self

    # -- what a trace does not follow ------------------------------------------------------
    def __hash__(self) -> int:
        raise Untraceable("a Sym hashed")

    def _refuse(self, *_: object) -> Any:
        raise Untraceable("an operation a trace does not follow")

    __index__ = __int__ = __float__ = __complex__ = __round__ = __trunc__ = _refuse
    __floor__ = __ceil__ = __str__ = __format__ = __bytes__ = _refuse
    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = _refuse
    __divmod__ = __rdivmod__ = __pow__ = __rpow__ = _refuse
    __lshift__ = __rlshift__ = __rshift__ = __rrshift__ = _refuse
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __invert__ = _refuse

    def __repr__(self) -> str:
        return f"Sym({self.poly}, x0={self.trace.x0})"


class Unread:
    """A plan field a function must not read: every use of it raises (`unread_by`)."""

    __slots__ = ()

    def _refuse(self, *_: object) -> Any:
        raise Untraceable("a field said unread was read")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = _refuse  # type: ignore[assignment]
    __index__ = __int__ = __float__ = __str__ = __repr__ = __format__ = __getattr__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __neg__ = _refuse
    __floordiv__ = __rfloordiv__ = __truediv__ = __rtruediv__ = __mod__ = __rmod__ = _refuse
    __pow__ = __rpow__ = __round__ = __trunc__ = __floor__ = __ceil__ = __abs__ = _refuse


def unread_by(fn: Callable[[Any], Any], plan: Any, fields: tuple[str, ...] = FIELDS) -> Any:
    """`fn(plan)` with `fields` Unread, or None where `fn` read one of them (or raised):
    a result that, computed so, is the same at every value of those fields."""
    try:
        return fn(plan.model_copy(update={f: Unread() for f in fields}))
    except Exception:  # noqa: BLE001  (an Unread used: by Python code or by C code)
        return None


class Traced:
    """A request sequence traced in `field` at the other field's value `other`, the same
    at every value of `field` where `trace` holds: each request's id and its size's
    coefficients (coefs[k][i]: request i's coefficient of x**k); `fixed`, the generator's
    other results (runs, phases...), and `sym_fields`, those that are sizes (host_peak).
    (A plain class, not a dataclass: this module is imported by every `plan`.)"""

    __slots__ = ("field", "other", "trace", "ids", "coefs", "fixed", "sym_fields")

    def __init__(self, field: str, other: int, trace: Trace, ids: list[int],
                 coefs: list[list[int]], fixed: dict[str, Any],
                 sym_fields: dict[str, tuple[int, ...]]) -> None:
        self.field, self.other, self.trace, self.ids = field, other, trace, ids
        self.coefs, self.fixed, self.sym_fields = coefs, fixed, sym_fields

    def sizes(self, x: int) -> list[int]:
        out = self.coefs[-1]
        for c in reversed(self.coefs[:-1]):
            out = list(map(add, c, map(mul, out, repeat(x))))
        return out


def _poly(v: object) -> tuple[int, ...]:
    if type(v) is Sym:
        return v.poly  # type: ignore[union-attr]
    if type(v) is int:
        return (v,)  # type: ignore[return-value]
    raise Untraceable(f"a request size of {type(v).__name__}")


def trace(generate: Callable[[Any], Any], plan: Any, field: str) -> Traced | None:
    """`generate(plan)` (a StepRequests) run once with `plan`'s `field` a Sym; None where
    the generator did what a trace does not follow (module docstring)."""
    x0 = getattr(plan, field)
    t = Trace(x0)
    sym_plan = plan.model_copy(update={field: Sym((0, 1), t)})
    try:
        gen = generate(sym_plan)
        polys = [_poly(size) for _, size in gen.requests]
        host = _poly(gen.host_peak)
    except Untraceable:
        return None
    except Exception:  # noqa: BLE001  (a Sym where an int is wanted: C code raising)
        return None
    degree = max(map(len, polys), default=1)
    coefs = [[p[k] if k < len(p) else 0 for p in polys] for k in range(degree)]
    other = "seq_len" if field == "batch_size" else "batch_size"
    return Traced(field, getattr(plan, other), t, [tid for tid, _ in gen.requests],
                  coefs, {"steps": gen.steps, "phases": gen.phases, "runs": gen.runs},
                  {"host_peak": host})


class _Family:
    """The traces of one plan (but its batch_size and seq_len), its last point, the
    fields a trace of it failed in (not tried again), and the count of points met that
    differ from the one before in one field only (`moves`)."""

    __slots__ = ("last", "traces", "untraceable", "moves")

    def __init__(self, last: tuple[int, int]) -> None:
        self.last = last
        self.traces: list[Traced] = []
        self.untraceable: set[str] = set()
        self.moves: dict[str, int] = {}


class StepCache:
    """Traces of the step requests of the plans met last (module docstring). `build`
    turns a trace read at a value into the generator's result type."""

    KEPT = 16  # plans (without batch and seq) kept; all dropped past it
    TRACES_KEPT = 8  # traces of one plan (decision regions), the oldest dropped past it

    def __init__(self, trace_after: int = 4) -> None:
        self.trace_after = trace_after
        self._families: dict[tuple[object, ...], tuple[object, _Family]] = {}
        self._lock = threading.Lock()
        self.counts = {"generated": 0, "traced": 0, "read": 0, "again": 0}
        # the last result, with its key, owner and point: a plan asked again at once at
        # the same point (compare asks its estimate, then its smallest GPU's required
        # bytes) gets the same object, which its readers only read. One, not one per
        # plan: keeping more costs a search (fit) more than it saves.
        self._made: tuple[tuple[object, ...], object, tuple[int, int], Any] | None = None

    def clear(self) -> None:
        with self._lock:
            self._families.clear()
            self._made = None

    def get(self, owner: object, key: tuple[object, ...], plan: Any,
            generate: Callable[[Any], Any], build: Callable[..., Any]) -> Any:
        """`generate(plan)`, or the same read from a trace. `owner` (the spec) must be the
        very object the family was made for (`key` holds its id)."""
        point = (plan.batch_size, plan.seq_len)
        with self._lock:
            hit = self._families.get(key)
            family = hit[1] if hit is not None and hit[0] is owner else None
            last = self._made
            if last is not None and last[1] is owner and last[2] == point and last[0] == key:
                self.counts["again"] += 1
                return last[3]
            read = None
            if family is not None:
                for tr in family.traces:
                    x = getattr(plan, tr.field)
                    other = point[1] if tr.field == "batch_size" else point[0]
                    if other == tr.other and x >= 1 and tr.trace.holds(x):
                        read = tr
                        break
            field = None
            if read is None and family is not None:
                if family.last[1] == point[1] and family.last[0] != point[0]:
                    field = "batch_size"
                elif family.last[0] == point[0] and family.last[1] != point[1]:
                    field = "seq_len"
                if field is not None:
                    family.moves[field] = family.moves.get(field, 0) + 1
                    if field in family.untraceable or family.moves[field] < self.trace_after:
                        field = None
            if family is None:
                if len(self._families) >= self.KEPT:
                    self._families.clear()
                family = _Family(point)
                self._families[key] = (owner, family)
            family.last = point
        if read is not None:
            self.counts["read"] += 1
        elif field is not None:
            made = trace(generate, plan, field)
            with self._lock:
                if made is None:
                    family.untraceable.add(field)
                else:
                    if len(family.traces) >= self.TRACES_KEPT:
                        del family.traces[0]
                    family.traces.append(made)
            if made is not None:
                self.counts["traced"] += 1
                read = made
        if read is not None:
            result = _read(read, plan, build)
        else:
            self.counts["generated"] += 1
            result = generate(plan)
        self._made = (key, owner, point, result)
        return result


def _read(tr: Traced, plan: Any, build: Callable[..., Any]) -> Any:
    """The generator's result at `plan` from the trace `tr` (lists copied: a caller may
    keep and extend them)."""
    x = getattr(plan, tr.field)
    fixed = {k: list(v) if isinstance(v, list) else v for k, v in tr.fixed.items()}
    return build(list(zip(tr.ids, tr.sizes(x), strict=True)), **fixed,
                 **{k: _at(p, x) for k, p in tr.sym_fields.items()})
