"""The step requests of a deep model from those of a 6-layer cut of it: decoder layers of
one shape make the same requests, so the cut's middle layer is repeated with renumbered
tensor ids instead of running the small autograd (program.step.Graph) through every
layer. The result is a `StepProgram`: blocks of requests, a block repeated with ids that
advance by a fixed stride, which `allocator.replay.replay_program` replays as the
sequence it stands for.

Graph marks whose requests are whose (`Graph.set_layer`, `StepRequests.runs`): each run
of requests belongs to one layer or to none (embedding, head, loss, the phases' edges). A
pass over the layers (the forward, the backward, releasing what the graph held, the
optimizer's state groups, zero_grad) is a sweep: one run per layer, in order or reversed.
In a cut of 6 layers, the first and last layer differ from the rest (the first forward
matmul makes the cuBLAS workspace, the first layer's input is the embedding output, the
last one's output goes to the head), and so may their neighbours, which refer to them.
Layers 2 and 3, whose neighbours are neither, must make the same requests, each referring
only to its own tensors or to those of the layer before or after it; layers 1 to 4 must
allocate the same sizes in the same order (so that a tensor of layer 1 or 4 has the index
it has in layer 2 or 3). The model of L layers is then layer 0, layer 1, L - 4 copies of
layer 2, layer 4 (as layer L - 2) and layer 5 (as layer L - 1) in every sweep. Ids are
numbered in the order they are allocated, from 1, as `canonical` numbers any request
sequence: a program equals the full generation when both read the same under `canonical`
(tests/memory/program/test_step_templates.py checks the catalog).

Where the cut does not show that shape (layers that differ, a reference past a
neighbouring layer, a middle layer's tensors used outside the sweeps), `template_program`
returns None and the full generation is used.

A search or a sweep estimates one plan at many batch sizes or lengths, whose cuts make the
same requests with other sizes (llama-3.1-8b, batch 1 to 64: three shapes): the shape of a
cut (everything but its sizes) is kept (`_SHAPES`), and a later cut with the same ids,
allocating requests, runs, phases and depth is read through it, its sizes checked for the
layers that must allocate alike (tests/memory/program/test_step_templates.py compares
with the program found afresh). A 6-layer cut of llama-3.1-8b: 4.1 ms found, 1.2 ms read
through a kept shape (2026-12-07, this 2-core machine, CPU time).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Sequence
from operator import add, itemgetter, sub

from vramcalc.memory.allocator.replay import COMPILED, RequestBlock, expand
from vramcalc.records import Frozen, Value

TEMPLATE_LAYERS = 6  # first, second, two middle ones, second to last, last
# the compiled pass over a cut's requests (`_tokens`), where the compiled replay is built
# (and has it: one built before it had not)
_OWNERS = getattr(COMPILED, "owners", None)


class StepProgram(Frozen):
    """Step requests as blocks (see RequestBlock) and the phases' starts in the sequence
    they stand for."""

    _fields = ("blocks", "phases", "length")
    blocks: list[RequestBlock]
    phases: list[tuple[str, int]]
    length: int

    def __init__(self, blocks: list[RequestBlock], phases: list[tuple[str, int]],
                 length: int) -> None:
        self.__dict__.update(blocks=blocks, phases=phases, length=length)

    def requests(self) -> list[tuple[int, int]]:
        """The (id, bytes) sequence the blocks stand for."""
        return expand(self.blocks)

    @classmethod
    def plain(cls, requests: Sequence[tuple[int, int]],
              phases: list[tuple[str, int]]) -> StepProgram:
        ids = array("q", (tid for tid, _ in requests))
        sizes = array("q", (size for _, size in requests))
        return cls([(ids, array("q", bytes(8 * len(ids))), sizes, 1)], phases, len(requests))


def canonical(requests: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`requests` with each tensor id replaced by its allocation's rank (from 1); sizes
    of 0 (free) and below (empty cache) keep their id's rank."""
    rank: dict[int, int] = {}
    out = []
    for tid, size in requests:
        if size > 0:
            rank[tid] = len(rank) + 1
        out.append((rank.get(tid, tid), size))
    return out


