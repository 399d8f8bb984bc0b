"""generate()'s request program replayed on the caching allocator (infer_requests.py):
the decode shortcuts against the replay of every step, the cost against the token count,
the breakdown against the peak, and the peaks against the committed H200 records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from vramcalc.calibrate.matrix import point_spec
from vramcalc.memory.inference import estimate_inference, estimate_merge
from vramcalc.memory.program.infer import infer_program_peaks
from vramcalc.models.spec import ModelSpec, depth_cut, get_spec
from vramcalc.plans import InferPlan, MergePlan

ROOT = Path(__file__).resolve().parents[3] / "calibration"


def cut(name: str, layers: int) -> ModelSpec:
    return get_spec(name).model_copy(update={"num_hidden_layers": layers,
                                             "expected_params": None})


# plans of the committed records (run3/run5/run6) and a few more, at 2-4 layers
AGREEING = [
    ("llama-3.1-8b", 4, InferPlan(batch_size=1, prompt_len=128, new_tokens=600)),
    ("llama-3.1-8b", 4, InferPlan(batch_size=4, prompt_len=1024, new_tokens=512)),
    ("llama-2-7b", 2, InferPlan(batch_size=8, prompt_len=512, new_tokens=600)),
    ("llama-2-7b", 2, InferPlan(batch_size=8, prompt_len=512, new_tokens=600, quant="none")),
    ("gemma-2-2b", 4, InferPlan(batch_size=1, prompt_len=4096, new_tokens=300)),
    ("gemma-2-2b", 4, InferPlan(batch_size=8, prompt_len=256, new_tokens=200)),
    ("qwen2.5-1.5b", 4, InferPlan(batch_size=4, prompt_len=256, new_tokens=300)),
    ("phi-3-mini", 2, InferPlan(batch_size=2, prompt_len=4096, new_tokens=400)),
    ("llama-3.1-8b", 2, InferPlan(batch_size=2, prompt_len=128, new_tokens=150, attn="eager")),
]


@pytest.mark.parametrize(("name", "layers", "plan"), AGREEING)
def test_shortcut_agrees_with_every_step(name: str, layers: int, plan: InferPlan) -> None:
    spec = cut(name, layers)
    short = infer_program_peaks(spec, plan)
    full = infer_program_peaks(spec, plan, shortcut=False)
    assert full.steps_replayed == plan.new_tokens - 1
    assert short.steps_replayed < full.steps_replayed
    assert short.peak_reserved == full.peak_reserved
    assert short.peak_allocated == full.peak_allocated


def test_closed_form_tail_against_every_step() -> None:
    """Past the point where the cache tensors outgrow every other segment, the decode's
    reserved memory is summed in closed form. Measured against the replay of every step:
    60 MiB (2.6 %) under on this plan; the test holds it to that."""
    spec = cut("llama-2-7b", 2)
    plan = InferPlan(batch_size=2, prompt_len=64, new_tokens=3000, quant="none")
    short = infer_program_peaks(spec, plan)
    full = infer_program_peaks(spec, plan, shortcut=False)
    assert short.closed_form_bytes > 0
    assert short.peak_allocated == full.peak_allocated
    assert abs(short.peak_reserved - full.peak_reserved) <= 0.03 * full.peak_reserved


def test_cost_does_not_grow_with_new_tokens() -> None:
    spec = cut("llama-2-7b", 2)
    plan = InferPlan(batch_size=2, prompt_len=64, new_tokens=3000, quant="none")
    few = infer_program_peaks(spec, plan)
    many = infer_program_peaks(spec, plan.model_copy(update={"new_tokens": 10**6}))
    assert many.requests == few.requests
    assert many.steps_replayed == few.steps_replayed
    assert many.peak_reserved > few.peak_reserved  # the closed form still counts the growth
    # and at 64 new tokens (every step replayed) no more requests than that
    short = infer_program_peaks(spec, plan.model_copy(update={"new_tokens": 64}))
    assert short.requests <= few.requests


# 2**24 - prompt new tokens: the largest plan the input rules allow (issue 28)
LONGEST = 2**24 - 128


@pytest.mark.parametrize(("name", "layers", "settings"), [
    ("llama-3.1-8b", 4, {}),
    ("llama-3.1-8b", 4, {"quant": "int8"}),
    ("llama-3.1-8b", 4, {"quant": "none"}),
    ("llama-3.1-8b", 4, {"attn": "eager"}),
    ("llama-3.1-8b", 4, {"attn": "eager", "quant": "int8"}),
    ("llama-3.1-8b", 4, {"attn": "eager", "quant": "none"}),
    ("gemma-2-2b", 4, {}),  # eager, sliding layers
    ("mistral-7b", 4, {}),  # every layer sliding (window 4096)
    ("qwen2.5-0.5b", 4, {"attn": "eager", "batch_size": 16}),
])
def test_cost_independent_of_new_tokens(name: str, layers: int,
                                        settings: dict[str, Any]) -> None:
    """The decode jumps from crossing to crossing and ends in a closed form: the same
    requests for 2**20 and 2**24 - 128 new tokens, and the longest plan in < 2 s of CPU."""
    spec = cut(name, layers)
    few = infer_program_peaks(spec, InferPlan(prompt_len=128, new_tokens=2**20, **settings))
    start = time.process_time()
    many = infer_program_peaks(spec, InferPlan(prompt_len=128, new_tokens=LONGEST, **settings))
    assert time.process_time() - start < 2
    assert many.requests == few.requests
    assert many.steps_replayed == few.steps_replayed
    assert many.peak_allocated >= few.peak_allocated


def _against_every_step(name: str, layers: int, plan: InferPlan) -> tuple[int, int, int]:
    """(shortcut - every step) peak reserved and peak allocated, and the tail's bytes."""
    spec = cut(name, layers)
    short = infer_program_peaks(spec, plan)
    full = infer_program_peaks(spec, plan, shortcut=False)
    return (short.peak_reserved - full.peak_reserved,
            short.peak_allocated - full.peak_allocated, short.closed_form_bytes)


