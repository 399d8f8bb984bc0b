"""generate()'s prefill program against the committed allocator traces of four inference
points (calibration/h100/run29 ik08 llama-2-7b nf4 sdpa b4 p128; run32 il03 gemma-2-2b nf4
eager b4 p4096, whose reserved memory the program under-predicted by 19 % before the
program followed the trace; run34 ih04 phi-3-mini nf4 sdpa b4 p512, over by 10.1 % before
phi-3's views and copies and the descending segment addresses; run 34b ip00 gemma-2-9b nf4
eager b1 p4096, over by 17.1 % before the adapter was read from its file; run 36 ik09
qwen2.5-7b int8 sdpa b8 p8192, under by 6.8 % before int8's no-grad matmul chain): the
requests in the recorded order, and the segments and peaks they leave on the simulated
caching allocator."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from vramcalc.calibrate.matrix import point_spec
from vramcalc.memory.allocator.replay import CachingAllocator, replay_requests, replay_trace
from vramcalc.memory.inference import estimate_inference
from vramcalc.memory.program.infer import (
    _Emit,
    _int8_matmul,
    _load_plan,
    _shape,
    infer_program_peaks,
    prefill_requests,
)
from vramcalc.memory.program.load import load_requests
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import InferPlan
from vramcalc.units import MiB

ROOT = Path(__file__).resolve().parents[3] / "calibration"
IL03 = ("h100/run32/tr-il03-gemma-2-2b-4L.json.gz", "matrices/h100-infer-trace31.json",
        "tr-il03-gemma-2-2b-4L", "h100/run32-infer-trace.jsonl")
IK08 = ("h100/run29/tr-ik08-llama-2-7b-4L.json.gz", "matrices/h200-infer-holdout3.json",
        "ik08-llama-2-7b-4L", "h100/run27-infer-holdout3.jsonl")
IH04 = ("h100/run34/tr-ih04-phi-3-mini.json.gz", "matrices/h200-infer-holdout.json",
        "ih04-phi-3-mini", "h100/run34-trace.jsonl")
IP00 = ("h100/run34b/tr-ip00-gemma-2-9b-4L.json.gz", "matrices/h100-infer-holdout6.json",
        "ip00-gemma-2-9b-4L", "h100/run34b-trace.jsonl")


def _point(matrix: str, pid: str) -> tuple[ModelSpec, InferPlan]:
    points = {p["id"]: p for p in json.loads((ROOT / matrix).read_text())["points"]}
    point = points[pid]
    return point_spec(point), InferPlan.model_validate(point["job"]["plan"])


def _trace(path: str) -> dict[str, Any]:
    with gzip.open(ROOT / path, "rt") as fh:
        trace: dict[str, Any] = json.load(fh)
    return trace


def _recorded_generate(trace: dict[str, Any], smallest: int) -> list[tuple[str, int]]:
    """(+/-, bytes) of every allocation and free of at least `smallest` bytes from the
    worker's first request inside generate() (calibrate.infer_worker.generate) on."""
    alloc = trace["actions"].index("alloc")
    free = trace["actions"].index("free_completed")
    frames = trace["frames"]
    events = trace["events"]
    start = next(i for i, ev in enumerate(events) if ev[0] == alloc and ev[4] >= 0
                 and "infer_worker.py:generate" in frames[ev[4]])
    live: dict[int, int] = {}
    out = []
    for action, addr, size, _stream, _fid in events[start:]:
        if action == alloc:
            live[addr] = size
            if size >= smallest:
                out.append(("+", size))
        elif action == free and addr in live:
            size = live.pop(addr)
            if size >= smallest:
                out.append(("-", size))
    return out


def _generated(requests: list[tuple[int, int]], smallest: int) -> list[tuple[str, int]]:
    sizes: dict[int, int] = {}
    out = []
    for tid, size in requests:
        if size:
            sizes[tid] = size
            if size >= smallest:
                out.append(("+", size))
        elif sizes[tid] >= smallest:
            out.append(("-", sizes[tid]))
    return out


