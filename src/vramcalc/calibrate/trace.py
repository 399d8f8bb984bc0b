"""Summarize a CUDA allocator snapshot in the worker: what is live at the peak, and why.

`torch.cuda.memory._snapshot()` (torch 2.11-2.13, `torch/cuda/memory.py` `_snapshot`,
format read by `torch/cuda/_memory_viz.py`) returns `{"segments": [...], "device_traces":
[[event, ...], ...]}`: each segment has `address`, `total_size`, `segment_type` and `blocks`
(`address`, `size`, `state`, `frames`); each trace event has `action` (alloc,
free_requested, free_completed, segment_alloc, segment_free, segment_map, segment_unmap,
oom, snapshot), `addr`, `size` and `frames` (Python frames `{filename, line, name}`,
innermost first). The raw pickle of a real step is hundreds of MB, so the worker keeps only
this summary.

How: the live blocks and segments at the end are read from `segments`; walking the trace
backwards undoes every event to get the state at the start of the trace; replaying it
forwards finds the moment of peak allocated inside the measured step (between two step
markers the worker allocates, see `run.MARK_STEP`), and the live blocks at that moment
are attributed to categories by the first frame, innermost first, that names a known
component. Blocks allocated before the trace began have no frames: `known` (data_ptr ->
category: parameters, gradients, optimizer states) names them, else they count as
`static_before_trace`.

Pure Python, no torch: the CPU tests feed it a synthetic dict of the same shape.
"""

from __future__ import annotations

import ast
import bisect
import functools
import linecache
from collections.abc import Sequence
from typing import Any

from vramcalc.units import MiB

SMALL_SEGMENT = 2 * MiB  # c10 CUDACachingAllocator kSmallBuffer: the small pool's segments
MEDIUM_SEGMENT = 20 * MiB  # kLargeBuffer: segments for 1-10 MiB requests
TOP_FRAMES = 25

Frame = dict[str, Any]


def _fn(frame: Frame) -> str:
    return str(frame.get("filename", "")).replace("\\", "/")


