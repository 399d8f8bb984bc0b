"""PyTorch's CUDA caching allocator, replayed on a sequence of requests: reserved memory
(what NVML sees of torch) from the order and sizes of allocations and frees.

The rules are those of `c10/cuda/CUDACachingAllocator.cpp` (torch 2.11-2.13,
`DeviceCachingAllocator`):
- every request is rounded up to 512 bytes (`round_size`, kMinBlockSize);
- requests of at most 1 MiB (kSmallSize) come from the small pool, the rest from the
  large pool (`get_pool`); each pool keeps its free blocks per stream;
- a request takes the smallest free block of its pool and stream that holds it, the lowest
  address among equal sizes (`get_free_block`: `lower_bound` under BlockComparatorSize =
  (stream, size, address));
- with none, a new segment (`alloc_block`, cudaMalloc) of `get_allocation_size`: 2 MiB
  (kSmallBuffer) for small requests, 20 MiB (kLargeBuffer) for 1-10 MiB ones, else the
  request rounded up to 2 MiB (kRoundLarge);
- the block is split when the rest is worth keeping (`should_split`): >= 512 bytes in the
  small pool, > 1 MiB in the large pool; the request takes the front;
- a freed block merges with its free neighbours of the same segment (`free_block`,
  `try_merge_blocks`) and goes back to its pool; segments are never given back to CUDA
  unless a request fails (out of memory) or `empty_cache` is called, neither of which is
  replayed here, so reserved only grows;
- `expandable_segments:True` (Note [Expandable Segments]): one segment per pool and stream
  that grows at its end in pages of 20 MiB (large pool) or 2 MiB (small pool); a request
  that no free block holds maps the pages it needs past the free block at the end (if
  any, `try_allocate_expandable_block`); every split is allowed (`should_split`:
  remaining >= 512); in the best-fit search the free block at the end counts as the size
  it could grow to, so any other block that holds the request is taken first.
`max_split_size_mb`, `roundup_power2_divisions` and `garbage_collection_threshold` are
left at their defaults (off).

Pure Python, no torch. `replay_trace` replays a recorded trace (calibrate/trace.py
`compact_trace`) as a check of these rules against the GPU. `replay_program` replays the
load-and-steps program of an estimate (program.step.program_peaks), here or in the
compiled extension `vramcalc.memory.allocator._replay`
(src/vramcalc/memory/allocator/_replay.c, the same rules for one stream) where it was
built: `ENGINE` says which runs by default.
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, Literal

from vramcalc.records import Frozen
from vramcalc.units import MiB

MIN_BLOCK = 512
SMALL_SIZE = MiB
SMALL_BUFFER = 2 * MiB
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB
# address space between simulated segments (any gap keeps them apart)
_SEGMENT_GAP = 1 << 40


def round_size(size: int) -> int:
    """c10 `round_size` without roundup_power2_divisions."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)


def allocation_size(size: int) -> int:
    """c10 `get_allocation_size`: the cudaMalloc size for a (rounded) request no free
    block holds."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


class Block:
    """A block of a segment: its address range, whether a tensor holds it, and its
    neighbours in the segment (an expandable segment's chain includes unmapped space)."""

    __slots__ = ("addr", "size", "small", "stream", "allocated", "mapped", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool, stream: int,
                 allocated: bool = False, mapped: bool = True) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.stream = stream
        self.allocated = allocated
        self.mapped = mapped  # False: unmapped address space of an expandable segment
        self.prev: Block | None = None
        self.next: Block | None = None


# a pool orders its free blocks by (size, address) as one int: size << _ADDR_BITS | addr
# (addresses, simulated or a trace's CUDA ones, stay below 2**64)
_ADDR_BITS = 64


class _Pool:
    """Free mapped blocks of one pool and stream, sorted by (size, address)."""

    __slots__ = ("keys", "blocks")

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.blocks: dict[int, Block] = {}

    def add(self, b: Block) -> None:
        key = b.size << _ADDR_BITS | b.addr
        bisect.insort(self.keys, key)
        self.blocks[key] = b

    def remove(self, b: Block) -> None:
        key = b.size << _ADDR_BITS | b.addr
        if self.blocks.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def best_fit(self, size: int, expandable: bool) -> Block | None:
        keys = self.keys
        i = bisect.bisect_left(keys, size << _ADDR_BITS)
        if i >= len(keys):
            return None
        b = self.blocks[keys[i]]
        if expandable:
            # a block followed by unmapped space counts as the size it could grow to; the
            # search walks on while the next candidate's such size is smaller
            # (get_free_block's expandable_size loop)
            while i + 1 < len(keys):
                nxt = self.blocks[keys[i + 1]]
                if _expandable_size(nxt) < _expandable_size(b):
                    b, i = nxt, i + 1
                else:
                    break
        return b


def _expandable_size(b: Block) -> int:
    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)