@pytest.mark.parametrize(("point", "smallest", "least"), [
    (IL03, 8 * MiB, 877), (IK08, MiB, 781), (IH04, MiB // 2, 575), (IP00, MiB, 989)])
def test_prefill_requests_in_the_recorded_order(point: tuple[str, str, str, str],
                                                smallest: int, least: int) -> None:
    """The program's prefill, every request and free of at least `smallest` bytes (the
    model's forward: embeddings, masks, rotary, norms, the 4-bit dequantization, LoRA,
    attention, the cache; sampling's logits are smaller), is the recorded sequence, byte
    for byte and in order (il03: 877 of them; ik08: 781; ih04: 575, phi-3's q, k, v views
    of the fused projection, the rotary's concatenation and sdpa's contiguous copy of an
    output in the query's layout among them; ip00: 989)."""
    trace_path, matrix, pid, _ = point
    spec, plan = _point(matrix, pid)
    generated = _generated(prefill_requests(spec, plan), smallest)
    recorded = _recorded_generate(_trace(trace_path), smallest)
    assert len(generated) >= least
    assert recorded[:len(generated)] == generated


def _measured(point: tuple[str, str, str, str]) -> dict[str, Any]:
    for line in (ROOT / point[3]).read_text().splitlines():
        record = json.loads(line)
        if record["id"] in (point[2], "tr-" + point[2]):
            measurement: dict[str, Any] = record["measurement"]
            return measurement
    raise KeyError(point[2])


def _new_large_segments(trace: dict[str, Any]) -> list[int]:
    """Addresses of the large segments that generate() makes, in order."""
    actions = trace["actions"]
    alloc, seg = actions.index("alloc"), actions.index("segment_alloc")
    events = trace["events"]
    start = next(i for i, ev in enumerate(events) if ev[0] == alloc and ev[4] >= 0
                 and "infer_worker.py:generate" in trace["frames"][ev[4]])
    return [ev[1] for ev in events[start:] if ev[0] == seg and ev[2] > 2 * MiB]


@pytest.mark.parametrize("point", [IH04, IP00])
def test_load_and_generate_reserve_what_was_recorded(point: tuple[str, str, str, str]) -> None:
    """The program's load (PeftModel.from_pretrained: adapters made in the base layer's
    dtype, cast to fp32, the file's copy read and freed) reserves what the worker had
    reserved when generate() began (ih04 804 MiB, ip00 2322 MiB; 798 and 2282 before the
    adapter was read from its file), and load, prefill and decode replayed give the
    measured peak reserved byte for byte (ih04 1268 MiB, ip00 5790 MiB). That takes new
    segments at descending addresses, as CUDA gave them (every large segment of both
    traces' generate() below the one before): where free blocks of a size tie, best fit
    takes the newest segment's. With ascending addresses the same load and prefill
    reserve 1332 and 6814 MiB."""
    trace_path, matrix, pid, _ = point
    spec, plan = _point(matrix, pid)
    meas = _measured(point)
    addrs = _new_large_segments(_trace(trace_path))
    assert len(addrs) >= 5 and all(b < a for a, b in zip(addrs, addrs[1:], strict=False))
    load_plan = _load_plan(plan)
    assert load_plan is not None
    load = load_requests(spec, load_plan, kbit_prepare=False, adapter_dtype=plan.adapter_dtype)
    assert replay_requests(load).reserved == meas["reserved_after_load"]
    assert infer_program_peaks(spec, plan).peak_reserved == meas["peak_reserved_bytes"]
    ascending = replay_requests(load)
    replay_requests(prefill_requests(spec, plan), sim=ascending)
    assert ascending.peak_reserved >= meas["peak_reserved_bytes"] + 64 * MiB


def _segments(sim: CachingAllocator, live: dict[int, Any]) -> list[int]:
    """Sizes of the simulated large-pool segments (every block's chain walked to its
    head)."""
    blocks = list(live.values()) + [b for pool in sim.pools.values()
                                    for b in pool.blocks.values()]
    heads = {}
    for b in blocks:
        while b.prev is not None:
            b = b.prev
        heads[b.addr] = b
    sizes = []
    for head in heads.values():
        if head.small:
            continue
        total, b = 0, head
        while b is not None:
            total += b.size
            b = b.next
        sizes.append(total)
    return sorted(sizes, reverse=True)


def test_il03_prefill_reserves_the_recorded_segments() -> None:
    """At the peak of reserved memory (the prefill's last layer: softmax's fp32 output of
    2 GiB finds no free 2 GiB block, since a 64 MiB rotary output sits in the free 1 GiB
    segment and the scores took half of a 2 GiB one), the trace holds 3 x 2 GiB, 2 x 1 GiB,
    the 1274 MiB loading warmup and 11 segments of 64-144 MiB. The program's load and
    prefill, replayed, leave the same large segments (only a 20 MiB one of loading's adapter
    reads is missing); the estimate's peak reserved is within 1 % of the measured (it was
    -19.2 % before: 2 x 2 GiB)."""
    spec, plan = _point(IL03[1], IL03[2])
    trace = _trace(IL03[0])
    assert replay_trace(trace).replayed_reserved_end == 11110711296  # the allocator rules
    recorded = sorted((s["total_size"] for s in trace["segments"]
                       if s["segment_type"] == "large"), reverse=True)
    sim = CachingAllocator()
    live: dict[int, Any] = {}
    load_plan = _load_plan(plan)
    assert load_plan is not None
    replay_requests(load_requests(spec, load_plan, kbit_prepare=False), sim=sim, live=live)
    replay_requests(prefill_requests(spec, plan), sim=sim, live=live)
    simulated = _segments(sim, live)
    big = 20 * MiB
    assert Counter(s for s in simulated if s > big) == Counter(s for s in recorded if s > big)
    assert sum(simulated) == pytest.approx(sum(recorded), rel=0.01)
    meas = json.loads((ROOT / IL03[3]).read_text().splitlines()[0])["measurement"]
    est = estimate_inference(spec, plan)
    assert est.peak_reserved_bytes == pytest.approx(meas["peak_reserved_bytes"], rel=0.01)
    assert est.peak_allocated_bytes == pytest.approx(meas["peak_allocated_bytes"], rel=0.005)


IK09 = ("h100/run36/traces/tr-ik09-qwen2.5-7b-4L.json.gz", "matrices/h200-infer-holdout3.json",
        "ik09-qwen2.5-7b-4L", "h100/run36-trace.jsonl")
BNB = "/bitsandbytes/"
# bitsandbytes 0.50.2 backends/cuda/ops.py int8_vectorwise_quant:
# `outlier_cols = torch.argwhere(outliers.any(dim=0))`, whose reduction takes a staging
# buffer (not in the program)
ANY_DIM0 = "backends/cuda/ops.py:_:233"


def _int8_calls(trace: dict[str, Any], calls: int,
                smallest: int) -> list[tuple[bool, list[tuple[str, int]]]]:
    """The first `calls` Linear8bitLt matmuls of generate() (MatMul8bitLt.forward's
    `A.to(torch.float16)` at autograd/_functions.py:140 up to the next request outside
    bitsandbytes): whether `outliers.any(dim=0)` ran (an input value >= 6.0), and the
    requests and frees of at least `smallest` bytes, that reduction's buffer left out."""
    actions, frames = trace["actions"], trace["frames"]
    alloc, free = actions.index("alloc"), actions.index("free_completed")
    live: dict[int, tuple[int, bool]] = {}
    out: list[tuple[bool, list[tuple[str, int]]]] = []
    current: list[tuple[str, int]] | None = None
    outliers = False
    for action, addr, size, _stream, fid in trace["events"]:
        top = frames[fid].split("\n")[0] if fid >= 0 else ""
        if action == alloc:
            if "_functions.py:forward:140" in top:
                if current is not None:
                    out.append((outliers, current))
                if len(out) == calls:
                    return out
                current, outliers = [], False
            elif current is not None and BNB not in top:
                out.append((outliers, current))
                current = None
                if len(out) == calls:
                    return out
            reduction = ANY_DIM0 in top
            outliers = outliers or (reduction and current is not None)
            live[addr] = (size, reduction)
            if current is not None and size >= smallest and not reduction:
                current.append(("+", size))
        elif action == free and addr in live:
            size, reduction = live.pop(addr)
            if current is not None and size >= smallest and not reduction:
                current.append(("-", size))
    return out


def test_ik09_int8_matmuls_in_the_recorded_order() -> None:
    """Every int8 Linear of ik09's prefill (qwen2.5-7b@4L int8, 8 x 8192 tokens: 28
    MatMul8bitLt calls) is the program's `_int8_matmul`, request for request (1 MiB and
    more): the fp16 copy of x, the int8 rows, `A.abs()` and its bool, the int32 product,
    its fp16 dequant and the bf16 cast; the down projection with every column an outlier
    (subA 2368 MiB, subB, `output.addmm`). The program had only the int8 rows and the int32
    product (reserved 27.56 GB then, measured 29.58). What depends on the random weights
    and is not modelled: 11 of the 24 other calls (layers 0 and 3) saw an input value
    >= 6.0, which adds `outliers.any(dim=0)`'s buffer (33.25 MiB, left out here) and an
    `addmm` output before the old one is freed; the other 13 saw none, as the program
    assumes."""
    spec, plan = _point(IK09[1], IK09[2])
    tokens = plan.batch_size * plan.prompt_len
    s = _shape(spec, plan)
    lins = list(spec.block_linears())
    calls = _int8_calls(_trace(IK09[0]), spec.num_hidden_layers * len(lins), MiB)
    assert len(calls) == spec.num_hidden_layers * len(lins) == 28
    counts = Counter()
    for k, (outliers, recorded) in enumerate(calls):
        lin = lins[k % len(lins)]
        e = _Emit(count(1))
        _int8_matmul(e, s, lin, tokens)
        generated = _generated(e.out, MiB)
        if lin.role == "down" or not outliers:
            assert recorded == generated, (k, lin.role)
            counts["down" if lin.role == "down" else "plain"] += 1
            continue
        # `output.addmm(subA, subB)`: a new output, then the old one freed, before CA goes
        out = ("+", tokens * lin.out_features * 2)
        at = len(generated) - 1
        assert generated[at] == ("-", tokens * lin.in_features)  # CA
        assert recorded == generated[:at] + [out, ("-", out[1])] + generated[at:], (k, lin.role)
        counts["outliers"] += 1
    assert counts == {"down": 4, "plain": 13, "outliers": 11}


def _new_segments(sim: CachingAllocator, live: dict[int, Any],
                  requests: list[tuple[int, int]]) -> list[int]:
    """Bytes each new segment of more than 20 MiB adds while `requests` are replayed."""
    sizes = []
    for request in requests:
        before = sim.reserved
        replay_requests([request], sim=sim, live=live)
        if sim.reserved - before > 20 * MiB:
            sizes.append(sim.reserved - before)
    return sizes


def test_ik09_load_and_prefill_reserve_the_recorded_segments() -> None:
    """ik09's reserved peak (29.58 GB, the end of layer 0's up_proj) is the load's 3.61 GB
    and 12 segments of the prefill: 448 MiB (the embeddings), six of 896 (the first norm's
    fp32 pair, q_proj's int32 product, LoRA fp32 tensors), gate_proj's int32 product (4736),
    its fp16 dequant and bf16 cast (2368 each) and LoRA's two fp32 gate/up outputs (4736
    each). The program's load and prefill make the same segments and the estimate's peak
    reserved is the measured byte for byte (before the int8 chain: 27.56 GB, no 2368 MiB
    cast segment, a 448 MiB one instead)."""
    spec, plan = _point(IK09[1], IK09[2])
    meas = _measured(IK09)
    trace = _trace(IK09[0])
    actions, events = trace["actions"], trace["events"]
    seg, alloc = actions.index("segment_alloc"), actions.index("alloc")
    start = next(i for i, ev in enumerate(events) if ev[0] == alloc and ev[4] >= 0
                 and "infer_worker.py:generate" in trace["frames"][ev[4]])
    recorded = [ev[2] for ev in events[start:] if ev[0] == seg and ev[2] > 20 * MiB]
    load_plan = _load_plan(plan)
    assert load_plan is not None
    sim = CachingAllocator(descending=True)
    live: dict[int, Any] = {}
    replay_requests(load_requests(spec, load_plan, kbit_prepare=False,
                                  adapter_dtype=plan.adapter_dtype), sim=sim, live=live)
    assert sim.reserved == meas["reserved_after_load"] == 3605004288
    assert _new_segments(sim, live, prefill_requests(spec, plan)) == recorded
    assert Counter(recorded) == {448 * MiB: 1, 896 * MiB: 6, 4736 * MiB: 3, 2368 * MiB: 2}
    peaks = infer_program_peaks(spec, plan)
    assert peaks.peak_reserved == meas["peak_reserved_bytes"] == 29576134656
    assert peaks.peak_allocated == pytest.approx(meas["peak_allocated_bytes"], rel=5e-4)