@functools.cache
def _spans(filename: str) -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, qualname) of every class and function of a source file."""
    try:
        with open(filename, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return ()
    out: list[tuple[int, int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, child.end_lineno or child.lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return tuple(out)


def qualname(frame: Frame) -> str:
    """`Class.method` of a frame, read from its source file; the bare name if unreadable."""
    line = int(frame.get("line", 0) or 0)
    best = ""
    best_len = 1 << 30
    for first, last, name in _spans(_fn(frame)):
        if first <= line <= last and last - first < best_len:
            best, best_len = name, last - first
    return best or str(frame.get("name", "?"))


def _modeling_category(frame: Frame) -> str:
    q = qualname(frame).lower()
    if any(k in q for k in ("attention", "rotary", "rope", "repeat_kv", "rotate_half")):
        return "modeling_attention"
    if "norm" in q:
        return "modeling_norm"
    if any(k in q for k in ("mlp", "expert", "moe", "sparse")):
        return "modeling_mlp"
    if "decoderlayer" in q or "block" in q:
        return "modeling_layer_residual"
    if "forcausallm" in q:
        return "modeling_lm_head_logits"
    if q.endswith("model.forward") or "embed" in q or "mask" in q:
        return "modeling_model_embed_mask"
    return "modeling_other"


def _peft_category(frame: Frame, inner: Sequence[Frame]) -> str:
    inner_files = " ".join(_fn(f) + ":" + str(f.get("name", "")) for f in inner)
    if "dropout" in inner_files:
        return "peft_lora_dropout"
    if "modules/linear.py" in inner_files or "F.linear" in inner_files:
        text = linecache.getline(_fn(frame), int(frame.get("line", 0) or 0))
        return "peft_base_layer" if "base_layer" in text else "peft_lora_A_B"
    if "bitsandbytes" in inner_files:
        return "bnb_dequant_matmul"
    return "peft_lora_other"


def _frame_category(frame: Frame, inner: Sequence[Frame]) -> str | None:
    """The category a frame names, or None for generic frames (torch.nn, stdlib...)."""
    fn, name = _fn(frame), str(frame.get("name", ""))
    if "bitsandbytes/" in fn:
        return "optimizer" if "/optim/" in fn else "bnb_dequant_matmul"
    if "torch/optim/" in fn:
        return "optimizer"
    if "/peft/" in fn:
        return _peft_category(frame, inner)
    if "accelerate/" in fn and ("operations.py" in fn or "convert" in name):
        return "accelerate_convert_outputs_to_fp32"
    if "transformers/loss/" in fn:
        return "loss"
    if fn.endswith("torch/nn/functional.py") and name in ("cross_entropy", "nll_loss"):
        return "loss"
    if "transformers/integrations/" in fn and any(
        k in fn for k in ("sdpa", "flash", "flex")
    ):
        return "modeling_attention"
    if "transformers/integrations/" in fn and "moe" in fn:
        return "modeling_mlp"
    if "transformers/models/" in fn:
        return _modeling_category(frame)
    if any(k in fn for k in ("transformers/modeling_utils", "transformers/quantizers",
                             "transformers/core_model_loading",
                             "transformers/integrations/bitsandbytes")):
        return "weights_load"
    if "torch/utils/checkpoint" in fn:
        return "checkpoint"
    if "torch/autograd/" in fn or (fn.endswith("torch/_tensor.py") and name == "backward"):
        return "autograd_backward"
    if "transformers/trainer" in fn:
        return "trainer_other"
    return None


def classify(frames: Sequence[Frame] | None) -> tuple[str, Frame | None]:
    """(category, deciding frame) of an allocation from its frames, innermost first."""
    if not frames:
        return "no_frames", None
    for i, frame in enumerate(frames):
        cat = _frame_category(frame, frames[:i])
        if cat is not None:
            return cat, frame
    return "other", frames[0]


def frame_key(frame: Frame | None) -> str:
    if frame is None:
        return "?"
    fn = _fn(frame)
    for anchor in ("site-packages/", "dist-packages/", "/src/"):
        if anchor in fn:
            fn = fn.split(anchor, 1)[1]
            break
    return f"{fn}:{frame.get('name', '?')}:{frame.get('line', '?')}"


def _device_trace(snap: dict[str, Any], device: int | None) -> list[dict[str, Any]]:
    traces = snap.get("device_traces") or []
    if device is not None and device < len(traces):
        return list(traces[device])
    for trace in traces:
        if trace:
            return list(trace)
    return []


def _find_marks(events: list[dict[str, Any]], pair: tuple[int, int]) -> list[int]:
    return [
        i for i in range(len(events) - 1)
        if events[i].get("action") == "alloc" and events[i].get("size") == pair[0]
        and events[i + 1].get("action") == "alloc" and events[i + 1].get("size") == pair[1]
    ]


class _State:
    """Live blocks (addr -> (size, frames)) and segments (addr -> size) while replaying."""

    def __init__(self, live: dict[int, tuple[int, list[Frame] | None]],
                 segs: dict[int, int]) -> None:
        self.live = dict(live)
        self.segs = dict(segs)
        self.allocated = sum(size for size, _ in self.live.values())
        self.reserved = sum(self.segs.values())

    def apply(self, e: dict[str, Any]) -> None:
        action, addr, size = e.get("action"), int(e.get("addr", 0)), int(e.get("size", 0))
        if action == "alloc":
            old = self.live.pop(addr, None)
            if old is not None:  # a missed free: never count a block twice
                self.allocated -= old[0]
            self.live[addr] = (size, list(e.get("frames") or []))
            self.allocated += size
        elif action == "free_completed":
            old = self.live.pop(addr, None)
            if old is not None:
                self.allocated -= old[0]
        elif action in ("segment_alloc", "segment_map"):
            key = _segment_of(self.segs, addr) if action == "segment_map" else None
            key = addr if key is None else key
            self.segs[key] = self.segs.get(key, 0) + size
            self.reserved += size
        elif action in ("segment_free", "segment_unmap"):
            self.reserved -= size
            key = _segment_of(self.segs, addr)
            key = addr if key is None else key
            left = self.segs.pop(key, 0) - size
            if left > 0:
                self.segs[key] = left


def _segment_of(segs: dict[int, int], addr: int) -> int | None:
    """The start of the segment whose range holds `addr` or ends right at it (where an
    expandable segment maps its next pages), None if none does."""
    if addr in segs:
        return addr
    for start, size in segs.items():
        if start <= addr <= start + size:
            return start
    return None


def _initial_state(snap: dict[str, Any], events: list[dict[str, Any]]) -> _State:
    """The state before the first traced event: the final state with every event undone."""
    live: dict[int, tuple[int, list[Frame]]] = {}
    segs: dict[int, int] = {}
    for seg in snap.get("segments") or []:
        segs[int(seg.get("address", 0))] = int(seg.get("total_size", 0))
        for block in seg.get("blocks") or []:
            if str(block.get("state", "")).startswith("active"):
                live[int(block["address"])] = (int(block["size"]), list(block.get("frames") or []))
    for e in reversed(events):
        action, addr, size = e.get("action"), int(e.get("addr", 0)), int(e.get("size", 0))
        if action == "alloc":
            live.pop(addr, None)
        elif action == "free_completed":
            live[addr] = (size, [])  # allocated before the trace (or its alloc is seen later)
        elif action in ("segment_alloc", "segment_map"):
            # an expandable segment maps pages inside its range: undo on the segment
            key = _segment_of(segs, addr)
            key = addr if key is None else key
            left = segs.pop(key, 0) - size
            if left > 0:
                segs[key] = left
        elif action in ("segment_free", "segment_unmap"):
            key = _segment_of(segs, addr)
            key = addr if key is None else key
            segs[key] = segs.get(key, 0) + size
    # Blocks live before the trace: frames None (named by `known`, else static_before_trace);
    # a traced allocation without frames has [] and counts as no_frames.
    return _State({a: (s, None) for a, (s, _) in live.items()}, segs)


def _segment_layout(state: _State) -> dict[str, dict[str, int]]:
    seg_addrs = sorted(state.segs)
    in_seg = dict.fromkeys(seg_addrs, 0)
    for addr, (size, _) in state.live.items():
        i = bisect.bisect_right(seg_addrs, addr) - 1
        if i >= 0 and addr < seg_addrs[i] + state.segs[seg_addrs[i]]:
            in_seg[seg_addrs[i]] += size
    layout: dict[str, dict[str, int]] = {}
    for addr in seg_addrs:
        total = state.segs[addr]
        if total <= SMALL_SEGMENT:
            cls = "small_pool_le_1MiB_blocks"
        elif total <= MEDIUM_SEGMENT:
            cls = "segments_2_to_20MiB"
        else:
            cls = "segments_gt_20MiB"
        row = layout.setdefault(cls, {"segments": 0, "reserved": 0, "allocated": 0, "free": 0})
        row["segments"] += 1
        row["reserved"] += total
        row["allocated"] += in_seg[addr]
        row["free"] += total - in_seg[addr]
    return layout


def summarize_snapshot(
    snap: dict[str, Any],
    step: int = -1,
    known: dict[int, str] | None = None,
    step_mark: tuple[int, int] | None = None,
    end_mark: tuple[int, int] | None = None,
    device: int | None = None,
    top: int = TOP_FRAMES,
) -> dict[str, Any]:
    """Bytes by category and the top frames at the peak of step `step` (-1: the last).

    Without step markers in the trace the whole trace is the window (`window` says so).
    """
    known = known or {}
    events = _device_trace(snap, device)
    state = _initial_state(snap, events)
    starts = _find_marks(events, step_mark) if step_mark else []
    ends = _find_marks(events, end_mark) if end_mark else []
    if starts:
        k = step if step >= 0 else len(starts) + step
        k = min(max(k, 0), len(starts) - 1)
        lo = starts[k]
        later = [i for i in starts[k + 1:] + ends if i > lo]
        hi = min(later) if later else len(events)
        window = f"step {k} of {len(starts)}"
    else:
        lo, hi, window = 0, len(events), "whole trace (no step markers)"

    peak_i, peak_alloc = -1, -1
    for i, e in enumerate(events):
        state.apply(e)
        if lo <= i < hi and state.allocated > peak_alloc:
            peak_i, peak_alloc = i, state.allocated
    state = _initial_state(snap, events)
    for e in events[: peak_i + 1]:
        state.apply(e)

    categories: dict[str, int] = {}
    frames_bytes: dict[str, int] = {}
    blocks: list[tuple[int, str, str]] = []  # (bytes, category, frame) of each live block
    recompute = 0
    for addr, (size, frames) in state.live.items():
        if frames is not None:
            cat, frame = classify(frames)
            if any("torch/utils/checkpoint" in _fn(f) for f in frames):
                recompute += size
            key = frame_key(frame)
        else:
            cat = known.get(addr, "static_before_trace")
            key = f"<{cat}>"
        categories[cat] = categories.get(cat, 0) + size
        frames_bytes[key] = frames_bytes.get(key, 0) + size
        blocks.append((size, cat, key))
    top_frames = sorted(frames_bytes.items(), key=lambda kv: -kv[1])[:top]

    def described(e: dict[str, Any]) -> dict[str, Any]:
        frames = e.get("frames") or []
        key = frame_key(classify(frames)[1]) if frames else "<no frames>"
        return {"action": e.get("action"), "bytes": e.get("size", 0), "frame": key}

    # the requests around the peak (>= 1 MiB): which tensors meet there, in what order
    near = [described(e) for e in events[max(0, peak_i - 400): peak_i + 1]
            if e.get("action") in ("alloc", "free_completed") and e.get("size", 0) >= MiB]
    return {
        "window": window,
        "events": len(events),
        "peak_event_index": peak_i,
        "peak_allocated": state.allocated,
        "reserved_at_peak": state.reserved,
        "live_blocks": len(state.live),
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "under_checkpoint_recompute": recompute,
        "top_frames": [{"frame": k, "bytes": v} for k, v in top_frames],
        "largest_blocks": [{"bytes": b, "category": c, "frame": f}
                           for b, c, f in sorted(blocks, reverse=True)[:top]],
        "before_peak": near[-24:],
        "segments": _segment_layout(state),
    }


# Event actions of a compact trace, by code (compact_trace).
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
           "segment_map", "segment_unmap", "oom", "snapshot")


def compact_trace(snap: dict[str, Any], device: int | None = None) -> dict[str, Any]:
    """The whole allocator trace without its stacks, for replaying it offline
    (`vramcalc.memory.allocator.replay`): the final segments and blocks, then every event as
    [action code (ACTIONS), address, size, stream, frame index]; the frame index points
    into `frames` (the deciding frame of `classify`, -1 for none), kept so the request
    sequence of a step can be read by who asked."""
    events = _device_trace(snap, device)
    frames: list[str] = []
    index: dict[str, int] = {}
    out_events: list[list[int]] = []
    for e in events:
        action = str(e.get("action"))
        code = ACTIONS.index(action) if action in ACTIONS else -1
        fid = -1
        if action == "alloc" and e.get("frames"):
            key = frame_key(classify(e["frames"])[1])
            fid = index.setdefault(key, len(frames))
            if fid == len(frames):
                frames.append(key)
        out_events.append([code, int(e.get("addr", 0)), int(e.get("size", 0)),
                           int(e.get("stream", 0)), fid])
    segments = []
    for seg in snap.get("segments") or []:
        if device is not None and seg.get("device", device) != device:
            continue
        segments.append({
            "address": int(seg.get("address", 0)),
            "total_size": int(seg.get("total_size", 0)),
            "segment_type": seg.get("segment_type"),
            "stream": int(seg.get("stream", 0)),
            "is_expandable": bool(seg.get("is_expandable", False)),
            "blocks": [[int(b.get("address", 0)), int(b.get("size", 0)),
                        str(b.get("state", ""))] for b in seg.get("blocks") or []],
        })
    return {"actions": list(ACTIONS), "segments": segments, "events": out_events,
            "frames": frames}


def recorded_step(trace: dict[str, Any], step: int,
                  mark: tuple[int, int]) -> list[tuple[str, int]]:
    """(+/-, bytes) of every allocation and completed free of recorded step `step`
    (0-based) of a `compact_trace`: from the step's pair of `mark` allocations (the worker's
    `run.MARK_STEP`) to the next pair, or the trace's start / end where there is none."""
    actions = trace["actions"]
    alloc, free = actions.index("alloc"), actions.index("free_completed")
    events = trace["events"]
    marks = [i for i in range(len(events) - 1)
             if events[i][0] == alloc and events[i][2] == mark[0]
             and events[i + 1][0] == alloc and events[i + 1][2] == mark[1]]
    lo = marks[step] if step < len(marks) else 0
    hi = marks[step + 1] if step + 1 < len(marks) else len(events)
    return [("+" if e[0] == alloc else "-", e[2]) for e in events[lo:hi]
            if e[0] in (alloc, free)]


def generated_step(requests: Sequence[tuple[int, int]], starts: Sequence[int],
                   step: int) -> list[tuple[str, int]]:
    """(+/-, bytes) of generated step `step` (0-based) of a step program's requests
    ((tensor id, bytes), 0 bytes a free) whose steps begin at `starts`
    (program.step.StepRequests): a free carries the bytes its allocation asked for."""
    sizes: dict[int, int] = {}
    bounds = [*starts, len(requests)]
    out = []
    for k, (tid, size) in enumerate(requests[:bounds[step + 1]]):
        if size:
            sizes[tid] = size
        if k >= bounds[step]:
            out.append(("+", size) if size else ("-", sizes[tid]))
    return out