# eager decodes that reach the closed form read from the observed levels (_eager_profile);
# llama-3.1-8b int8 at batch 8 reached it until int8's subB (the down projection's outlier
# columns dequantized, o x cols x 4 bytes, program.infer._int8_matmul) entered the decode
# step: it is now replayed to its end (equal to every step), batch 16 takes the tail
EAGER_EXACT = [
    ("llama-3.1-8b", 2, InferPlan(batch_size=16, prompt_len=128, new_tokens=3000,
                                  attn="eager", quant="int8")),
    ("llama-3.1-8b", 2, InferPlan(batch_size=8, prompt_len=128, new_tokens=3000, attn="eager",
                                  quant="none")),
    ("qwen2.5-0.5b", 2, InferPlan(batch_size=16, prompt_len=128, new_tokens=3000,
                                  attn="eager")),
]


@pytest.mark.parametrize(("name", "layers", "plan"), EAGER_EXACT)
def test_eager_tail_against_every_step(name: str, layers: int, plan: InferPlan) -> None:
    reserved, allocated, tail = _against_every_step(name, layers, plan)
    assert tail > 0
    assert reserved == 0
    # a cache tensor's block keeps a remainder of up to 1 MiB unsplit (should_split): the
    # blocks the shortcut's last steps land in may differ by that much
    assert abs(allocated) <= 2 * 2**20