# the unmapped address space after an expandable segment's last page: room for anything
_UNBOUNDED = 1 << 50


class CachingAllocator:
    """One device's caching allocator; `malloc` returns a block, `free` takes it back."""

    def __init__(self, expandable: bool = False, descending: bool = False) -> None:
        self.expandable = expandable
        # new segments at ever lower addresses (`descending`) or ever higher ones: where
        # free blocks of one size tie, best fit takes the lowest address (c10
        # CUDACachingAllocator.cpp BlockComparatorSize), so the newest segment's block
        # (descending) or the oldest one's
        self.descending = descending
        self.pools: dict[tuple[bool, int], _Pool] = {}
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0
        self.segments = 0  # cudaMalloc'd segments, or map calls of expandable ones
        self.next_segment_addr: int | None = None  # replay: the address CUDA gave next
        self._next_addr = _SEGMENT_GAP
        self._next_down = 1 << (_ADDR_BITS - 1)
        # expandable: the first block of each (small, stream) segment's chain
        self._chains: dict[tuple[bool, int], Block] = {}

    def _pool(self, small: bool, stream: int) -> _Pool:
        pool = self.pools.get((small, stream))
        if pool is None:
            pool = self.pools[(small, stream)] = _Pool()
        return pool

    def _address(self, size: int) -> int:
        if self.next_segment_addr is not None:
            addr, self.next_segment_addr = self.next_segment_addr, None
            return addr
        if self.descending:
            self._next_down -= _SEGMENT_GAP + size
            assert self._next_down > 0
            return self._next_down
        addr = self._next_addr
        self._next_addr += _SEGMENT_GAP + size
        assert self._next_addr < 1 << _ADDR_BITS
        return addr

    def _grow(self, size: int) -> None:
        self.reserved += size
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    # -- expandable segments ----------------------------------------------------------
    def _chain(self, small: bool, stream: int) -> Block:
        key = (small, stream)
        if key not in self._chains:
            self._chains[key] = Block(self._address(_UNBOUNDED), _UNBOUNDED, small, stream,
                                      mapped=False)
        return self._chains[key]

    def _map(self, b: Block, size: int) -> Block:
        """Map the first `size` bytes (rounded up to pages) of unmapped block `b`; the
        mapped part becomes a free block merged with its free neighbours (map_block)."""
        page = SMALL_BUFFER if b.small else LARGE_BUFFER
        size = min(b.size, page * ((size + page - 1) // page))
        if size < b.size:
            rest = Block(b.addr + size, b.size - size, b.small, b.stream, mapped=False)
            self._relink(b, [b, rest])
            b.size = size
        b.mapped = True
        self.segments += 1
        self._grow(size)
        return self._merge(b)

    def _expand(self, size: int, small: bool, stream: int) -> Block:
        """find_expandable_block + try_allocate_expandable_block: the lowest-address run of
        unmapped and free blocks with room for `size`, mapped as needed; returns the free
        block that holds `size`, out of the pool."""
        pool = self._pool(small, stream)
        b: Block | None = self._chain(small, stream)
        while b is not None:
            free_mapped = b.mapped and not b.allocated
            if not b.mapped:
                room = b.size + (b.next.size if b.next is not None and b.next.mapped
                                 and not b.next.allocated else 0)
            elif free_mapped and b.next is not None and not b.next.mapped:
                room = b.size + b.next.size
            else:
                room = 0
            if room >= size:
                break
            b = b.next
        assert b is not None  # the chain ends in unbounded unmapped space
        if not b.mapped:
            b = self._map(b, min(b.size, size))
        while b.size < size:  # free -> unmapped: map the rest and merge
            assert b.next is not None and not b.next.mapped
            b = self._map(b.next, size - b.size)
        pool.remove(b)
        return b

    def _absorb(self, b: Block, other: Block) -> None:
        """Splice neighbour `other` into `b` (one address range, one chain link less)."""
        if other is b.prev:
            b.addr, b.prev = other.addr, other.prev
            if other.prev is not None:
                other.prev.next = b
            elif self._chains.get((b.small, b.stream)) is other:
                self._chains[(b.small, b.stream)] = b
        else:
            b.next = other.next
            if other.next is not None:
                other.next.prev = b
        b.size += other.size

    def _merge(self, b: Block) -> Block:
        """Merge free mapped block `b` with its free mapped neighbours; into the pool."""
        pool = self._pool(b.small, b.stream)
        other = b.prev
        if other is not None and not other.allocated and other.mapped:
            pool.remove(other)
            self._absorb(b, other)
        other = b.next
        if other is not None and not other.allocated and other.mapped:
            pool.remove(other)
            self._absorb(b, other)
        pool.add(b)
        return b

    # -- the allocator's interface ----------------------------------------------------
    def malloc(self, size: int, stream: int = 0) -> Block:
        size = MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK
        small = size <= SMALL_SIZE
        pool = self.pools.get((small, stream)) or self._pool(small, stream)
        if self.expandable:
            b = pool.best_fit(size, True)
            if b is not None:
                pool.remove(b)
            else:
                b = self._expand(size, small, stream)
            split = b.size - size >= MIN_BLOCK
        else:
            keys = pool.keys
            i = bisect.bisect_left(keys, size << _ADDR_BITS)
            if i < len(keys):
                b = pool.blocks.pop(keys.pop(i))
            else:
                seg = allocation_size(size)
                b = Block(self._address(seg), seg, small, stream)
                self.segments += 1
                self._grow(seg)
            split = b.size - size >= MIN_BLOCK if small else b.size - size > SMALL_SIZE
        if split:
            # the request takes the front; the rest stays free (c10 alloc_found_block)
            r = Block(b.addr + size, b.size - size, small, stream)
            nxt = r.next = b.next
            if nxt is not None:
                nxt.prev = r
            r.prev = b
            b.next = r
            b.size = size
            pool.add(r)
        b.allocated = True
        self.allocated += b.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return b

    def free(self, b: Block) -> None:
        if not b.allocated:
            raise ValueError("block freed twice")
        b.allocated = False
        self.allocated -= b.size
        self._merge(b)

    def empty_cache(self) -> None:
        """`torch.cuda.empty_cache()` (release_cached_blocks): every segment with no block
        in use goes back to CUDA; an expandable segment unmaps the whole pages inside its
        free blocks (release_blocks -> unmap_block)."""
        for (small, stream), pool in self.pools.items():
            for key in list(pool.keys):
                b = pool.blocks[key]
                if not self.expandable:
                    if b.prev is None and b.next is None:
                        pool.remove(b)
                        self.reserved -= b.size
                    continue
                page = SMALL_BUFFER if small else LARGE_BUFFER
                base = self._chain(small, stream).addr
                lo = base + page * ((b.addr - base + page - 1) // page)
                hi = base + page * ((b.addr + b.size - base) // page)
                if hi <= lo:
                    continue
                pool.remove(b)
                pieces = []
                if lo > b.addr:
                    pieces.append(Block(b.addr, lo - b.addr, small, stream))
                gap = Block(lo, hi - lo, small, stream, mapped=False)
                pieces.append(gap)
                if hi < b.addr + b.size:
                    pieces.append(Block(hi, b.addr + b.size - hi, small, stream))
                self._relink(b, pieces)
                for p in pieces:
                    if p.mapped:
                        pool.add(p)
                self.reserved -= hi - lo
                self._merge_unmapped(gap)

    def _relink(self, old: Block, pieces: list[Block]) -> None:
        """Put `pieces` (in address order) where `old` was in its chain."""
        pieces[0].prev = old.prev
        if old.prev is not None:
            old.prev.next = pieces[0]
        elif self._chains.get((old.small, old.stream)) is old:
            self._chains[(old.small, old.stream)] = pieces[0]
        pieces[-1].next = old.next
        if old.next is not None:
            old.next.prev = pieces[-1]
        for a, c in zip(pieces, pieces[1:], strict=False):
            a.next, c.prev = c, a

    def _merge_unmapped(self, b: Block) -> None:
        for other in (b.prev, b.next):
            if other is not None and not other.mapped:
                self._absorb(b, other)

    def place(self, ranges: list[tuple[int, int]], small: bool, stream: int = 0) -> None:
        """Start from existing segments (a trace's state before its first event): each
        (address, size) range a cudaMalloc segment, or with expandable segments the mapped
        ranges of the pool's one segment (gaps between them unmapped)."""
        ranges = sorted(ranges)
        if not self.expandable:
            for addr, size in ranges:
                self._grow(size)
                self._pool(small, stream).add(Block(addr, size, small, stream))
            return
        if not ranges:
            return
        blocks: list[Block] = []
        for addr, size in ranges:
            if blocks and blocks[-1].addr + blocks[-1].size < addr:
                gap = blocks[-1].addr + blocks[-1].size
                blocks.append(Block(gap, addr - gap, small, stream, mapped=False))
            blocks.append(Block(addr, size, small, stream))
            self._grow(size)
        end = blocks[-1].addr + blocks[-1].size
        blocks.append(Block(end, _UNBOUNDED, small, stream, mapped=False))
        for a, c in zip(blocks, blocks[1:], strict=False):
            a.next, c.prev = c, a
        self._chains[(small, stream)] = blocks[0]
        for b in blocks:
            if b.mapped:
                self._pool(small, stream).add(b)

    def occupy(self, addr: int, size: int) -> Block | None:
        """Mark [addr, addr + size) of a placed segment as allocated (a block live before
        the trace); returns the block, or None if no free block covers it."""
        for pool in self.pools.values():
            for key in list(pool.keys):
                f = pool.blocks[key]
                if not (f.addr <= addr and addr + size <= f.addr + f.size):
                    continue
                pool.remove(f)
                pieces = []
                if addr > f.addr:
                    pieces.append(Block(f.addr, addr - f.addr, f.small, f.stream))
                mid = Block(addr, size, f.small, f.stream, allocated=True)
                pieces.append(mid)
                end = f.addr + f.size
                if addr + size < end:
                    pieces.append(Block(addr + size, end - addr - size, f.small, f.stream))
                self._relink(f, pieces)
                for p in pieces:
                    if not p.allocated:
                        pool.add(p)
                self.allocated += size
                self.peak_allocated = max(self.peak_allocated, self.allocated)
                return mid
        return None


class ReplayResult(Frozen):
    """A replay against the trace it came from."""

    _fields = ("events", "measured_reserved_end", "replayed_reserved_end",
               "measured_peak_allocated", "replayed_peak_allocated", "unmatched_frees")
    events: int
    measured_reserved_end: int
    replayed_reserved_end: int
    measured_peak_allocated: int
    replayed_peak_allocated: int
    unmatched_frees: int

    def __init__(self, events: int, measured_reserved_end: int, replayed_reserved_end: int,
                 measured_peak_allocated: int, replayed_peak_allocated: int,
                 unmatched_frees: int) -> None:
        self.__dict__.update(
            events=events, measured_reserved_end=measured_reserved_end,
            replayed_reserved_end=replayed_reserved_end,
            measured_peak_allocated=measured_peak_allocated,
            replayed_peak_allocated=replayed_peak_allocated, unmatched_frees=unmatched_frees)


def replay_trace(trace: dict[str, Any], expandable: bool | None = None,
                 addresses: bool = True) -> ReplayResult:
    """Replay a `compact_trace`: start from its segments and blocks as they were before
    the first event (every event undone from the final state), then apply its allocs and
    frees to the simulated allocator; compare the reserved bytes at the end. `addresses`:
    new segments take the addresses CUDA gave them (best fit breaks ties by address);
    without, increasing ones."""
    actions = trace["actions"]
    code = {name: i for i, name in enumerate(actions)}
    events: list[list[int]] = trace["events"]
    segs = trace["segments"]
    if expandable is None:
        expandable = any(s.get("is_expandable") for s in segs)
    # the state before the trace: final mapped ranges and live blocks, events undone
    ranges: dict[tuple[bool, int], list[tuple[int, int]]] = {}
    live: dict[int, int] = {}
    for sg in segs:
        key = (sg.get("segment_type") == "small", int(sg.get("stream", 0)))
        ranges.setdefault(key, []).append((sg["address"], sg["total_size"]))
        for addr, size, state in sg["blocks"]:
            if state.startswith("active"):
                live[addr] = size
    measured_end = sum(sg["total_size"] for sg in segs)
    for action, addr, size, stream, _fid in reversed(events):
        if action == code["alloc"]:
            live.pop(addr, None)
        elif action == code["free_completed"]:
            live[addr] = size
        elif action in (code["segment_alloc"], code["segment_map"]):
            for rs in ranges.values():
                if _cut(rs, addr, size):
                    break
        elif action in (code["segment_free"], code["segment_unmap"]):
            key = (size <= SMALL_BUFFER and not expandable, stream)
            ranges.setdefault(key, []).append((addr, size))
    sim = CachingAllocator(expandable=expandable)
    for (small, stream), rs in ranges.items():
        sim.place(_joined(rs) if expandable else rs, small, stream)
    handles: dict[int, Block] = {}
    for addr, size in sorted(live.items()):
        b = sim.occupy(addr, round_size(size))
        if b is not None:
            handles[addr] = b
    sim.peak_allocated = sim.allocated
    unmatched = 0
    measured_alloc = peak_alloc = sim.allocated
    released = False  # inside a run of segment_free / unmap events (one empty_cache)
    for action, addr, size, stream, _fid in events:
        if action in (code["segment_free"], code["segment_unmap"]):
            if not released:
                sim.empty_cache()
            released = True
            continue
        released = False
        if action == code["segment_alloc"]:
            sim.next_segment_addr = addr if addresses else None
        elif action == code["alloc"]:
            handles[addr] = sim.malloc(size, stream)
            measured_alloc += round_size(size)
            peak_alloc = max(peak_alloc, measured_alloc)
        elif action == code["free_completed"]:
            b = handles.pop(addr, None)
            if b is None:
                unmatched += 1
                continue
            sim.free(b)
            measured_alloc -= round_size(size)
    return ReplayResult(
        events=len(events),
        measured_reserved_end=measured_end,
        replayed_reserved_end=sim.reserved,
        measured_peak_allocated=peak_alloc,
        replayed_peak_allocated=sim.peak_allocated,
        unmatched_frees=unmatched,
    )


def _cut(ranges: list[tuple[int, int]], addr: int, size: int) -> bool:
    """Remove [addr, addr + size) from the ranges that hold it; False if none does."""
    for i, (a, n) in enumerate(ranges):
        if a <= addr and addr + size <= a + n:
            del ranges[i]
            if addr > a:
                ranges.append((a, addr - a))
            if addr + size < a + n:
                ranges.append((addr + size, a + n - addr - size))
            return True
    return False


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent mapped ranges as one."""
    out: list[tuple[int, int]] = []
    for a, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((a, n))
    return out


def replay_requests(requests: Iterable[tuple[int, int]], expandable: bool = False,
                    stream: int = 0, sim: CachingAllocator | None = None,
                    live: dict[int, Block] | None = None) -> CachingAllocator:
    """Replay (tensor id, bytes) requests: a positive size allocates tensor `id`, a size of
    0 frees it, a negative one empties the cache. Returns the allocator after the sequence
    (its peak_reserved etc.); `sim` and `live` continue an earlier replay."""
    sim = sim if sim is not None else CachingAllocator(expandable=expandable)
    live = live if live is not None else {}
    malloc, free, pop = sim.malloc, sim.free, live.pop
    for tid, size in requests:
        if size > 0:
            live[tid] = malloc(size, stream)
        elif size == 0:
            free(pop(tid))
        else:
            sim.empty_cache()
    return sim


def requested_run(sizes: dict[int, int], total: int,
                  requests: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The rounded request bytes alive (round_size per allocation, a free gives back its
    own; `sizes` holds the live ones) over `requests`, from `total`: the total after them
    and its peak. Unlike allocated bytes they do not depend on where a request lands
    (program.step.requested_peaks)."""
    peak = total
    for tid, size in requests:
        if size > 0:
            sizes[tid] = round_size(size)
            total += sizes[tid]
            peak = max(peak, total)
        elif size == 0:
            total -= sizes.pop(tid)
    return total, peak


Engine = Literal["compiled", "python"]


def _compiled_module() -> ModuleType | None:
    """The compiled replay, or None where it was not built (setup.py builds it optionally)
    or `VRAMCALC_NO_EXTENSIONS` is set, which runs the package as an install without it
    (as aiohttp's AIOHTTP_NO_EXTENSIONS does): read once, here."""
    if os.environ.get("VRAMCALC_NO_EXTENSIONS"):
        return None
    try:
        from vramcalc.memory.allocator import _replay
    except ImportError:
        return None
    return _replay


_COMPILED = _compiled_module()
COMPILED = _COMPILED  # (program.templates reads its `owners`)
# the replay `replay_program` runs unless told otherwise (`vramcalc --version` says it)
ENGINE: Engine = "compiled" if _COMPILED is not None else "python"


# (ids, strides, sizes, count): the requests (ids[k] + r * strides[k], sizes[k]) for k in
# order, for r in range(count) (program.templates.StepProgram), int64 arrays
RequestBlock = tuple["array[int]", "array[int]", "array[int]", int]  # generic from 3.12


def expand(blocks: Sequence[RequestBlock]) -> list[tuple[int, int]]:
    """The (id, bytes) requests that `blocks` stand for."""
    return [(tid + r * stride, size) for ids, strides, sizes, count in blocks
            for r in range(count) for tid, stride, size in zip(ids, strides, sizes,
                                                                strict=True)]


class ProgramReplay(Frozen):
    """What `replay_program` reads off the simulated allocator."""

    _fields = ("load_peak_allocated", "load_peak_reserved", "segment_peaks", "peak_allocated",
               "peak_reserved", "load_peak_requested", "segment_requested")
    load_peak_allocated: int
    load_peak_reserved: int
    segment_peaks: tuple[int, ...]  # peak allocated of each step segment, from its start
    peak_allocated: int  # over the steps, peaks reset after loading
    peak_reserved: int  # over the steps
    # the rounded (round_size) request bytes alive, which unlike allocated bytes do not
    # depend on where a request lands (program.step.requested_peaks): their peak in
    # loading, and in each step segment from its start
    load_peak_requested: int
    segment_requested: tuple[int, ...]

    def __init__(self, load_peak_allocated: int, load_peak_reserved: int,
                 segment_peaks: tuple[int, ...], peak_allocated: int, peak_reserved: int,
                 load_peak_requested: int = 0, segment_requested: tuple[int, ...] = ()
                 ) -> None:
        self.__dict__.update(
            load_peak_allocated=load_peak_allocated, load_peak_reserved=load_peak_reserved,
            segment_peaks=segment_peaks, peak_allocated=peak_allocated,
            peak_reserved=peak_reserved, load_peak_requested=load_peak_requested,
            segment_requested=segment_requested)


def replay_program(load: Sequence[tuple[int, int]], steps: Sequence[RequestBlock],
                   bounds: Sequence[int], expandable: bool,
                   engine: Engine | None = None, descending: bool = False) -> ProgramReplay:
    """Replay the requests of loading (`load`, from an empty allocator), reset the peaks
    (as `calibrate` does before the first step), then the step requests (`steps`, the
    blocks of a program.templates.StepProgram) segment by segment: segment k is requests
    bounds[k] to bounds[k + 1] of the sequence the blocks stand for, the last one to its
    end. Requests are (tensor id, bytes) as in `replay_requests`, ids distinct over both.
    `engine`: "compiled" (an error where it is not built), "python", or None for
    `ENGINE`; both give the same numbers (tests/memory/allocator/test_replay_engines.py).
    `descending`: new segments at ever lower addresses (`CachingAllocator`)."""
    engine = engine or ENGINE
    if engine == "compiled":
        if _COMPILED is None:
            raise RuntimeError(
                "the compiled replay (vramcalc.memory.allocator._replay) is not built here")
        load_alloc, load_res, peaks, overall, reserved, load_req, req_peaks = (
            _COMPILED.replay_program(load, steps, bounds, expandable, descending))
        return ProgramReplay(load_alloc, load_res, peaks, overall, reserved, load_req,
                             req_peaks)
    requests = expand(steps)
    sizes: dict[int, int] = {}
    requested, load_req = requested_run(sizes, 0, load)
    sim = replay_requests(load, sim=CachingAllocator(expandable, descending))
    load_alloc, load_res = sim.peak_allocated, sim.peak_reserved
    sim.peak_reserved, sim.peak_allocated = sim.reserved, sim.allocated
    overall = sim.peak_allocated
    live: dict[int, Block] = {}
    ends = [*bounds[1:], len(requests)]
    segment_peaks = []
    segment_requested = []
    for lo, hi in zip(bounds, ends, strict=True):
        sim.peak_allocated = sim.allocated
        replay_requests(requests[lo:hi], sim=sim, live=live)
        requested, peak = requested_run(sizes, requested, requests[lo:hi])
        segment_requested.append(peak)
        segment_peaks.append(sim.peak_allocated)
        overall = max(overall, sim.peak_allocated)
    return ProgramReplay(load_alloc, load_res, tuple(segment_peaks), overall,
                         sim.peak_reserved, load_req, tuple(segment_requested))