# A request of a run, as (key, offset): its tensor id is the first id of the run
# that `key` names plus `offset` (the tensor's index among that run's allocations). Keys:
#   _OWN                       the run's own (an allocation, bytes > 0)
#   run                        a run of no layer (run >= 0)
#   _LAYER + 3 * sweep + d + 1 layer (this one + d)'s run in a sweep, d in -1..1
#   _END + 2 * sweep + end     (from a run of no layer) the first (end 0) or last (end 1)
#                              layer's run in a sweep
_OWN = -1
_LAYER = 1 << 40
_END = 1 << 50


def _key(run: int, there: tuple[int, int] | None, here: tuple[int, int] | None,
         n: int) -> int | None:
    """The key (above) of a tensor of run `run`, at `there` (sweep, layer; None: of no
    layer), from a run at `here`; None where the template cannot follow it."""
    if there is None:
        return run
    if here is not None:
        d = there[1] - here[1]
        return _LAYER + 3 * there[0] + d + 1 if abs(d) <= 1 else None
    if there[1] in (0, n - 1):
        return _END + 2 * there[0] + int(there[1] == n - 1)
    return None


Block = tuple[int, "array[int]", "array[int] | None", int]  # (run, ids, strides, count)


class _Shape(Frozen):
    """What `template_program` finds in a cut but its sizes: the program's blocks as (run,
    ids, id strides or None, count), the sizes to come from the cut's run; the runs that
    must allocate alike (per sweep, layers 1 to TEMPLATE_LAYERS - 2, whose first two,
    layers 2 and 3, must make the same requests); the phases' starts and the length.
    `runs`: each block's (run, count), which is all `template_runs` reads; the blocks'
    ids are made on first use (`make_blocks`, then dropped): program.step.requested_peak
    (check's suggestions, the searches) reads a new cut's runs and never its ids, 1.2 of
    the 2.9 ms `_shape` took for llama-3.1-8b's cut (2026-12-08, cProfile)."""

    _fields = ("spans", "blocks", "alike", "phases", "length")
    spans: list[tuple[int, int, int]]  # run -> (layer, first request, end)
    runs: list[tuple[int, int]]
    alike: list[list[int]]
    phases: list[tuple[str, int]]
    length: int

    def __init__(self, spans: list[tuple[int, int, int]], runs: list[tuple[int, int]],
                 make_blocks: Callable[[], list[Block]], alike: list[list[int]],
                 phases: list[tuple[str, int]], length: int) -> None:
        self.__dict__.update(spans=spans, runs=runs, _blocks=None, _make=make_blocks,
                             alike=alike, phases=phases, length=length)

    @property
    def blocks(self) -> list[Block]:
        made: list[Block] | None = self.__dict__["_blocks"]
        if made is None:
            made = self.__dict__["_blocks"] = self.__dict__["_make"]()
            self.__dict__["_make"] = None  # (its closure holds the cut's tokens)
        return made


# The shapes of the cuts seen last: a search or a sweep estimates one plan at many batch
# sizes or lengths, whose cuts make the same requests of other sizes. A shape depends on
# the ids, on which requests allocate, on the runs, the phases and the depth (module
# docstring): looked up by the last three and the count of requests, it is used where the
# ids and the allocating requests are those of the cut it was found in (`_signature`);
# the sizes are checked (layers alike) and read anew for each cut.
_SHAPES: dict[tuple[object, ...], _Seen] = {}
_SHAPES_KEPT = 8
_ID, _SIZE = itemgetter(0), itemgetter(1)


class _Seen(Value):
    _fields = ("shape", "signature")
    shape: _Shape
    signature: tuple[int, ...]

    def __init__(self, shape: _Shape, signature: tuple[int, ...]) -> None:
        self.shape = shape
        self.signature = signature