# Measured (shortcut - every step), peak reserved: the shortcut's state drifts from the
# every-step replay's across the skipped steps (the cache tensors rotate through their
# blocks once per step, the shortcut rotates them once per gap); the closed forms add
# exactly what the replayed continuation adds (same figures with the tails turned off).
# Since new segments take descending addresses and the adapter is read from its file
# (infer7): -158 -> -190, 2 -> 0, -726 -> -574, 186 -> 2, -1246 -> -44, -42 -> 0 MiB.
MISSES = [
    ("llama-2-7b", 2, InferPlan(batch_size=2, prompt_len=64, new_tokens=3000, quant="none"),
     -60),
    ("llama-3.1-8b", 2, InferPlan(batch_size=4, prompt_len=128, new_tokens=4000, quant="int8"),
     -190),
    ("qwen2.5-0.5b", 2, InferPlan(batch_size=16, prompt_len=128, new_tokens=3000), 0),
    ("smollm2-1.7b", 2, InferPlan(batch_size=8, prompt_len=64, new_tokens=2000, merged=True),
     -574),
    # -110 before eager attention's probabilities were allocated before the masked scores
    # are freed (program.infer._attention, run 32 trace), +186 MiB after
    ("llama-3.1-8b", 2, InferPlan(batch_size=8, prompt_len=128, new_tokens=3000, attn="eager"),
     2),
    ("llama-2-7b", 2, InferPlan(batch_size=8, prompt_len=64, new_tokens=3000, attn="eager"),
     -44),
    ("gemma-2-2b", 2, InferPlan(batch_size=8, prompt_len=128, new_tokens=3000), 0),
]


@pytest.mark.parametrize(("name", "layers", "plan", "miss_mib"), MISSES)
def test_known_misses_against_every_step(name: str, layers: int, plan: InferPlan,
                                         miss_mib: int) -> None:
    """Passes once a miss is fixed; a miss that changes size fails (update the table)."""
    reserved, _, _ = _against_every_step(name, layers, plan)
    if reserved != 0:
        assert round(reserved / 2**20) == miss_mib
        pytest.xfail(f"shortcut {miss_mib:+d} MiB vs every step: placement drift across "
                     "skipped decode steps")


@pytest.mark.parametrize("plan", [
    InferPlan(), InferPlan(batch_size=32, prompt_len=1024, new_tokens=256),
    InferPlan(new_tokens=1), InferPlan(quant="none", cache="static", new_tokens=64),
    InferPlan(quant="int8", batch_size=4, new_tokens=64), InferPlan(merged=True),
])
def test_components_sum_to_the_peak(plan: InferPlan) -> None:
    est = estimate_inference(cut("llama-3.1-8b", 4), plan)
    assert est.total == est.peak_device_bytes
    assert all(v >= 0 for _, v in est.components.items())
    assert est.peak_reserved_bytes >= est.peak_allocated_bytes


def _records() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    runs = [("h200/run3-infer.jsonl", "matrices/h200-infer2.json"),
            ("h200/run5-infer-holdout-snaps.jsonl", "matrices/h200-run5.json"),
            ("h200/run6-holdout3.jsonl", "matrices/h200-run6.json")]
    out = []
    for rec_path, matrix_path in runs:
        points = {p["id"]: p for p in json.loads((ROOT / matrix_path).read_text())["points"]}
        for line in (ROOT / rec_path).read_text().splitlines():
            rec = json.loads(line)
            point = points.get(rec["id"])
            if (point is None or rec["status"] != "ok"
                    or point.get("worker") != "vramcalc.calibrate.infer_worker"
                    or point["job"]["task"] != "infer"):
                continue
            out.append((rec["id"], point, rec["measurement"]))
    return out


