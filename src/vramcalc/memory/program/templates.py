"""The step requests of a deep model from those of a 6-layer cut of it: decoder layers of
one shape make the same requests, so the cut's middle layer is repeated with renumbered
tensor ids instead of running the small autograd (step_requests.Graph) through every
layer. The result is a `StepProgram`: blocks of requests, a block repeated with ids that
advance by a fixed stride, which `allocator_replay.replay_program` replays as the
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
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from vramcalc.memory.allocator.replay import RequestBlock, expand

TEMPLATE_LAYERS = 6  # first, second, two middle ones, second to last, last


@dataclass(frozen=True)
class StepProgram:
    """Step requests as blocks (see RequestBlock) and the phases' starts in the sequence
    they stand for."""

    blocks: list[RequestBlock]
    phases: list[tuple[str, int]]
    length: int

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


# A request of a run, as (key, offset, bytes): its tensor id is the first id of the run
# that `key` names plus `offset` (the tensor's index among that run's allocations). Keys:
#   _OWN                       the run's own (an allocation, bytes > 0)
#   run                        a run of no layer (run >= 0)
#   _LAYER + 3 * sweep + d + 1 layer (this one + d)'s run in a sweep, d in -1..1
#   _END + 2 * sweep + end     (from a run of no layer) the first (end 0) or last (end 1)
#                              layer's run in a sweep
Token = tuple[int, int, int]
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


def template_program(requests: Sequence[tuple[int, int]], phases: list[tuple[str, int]],
                     runs: list[tuple[int, int]], layers: int) -> StepProgram | None:
    """The program of a model of `layers` layers from the requests, phases and runs
    (StepRequests) of its TEMPLATE_LAYERS-layer cut; None where the cut's layers do not
    repeat (module docstring)."""
    n = TEMPLATE_LAYERS
    if layers <= n:
        return None
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
    # the tokens of every run; the owner (run, offset) of every tensor id
    owner: dict[int, tuple[int, int]] = {}
    tokens: list[list[Token]] = []
    counts: list[int] = []
    for k, (_, lo, hi) in enumerate(spans):
        here = sweep_of[k]
        toks: list[Token] = []
        append = toks.append
        keys: dict[int, int | None] = {}  # owner run -> its key from here
        local = 0
        for tid, size in requests[lo:hi]:
            if size > 0:
                owner[tid] = (k, local)
                append((_OWN, local, size))
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
            append((key, off, 0))
        tokens.append(toks)
        counts.append(local)
    by_layer = [{spans[k][0]: k for k in sw} for sw in sweeps]
    for runs_of in by_layer:
        allocs = [[t for t in tokens[runs_of[j]] if t[0] == _OWN] for j in range(1, n - 1)]
        if any(a != allocs[0] for a in allocs) or tokens[runs_of[2]] != tokens[runs_of[3]]:
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
            for i in order(w):
                sweep_base[w][i] = next_id
                next_id += counts[by_layer[w][template(i)]]

    keys_of: dict[int, set[int]] = {}  # run -> the keys its tokens use, but _OWN

    def ids(k: int, own: int, i: int) -> array[int]:
        """Run k's ids as the run of layer i (of no layer: i unused) starting at `own`."""
        if k not in keys_of:
            keys_of[k] = {key for key, _, _ in tokens[k]} - {_OWN}
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
        return array("q", [bases[key] + off for key, off, _ in tokens[k]])

    sizes: dict[int, array[int]] = {}
    zeros: dict[int, array[int]] = {}

    def block(k: int, row: array[int], stride: array[int] | None = None, count: int = 1) -> None:
        if k not in sizes:
            sizes[k] = array("q", [size for _, _, size in tokens[k]])
            zeros[k] = array("q", bytes(8 * len(tokens[k])))
        blocks.append((row, zeros[k] if stride is None else stride, sizes[k], count))

    blocks: list[RequestBlock] = []
    starts: dict[int, int] = {}  # run of no layer -> its start in the program
    length = 0
    for k, here in enumerate(sweep_of):
        if here is None:
            starts[k] = length
            block(k, ids(k, run_base[k], 0))
            length += len(tokens[k])
            continue
        w = here[0]
        if k != sweeps[w][0]:
            continue
        middle = [i for i in order(w) if template(i) == 2]
        for i in order(w):
            tk = by_layer[w][template(i)]
            if template(i) != 2:
                block(tk, ids(tk, sweep_base[w][i], i))
                length += len(tokens[tk])
            elif i == middle[0]:
                # the middle copies refer to layers 1 to L - 2, which all allocate as
                # many tensors: every id advances by the same stride from one to the next
                first = ids(tk, sweep_base[w][i], i)
                stride = None
                if len(middle) > 1:
                    second = ids(tk, sweep_base[w][middle[1]], middle[1])
                    stride = array("q", [b - a for a, b in zip(first, second, strict=True)])
                block(tk, first, stride, len(middle))
                length += len(tokens[tk]) * len(middle)
    run_at = {}
    for k, (layer, lo, _) in enumerate(spans):
        if layer < 0:
            run_at[lo] = k  # the last run of no layer starting there
    try:
        new_phases = [(name, starts[run_at[p]]) for name, p in phases]
    except KeyError:
        return None
    return StepProgram(blocks, new_phases, length)