def _signature(requests: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The ids of the requests, which tell which of them allocate too: an id's first
    request allocates it (Graph numbers each tensor once and frees it after). One tuple
    of ints is kept in _SHAPES, not the cut's 10,682 request tuples (llama-3.1-8b),
    which cost its estimate a collection of 0.5 ms after program.step._collector_paused
    (2026-12-07)."""
    return tuple(map(_ID, requests))


def template_program(requests: Sequence[tuple[int, int]], phases: list[tuple[str, int]],
                     runs: list[tuple[int, int]], layers: int) -> StepProgram | None:
    """The program of a model of `layers` layers from the requests, phases and runs
    (StepRequests) of its TEMPLATE_LAYERS-layer cut; None where the cut's layers do not
    repeat (module docstring)."""
    found = _found(requests, phases, runs, layers)
    return None if found is None else _program(*found)


def template_runs(requests: Sequence[tuple[int, int]], phases: list[tuple[str, int]],
                  runs: list[tuple[int, int]], layers: int
                  ) -> list[tuple[int, int, int]] | None:
    """The sequence `template_program` stands for, as spans of the cut's requests: (first
    request, end, count), the span run `count` times in a row (the middle layer's copies:
    the same requests with ids that advance by a stride); None where `template_program`
    is None. What depends only on the sizes and on which tensor each request frees
    (program.step.requested_peak) reads it without building the program."""
    found = _found(requests, phases, runs, layers)
    if found is None:
        return None
    spans = found[0].spans
    return [(spans[k][1], spans[k][2], count) for k, count in found[0].runs]


def _found(requests: Sequence[tuple[int, int]], phases: list[tuple[str, int]],
           runs: list[tuple[int, int]], layers: int) -> tuple[_Shape, tuple[int, ...]] | None:
    """The shape of the cut's program (kept in `_SHAPES`) and the cut's sizes; None where
    the cut's layers do not repeat, or those that must allocate alike do not."""
    if layers <= TEMPLATE_LAYERS:
        return None
    sizes = tuple(map(_SIZE, requests))
    if sizes and min(sizes) < 0:  # an empty_cache: not followed (`_shape`)
        return None
    key = (layers, tuple(runs), tuple(phases), len(requests))
    seen = _SHAPES.get(key)
    signature = _signature(requests)
    if seen is not None and signature == seen.signature:
        shape = seen.shape
    else:
        found = _shape(requests, phases, runs, layers)
        if found is None:
            return None
        shape = found
        if len(_SHAPES) >= _SHAPES_KEPT:
            _SHAPES.clear()
        _SHAPES[key] = _Seen(shape, signature)
    return (shape, sizes) if _alike(shape, sizes) else None


def _alike(shape: _Shape, sizes: Sequence[int]) -> bool:
    """Whether the layers that must allocate alike do with the cut's `sizes`."""
    spans = shape.spans
    for alike in shape.alike:
        # (sizes >= 0 here, template_program: the allocations are the sizes not 0)
        allocs = [list(filter(None, sizes[spans[k][1]:spans[k][2]])) for k in alike]
        if any(a != allocs[0] for a in allocs):
            return False
        (_, lo2, hi2), (_, lo3, hi3) = spans[alike[1]], spans[alike[2]]
        if sizes[lo2:hi2] != sizes[lo3:hi3]:
            return False
    return True


def _program(shape: _Shape, sizes: Sequence[int]) -> StepProgram:
    """The program of `shape` with the cut's `sizes` (`_alike`)."""
    spans = shape.spans
    run_sizes: dict[int, array[int]] = {}
    zeros: dict[int, array[int]] = {}
    blocks: list[RequestBlock] = []
    for k, row, stride, count in shape.blocks:
        if k not in run_sizes:
            _, lo, hi = spans[k]
            run_sizes[k] = array("q", sizes[lo:hi])
            zeros[k] = array("q", bytes(8 * (hi - lo)))
        blocks.append((row, zeros[k] if stride is None else stride, run_sizes[k], count))
    return StepProgram(blocks, shape.phases, shape.length)


