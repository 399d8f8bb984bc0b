"""The caching-allocator replay (vramcalc.memory.allocator.replay) against the rules of
c10/cuda/CUDACachingAllocator.cpp and against whole allocator traces recorded on an H200
(calibration/h200/run14-traces, run 14)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from vramcalc.memory.allocator.replay import (
    CachingAllocator,
    allocation_size,
    replay_requests,
    replay_trace,
    round_size,
)
from vramcalc.units import MiB

TRACES = Path(__file__).resolve().parents[3] / "calibration" / "h200" / "run14-traces"


def test_sizes_follow_c10() -> None:
    assert round_size(1) == 512 and round_size(513) == 1024
    assert allocation_size(4096) == 2 * MiB  # small pool: 2 MiB segments
    assert allocation_size(3 * MiB) == 20 * MiB  # 1-10 MiB: a 20 MiB segment to split
    assert allocation_size(11 * MiB + 1) == 12 * MiB  # else rounded up to 2 MiB


def test_best_fit_takes_the_smallest_block_and_splits_the_front() -> None:
    sim = CachingAllocator()
    a, b, c = sim.malloc(30 * MiB), sim.malloc(50 * MiB), sim.malloc(40 * MiB)
    sim.free(a)
    sim.free(b)
    d = sim.malloc(25 * MiB)
    assert d.addr == a.addr and d.size == 25 * MiB  # the 30 MiB block, split
    e = sim.malloc(45 * MiB)
    assert e.addr == b.addr  # the 50 MiB one
    assert sim.reserved == 120 * MiB and sim.segments == 3
    del c


@pytest.mark.parametrize("descending", [False, True])
def test_a_tie_goes_to_the_lowest_address(descending: bool) -> None:
    """Two free blocks of one size: best fit takes the lower address (c10
    BlockComparatorSize), the oldest segment's with ascending segment addresses, the
    newest one's with descending ones (program.infer, as CUDA gave them in the run 34 / 35
    traces)."""
    sim = CachingAllocator(descending=descending)
    old, new = sim.malloc(64 * MiB), sim.malloc(64 * MiB)
    assert (new.addr < old.addr) == descending
    sim.free(old)
    sim.free(new)
    again = sim.malloc(64 * MiB)
    assert again.addr == (new.addr if descending else old.addr)
    assert sim.reserved == 128 * MiB


def test_a_large_block_keeps_a_rest_of_at_most_1_mib() -> None:
    sim = CachingAllocator()
    a = sim.malloc(12 * MiB)
    sim.free(a)
    b = sim.malloc(11 * MiB + 512)  # rest 1 MiB - 512: not split
    assert b.size == 12 * MiB
    sim.free(b)
    c = sim.malloc(10 * MiB + 512)  # rest > 1 MiB: split
    assert c.size == 10 * MiB + 512


def test_medium_requests_share_a_20_mib_segment() -> None:
    sim = replay_requests([(1, 5 * MiB), (2, 5 * MiB), (3, 5 * MiB)])
    assert sim.reserved == 20 * MiB and sim.segments == 1


def test_freed_blocks_a_larger_request_cannot_use_stay_reserved() -> None:
    seq = [(1, 100 * MiB), (2, 100 * MiB), (1, 0), (3, 150 * MiB)]
    sim = replay_requests(seq)
    assert sim.reserved == 350 * MiB
    # expandable segments: one segment; the 150 MiB request maps 8 pages of 20 MiB past B
    exp = replay_requests(seq, expandable=True)
    assert exp.reserved == 200 * MiB + 160 * MiB
    # ... and a request that fits the free 100 MiB in the middle takes it
    exp2 = replay_requests([*seq, (4, 90 * MiB)], expandable=True)
    assert exp2.reserved == 360 * MiB


def test_freed_neighbours_merge() -> None:
    sim = CachingAllocator()
    seg = sim.malloc(100 * MiB)
    sim.free(seg)
    a, b = sim.malloc(60 * MiB), sim.malloc(40 * MiB)  # both split from that segment
    assert (a.addr, b.addr) == (seg.addr, seg.addr + 60 * MiB)
    sim.free(a)
    sim.free(b)
    big = sim.malloc(100 * MiB)  # the merged 60 + 40: no new segment
    assert big.addr == seg.addr and sim.reserved == 100 * MiB


def test_empty_cache_releases_only_unused_segments() -> None:
    sim = CachingAllocator()
    a, b = sim.malloc(30 * MiB), sim.malloc(40 * MiB)
    sim.free(a)
    c = sim.malloc(10 * MiB)  # splits a's segment: 20 MiB free left inside it
    sim.free(b)
    sim.empty_cache()
    assert sim.reserved == 30 * MiB
    del c


def test_expandable_empty_cache_unmaps_whole_free_pages() -> None:
    sim = CachingAllocator(expandable=True)
    a = sim.malloc(50 * MiB)  # maps 60 MiB: 3 pages
    b = sim.malloc(5 * MiB)  # in the 10 MiB left
    sim.free(a)
    sim.empty_cache()  # pages 0-1 are wholly free; page 2 holds the rest of a and b
    assert sim.reserved == 20 * MiB
    c = sim.malloc(30 * MiB)  # the lowest unmapped room that fits: the hole at the start
    assert c.addr < b.addr and sim.reserved == 60 * MiB


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("*.json.gz")))
def test_replay_reproduces_the_measured_reserved_bytes(name: str) -> None:
    """Every recorded step (16 points, both allocators, trainer and plain loops, every
    method): the replay ends with the reserved bytes the GPU had, to 0.7 %; all but one
    exactly."""
    trace = json.loads(gzip.open(TRACES / name, "rt", encoding="utf-8").read())
    r = replay_trace(trace)
    assert r.unmatched_frees == 0
    assert r.replayed_reserved_end == pytest.approx(r.measured_reserved_end, rel=0.007)
    assert r.replayed_peak_allocated == pytest.approx(r.measured_peak_allocated, rel=0.001)