def test_against_the_committed_records() -> None:
    """The H200 inference records (61 points, bench/accuracy_infer.py). Measured with
    this program: peak allocated worst 1.42 % (ih20), peak device median 1.9 %."""
    alloc, device = [], []
    for _id, point, meas in _records():
        est = estimate_inference(point_spec(point), InferPlan.model_validate(point["job"]["plan"]))
        alloc.append(abs(est.peak_allocated_bytes / meas["peak_allocated_bytes"] - 1))
        device.append(abs(est.peak_device_bytes / meas["nvml_process_peak"] - 1))
    assert len(alloc) == 61
    assert max(alloc) <= 0.015
    assert sorted(device)[len(device) // 2] <= 0.03


def test_merge_replay_against_the_committed_records() -> None:
    """merge_and_unload() on the GPU: reserved from the load and merge requests replayed
    (8 records of runs 3 and 5; measured: device worst 4.94 %, inf32, was 9.05 %)."""
    runs = [("h200/run3-infer.jsonl", "matrices/h200-infer2.json"),
            ("h200/run5-infer-holdout-snaps.jsonl", "matrices/h200-run5.json")]
    device = []
    for rec_path, matrix_path in runs:
        points = {p["id"]: p for p in json.loads((ROOT / matrix_path).read_text())["points"]}
        for line in (ROOT / rec_path).read_text().splitlines():
            rec = json.loads(line)
            point = points.get(rec["id"])
            if (point is None or rec["status"] != "ok"
                    or point.get("job", {}).get("task") != "merge"):
                continue
            est = estimate_merge(point_spec(point), MergePlan.model_validate(point["job"]["plan"]))
            assert est.total == est.peak_device_bytes
            assert est.peak_reserved_bytes >= est.peak_allocated_bytes
            device.append(abs(est.peak_device_bytes / rec["measurement"]["nvml_process_peak"] - 1))
    assert len(device) == 8
    assert max(device) <= 0.05


def test_bitsandbytes_dequantizes_only_where_its_dispatch_says() -> None:
    """bitsandbytes 0.50.2 gemm_4bit (backends/cuda/ops.py, sm90): the fused kernel for up
    to 4 rows at any shape; the whole weight dequantized past 1536 rows, for an inner size
    off the 64-block grid, and where `_gemm_4bit_use_custom_cuda` prefers dequant + linear
    (llama-2-7b's MLP, 172 column blocks: fused up to 32 rows)."""
    from vramcalc.memory.program.weights import gemm_4bit_dequantizes

    assert not any(gemm_4bit_dequantizes(m, 11008, 4096) for m in (1, 2, 3, 4))
    assert not gemm_4bit_dequantizes(32, 11008, 4096)
    assert gemm_4bit_dequantizes(33, 11008, 4096)
    assert gemm_4bit_dequantizes(512, 11008, 4096)
    assert gemm_4bit_dequantizes(2048, 64, 64)
    assert gemm_4bit_dequantizes(8, 4096, 4100)  # 4100 is not a multiple of 64
    # a small weight with a short inner size (K < N / 2): fused up to 512 rows at low wave
    assert not gemm_4bit_dequantizes(512, 2048, 512)
    assert gemm_4bit_dequantizes(513, 2048, 512)


def test_a_small_batch_decode_step_makes_no_dequantized_weight() -> None:
    """At batch 4 the decode steps of an nf4 generate() call the fused kernel: none of
    their requests is a dequantized MLP weight: three per layer (gate, up, down) come from
    loading (the 16-bit weight before it is quantized) and three from the prefill (512
    rows), none from the 7 decode steps (which would add 42)."""
    import vramcalc.memory.program.infer as infer

    spec = depth_cut(get_spec("llama-2-7b"), 2)
    plan = InferPlan(batch_size=4, prompt_len=128, new_tokens=8, quant="nf4")
    seen: list[int] = []
    original = infer.replay_requests

    def record(reqs: Any, **kw: Any) -> Any:
        seen.extend(size for _, size in reqs)
        return original(reqs, **kw)

    infer.replay_requests = record  # type: ignore[assignment]
    try:
        infer.infer_program_peaks(spec, plan, shortcut=False)
    finally:
        infer.replay_requests = original  # type: ignore[assignment]
    mlp_weight = spec.intermediate_size * spec.hidden_size * 2
    assert seen.count(mlp_weight) == 2 * 3 * spec.num_hidden_layers