def _shape(requests: Sequence[tuple[int, int]], phases: list[tuple[str, int]],
           runs: list[tuple[int, int]], layers: int) -> _Shape | None:
    """The shape (`_Shape`) of the cut's program, its sizes aside; None where the cut's
    layers do not repeat, whatever their sizes."""
    n = TEMPLATE_LAYERS
    bounds = [*runs, (-2, len(requests))]
    spans = [(layer, lo, hi) for (layer, lo), (_, hi) in itertools.pairwise(bounds)]
    # sweeps: maximal stretches of layer runs
    sweep_of: list[tuple[int, int] | None] = []  # run -> (sweep, layer) or None
    sweeps: list[list[int]] = []  # sweep -> its runs, in order
    for k, (layer, _, _) in enumerate(spans):
        if layer < 0:
            sweep_of.append(None)
            continue
        if k == 0 or spans[k - 1][0] < 0:
            sweeps.append([])
        sweeps[-1].append(k)
        sweep_of.append((len(sweeps) - 1, layer))
    for sw in sweeps:
        layer_order = [spans[k][0] for k in sw]
        if layer_order != list(range(n)) and layer_order != list(range(n - 1, -1, -1)):
            return None
    found = _tokens(requests, spans, sweep_of, n)
    if found is None:
        return None
    tokens, counts = found
    by_layer = [{spans[k][0]: k for k in sw} for sw in sweeps]
    # layers 1 to n - 2 allocate as many tensors (their sizes: `_program`), and layers 2
    # and 3 make the same requests
    alike = [[runs_of[j] for j in range(1, n - 1)] for runs_of in by_layer]
    for ks in alike:
        if len({counts[k] for k in ks}) > 1 or tokens[ks[1]] != tokens[ks[2]]:
            return None

    ends = {0: 0, 1: 1, layers - 2: n - 2, layers - 1: n - 1}

    def template(i: int) -> int:  # instance i of a sweep -> the cut's layer it repeats
        return ends.get(i, 2)

    def order(w: int) -> range:  # a sweep's layers in the order it runs them
        return range(layers) if spans[sweeps[w][0]][0] == 0 else range(layers - 1, -1, -1)

    # the first id of every run of no layer and of every layer of every sweep
    run_base: dict[int, int] = {}
    sweep_base: list[list[int]] = [[0] * layers for _ in sweeps]
    next_id = 1
    for k, here in enumerate(sweep_of):
        if here is None:
            run_base[k] = next_id
            next_id += counts[k]
        elif k == sweeps[here[0]][0]:
            w = here[0]
            # (the counts of the cut's layers looked up once: a loop over every layer of a
            # deep model, 126 in llama-3.1-405b's sweeps)
            count_of = [counts[by_layer[w][j]] for j in range(n)]
            base = sweep_base[w]
            for i in order(w):
                base[i] = next_id
                next_id += count_of[ends.get(i, 2)]

    keys_of: dict[int, set[int]] = {}  # run -> the keys its tokens use, but _OWN

    def ids(k: int, own: int, i: int) -> array[int]:
        """Run k's ids as the run of layer i (of no layer: i unused) starting at `own`."""
        if k not in keys_of:
            keys_of[k] = set(tokens[k][0]) - {_OWN}
        bases = {_OWN: own}
        for key in keys_of[k]:
            if key < _LAYER:
                bases[key] = run_base[key]
            elif key < _END:
                w, d = divmod(key - _LAYER, 3)
                bases[key] = sweep_base[w][i + d - 1]
            else:
                w, end = divmod(key - _END, 2)
                bases[key] = sweep_base[w][layers - 1 if end else 0]
        return array("q", list(map(add, map(bases.__getitem__, tokens[k][0]), tokens[k][1])))

    # each block: (run, the first id of its (first) copy, the layer it stands for, the
    # first id and layer of the second copy where the middle copies advance by a stride,
    # count); its ids are made by `make_blocks`
    layout: list[tuple[int, int, int, tuple[int, int] | None, int]] = []
    starts: dict[int, int] = {}  # run of no layer -> its start in the program
    length = 0
    for k, here in enumerate(sweep_of):
        if here is None:
            starts[k] = length
            layout.append((k, run_base[k], 0, None, 1))
            length += len(tokens[k][0])
            continue
        w = here[0]
        if k != sweeps[w][0]:
            continue
        # the order's first two and last two layers are the ends (`template`, layers >
        # TEMPLATE_LAYERS), and the middle copies are one block, at the first of them
        ordered = order(w)
        middle = ordered[2:-2]
        for i in (*ordered[:2], middle[0], *ordered[-2:]):
            tk = by_layer[w][template(i)]
            if template(i) != 2:
                layout.append((tk, sweep_base[w][i], i, None, 1))
                length += len(tokens[tk][0])
            elif i == middle[0]:
                # the middle copies refer to layers 1 to L - 2, which all allocate as
                # many tensors: every id advances by the same stride from one to the next
                second = ((sweep_base[w][middle[1]], middle[1]) if len(middle) > 1
                          else None)
                layout.append((tk, sweep_base[w][i], i, second, len(middle)))
                length += len(tokens[tk][0]) * len(middle)
    run_at = {}
    for k, (layer, lo, _) in enumerate(spans):
        if layer < 0:
            run_at[lo] = k  # the last run of no layer starting there
    try:
        new_phases = [(name, starts[run_at[p]]) for name, p in phases]
    except KeyError:
        return None

    def make_blocks() -> list[Block]:
        blocks: list[Block] = []
        for k, own, i, second, count in layout:
            first = ids(k, own, i)
            stride = None if second is None else array("q", map(sub, ids(k, *second), first))
            blocks.append((k, first, stride, count))
        return blocks

    return _Shape(spans, [(k, count) for k, _, _, _, count in layout], make_blocks, alike,
                  new_phases, length)


# A run's tokens: the keys and the offsets of its requests (two lists: `ids` adds them in
# C, map over map)
_Tokens = tuple[list[int], list[int]]


def _tokens(requests: Sequence[tuple[int, int]], spans: list[tuple[int, int, int]],
            sweep_of: list[tuple[int, int] | None], n: int
            ) -> tuple[list[_Tokens], list[int]] | None:
    """The tokens (key, offset) of every run and the count of its allocations; None where
    a request refers to a tensor no request before it allocated, or one the template
    cannot follow (`_key`). The compiled replay finds each request's owner (`owners` in
    allocator/_replay.c: llama-3.1-8b's cut, 10,682 requests, 0.6 ms where the loop of
    `_tokens_python` takes 2.0 ms, 2026-12-07); both give the same tokens
    (tests/memory/program/test_step_templates.py)."""
    found = None if _OWNERS is None else _OWNERS(requests, [lo for _, lo, _ in spans])
    if found is None:
        return _tokens_python(requests, spans, sweep_of, n)
    owner_runs, owner_offs = array("q"), array("q")
    owner_runs.frombytes(found[0])
    owner_offs.frombytes(found[1])
    tokens: list[_Tokens] = []
    counts: list[int] = []
    for k, (_, lo, hi) in enumerate(spans):
        here = sweep_of[k]
        runs = owner_runs[lo:hi]
        keys: dict[int, int] = {}  # owner run (-2: the run's own allocation) -> its key
        for ok in set(runs):
            key = _OWN if ok == -2 else None if ok < 0 else _key(ok, sweep_of[ok], here, n)
            if key is None:
                return None
            keys[ok] = key
        tokens.append((list(map(keys.__getitem__, runs)), owner_offs[lo:hi].tolist()))
        counts.append(runs.count(-2))
    return tokens, counts


def _tokens_python(requests: Sequence[tuple[int, int]], spans: list[tuple[int, int, int]],
                   sweep_of: list[tuple[int, int] | None], n: int
                   ) -> tuple[list[_Tokens], list[int]] | None:
    """`_tokens` without the compiled replay."""
    # the owner (run, offset) of every tensor id
    owner: dict[int, tuple[int, int]] = {}
    tokens: list[_Tokens] = []
    counts: list[int] = []
    for k, (_, lo, hi) in enumerate(spans):
        here = sweep_of[k]
        run_keys: list[int] = []
        run_offs: list[int] = []
        add_key, add_off = run_keys.append, run_offs.append
        keys: dict[int, int | None] = {}  # owner run -> its key from here
        local = 0
        for tid, size in requests[lo:hi]:
            if size > 0:
                owner[tid] = (k, local)
                add_key(_OWN)
                add_off(local)
                local += 1
                continue
            found = owner.get(tid) if size == 0 else None
            if found is None:
                return None
            ok, off = found
            if ok not in keys:
                keys[ok] = _key(ok, sweep_of[ok], here, n)
            key = keys[ok]
            if key is None:
                return None
            add_key(key)
            add_off(off)
        tokens.append((run_keys, run_offs))
        counts.append(local)
    return tokens, counts
