"""Draw a fresh inference holdout (for the next GPU session) and pre-register it.

    python calibration/design_infer.py > calibration/matrices/h200-infer-holdout.json
    python calibration/design_infer.py holdout2 > calibration/matrices/h200-infer-holdout2.json
    python calibration/design_infer.py holdout3 > calibration/matrices/h200-infer-holdout3.json
    python calibration/design_infer.py holdout4 > calibration/matrices/h200-infer-holdout4.json
    python calibration/design_infer.py holdout5 > calibration/matrices/h200-infer-holdout5.json
    python calibration/design_infer.py holdout6 > calibration/matrices/h100-infer-holdout6.json
    python calibration/design_infer.py holdout7 > calibration/matrices/h100-infer-holdout7.json
    python calibration/design_infer.py holdout8 > calibration/matrices/h100-infer-holdout8.json

24 generate() points and 3 merges drawn at random (seed 40) over 7 architectures (MHA and
GQA, 32k-256k vocabularies), batch 1-64, prompt 128-32k, new tokens 1-2048, nf4 and bf16
bases, each with the estimate of `vramcalc.memory.inference` at commit time in "prediction".
Nothing here was measured when it was committed: the inference model was corrected on
run 3 (bench/accuracy_infer.py), and this matrix is the holdout that has to confirm it.
Run it as h200-infer2.json was run (calibration/DEVICE.md).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.memory.inference import estimate_inference, estimate_merge  # noqa: E402
from vramcalc.models.spec import depth_cut, get_spec  # noqa: E402
from vramcalc.plans import InferPlan, MergePlan
from vramcalc.units import GiB  # noqa: E402

ARCHS = ["llama-3.1-8b", "llama-2-7b", "qwen2.5-7b", "gemma-2-2b", "phi-3-mini", "mistral-7b",
         "qwen3-8b"]


def main() -> None:
    if sys.argv[1:] == ["holdout2"]:
        holdout2()
        return
    if sys.argv[1:] == ["holdout3"]:
        holdout3()
        return
    if sys.argv[1:] == ["holdout4"]:
        holdout4()
        return
    if sys.argv[1:] == ["holdout5"]:
        holdout5()
        return
    if sys.argv[1:] == ["holdout6"]:
        holdout6()
        return
    if sys.argv[1:] == ["holdout7"]:
        holdout7()
        return
    if sys.argv[1:] == ["holdout8"]:
        holdout8()
        return
    rng = random.Random(40)
    points = []
    while len(points) < 24:
        name = ARCHS[len(points) % len(ARCHS)]
        spec = depth_cut(get_spec(name), 4)
        plan = {"batch_size": rng.choice([1, 2, 4, 8, 16, 32, 64]),
                "prompt_len": rng.choice([128, 512, 1024, 2048, 4096, 8192, 16384, 32768]),
                "new_tokens": rng.choice([1, 16, 64, 256, 1024, 2048]),
                "quant": rng.choice(["nf4", "nf4", "none"]), "rank": rng.choice([8, 16, 64])}
        if plan["batch_size"] * plan["new_tokens"] > 16384:
            continue
        if name == "gemma-2-2b":
            plan["attn"] = "eager"
            plan["prompt_len"] = min(plan["prompt_len"], 4096)
        est = estimate_inference(spec, InferPlan.model_validate(plan))
        if est.peak_device_bytes > 60 * GiB:
            continue
        points.append(_point(f"ih{len(points):02d}-{name}", name, "infer", plan, est))
    for i, (name, plan) in enumerate([
        ("mistral-7b", {"rank": 32, "dtype": "bf16", "on": "gpu", "base_quant": "none"}),
        ("qwen3-8b", {"rank": 16, "dtype": "bf16", "on": "gpu", "base_quant": "none"}),
        ("llama-2-7b", {"rank": 64, "dtype": "fp16", "on": "gpu", "base_quant": "none"}),
    ]):
        spec = depth_cut(get_spec(name), 4)
        est = estimate_merge(spec, MergePlan.model_validate(plan))
        points.append(_point(f"im{i}-{name}", name, "merge", plan, est))
    _print_holdout("pre-registered inference holdout: predictions made before any "
                   "measurement of these points", points)


def holdout2() -> None:
    """12 generate() points, pre-registered after the run-5 fix (sdpa sliding-window
    masks): mistral-7b (window 4096) on both sides of its window, and other archs."""
    rng = random.Random(41)
    points = []
    archs = ["mistral-7b", "mistral-7b", "qwen2.5-7b", "llama-3.1-8b", "mistral-7b",
             "phi-3-mini", "qwen3-8b"]
    while len(points) < 12:
        name = archs[len(points) % len(archs)]
        spec = depth_cut(get_spec(name), 4)
        plan = {"batch_size": rng.choice([1, 2, 4, 8, 16]),
                "prompt_len": rng.choice([1024, 3000, 4096, 6000, 8192, 16384, 24576]),
                "new_tokens": rng.choice([1, 16, 64, 256, 1024]),
                "quant": rng.choice(["nf4", "nf4", "none"]), "rank": rng.choice([8, 16, 64])}
        if plan["batch_size"] * plan["new_tokens"] > 16384:
            continue
        est = estimate_inference(spec, InferPlan.model_validate(plan))
        if est.peak_device_bytes > 60 * GiB:
            continue
        points.append(_point(f"ij{len(points):02d}-{name}", name, "infer", plan, est))
    _print_holdout("pre-registered inference holdout 2 (after the sliding-window fix): "
                   "predictions made before any measurement of these points", points)


FULL_DEPTH = ["qwen2.5-0.5b", "qwen2.5-1.5b", "gemma-2-2b", "llama-3.2-1b", "smollm2-1.7b"]


def holdout3() -> None:
    """16 generate() points pre-registered for issue 27 (peaks from generate()'s requests
    replayed on the caching allocator, infer_requests.py): seed 43, nf4 / int8 / bf16,
    batch 1-32, prompt 128-8192, new tokens 64-1024; 12 at 4 layers over 7 architectures
    and 4 at full depth over small models (FULL_DEPTH). Bounded to fit the matrix runner's
    parallel budget in about 240 s of one H200: estimated peak device <= 40 GiB, batch x
    new tokens <= 8192."""
    points = _generate_draws(random.Random(43), "ik", 16, 12, ARCHS, {
        "batch_size": [1, 2, 4, 8, 16, 32], "prompt_len": [128, 512, 1024, 2048, 4096, 8192],
        "new_tokens": [64, 128, 256, 512, 1024], "quant": ["nf4", "nf4", "int8", "none"],
        "rank": [8, 16, 64]}, max_batch_tokens=8192, max_device_gib=40)
    _print_holdout("pre-registered inference holdout 3 (issue 27: generate() replayed on "
                   "the caching allocator): predictions made before any measurement of these "
                   "points", points)


def holdout4() -> None:
    """Inference holdout 4, pre-registered after run 28 (gemma-2's norms and repeat_kv under
    a mask in the training program; generate() unchanged since holdout 3): seed 44, 10
    generate() points (4 at full depth over FULL_DEPTH, 6 at 4 layers) and 4 merges (2 at
    full depth), sized to share one H100 with three training matrices: estimated peak
    device <= 20 GiB, batch x new tokens <= 4096."""
    points = _generate_draws(random.Random(44), "il", 10, 6, ARCHS, {
        "batch_size": [1, 2, 4, 8, 16, 32], "prompt_len": [128, 512, 1024, 2048, 4096, 8192],
        "new_tokens": [64, 128, 256, 512], "quant": ["nf4", "nf4", "int8", "none"],
        "rank": [8, 16, 64]}, max_batch_tokens=4096, max_device_gib=20)
    for i, (name, layers, plan) in enumerate([
        ("qwen2.5-1.5b", None, {"rank": 16, "dtype": "bf16", "on": "gpu", "base_quant": "none"}),
        ("llama-3.2-1b", None, {"rank": 64, "dtype": "bf16", "on": "gpu", "base_quant": "none"}),
        ("qwen3-8b", 4, {"rank": 32, "dtype": "bf16", "on": "gpu", "base_quant": "none"}),
        ("gemma-2-2b", 4, {"rank": 8, "dtype": "fp16", "on": "gpu", "base_quant": "none"}),
    ]):
        spec = get_spec(name) if layers is None else depth_cut(get_spec(name), layers)
        est = estimate_merge(spec, MergePlan.model_validate(plan))
        points.append(_point(f"in{i}-{name}-{'full' if layers is None else '4L'}", name,
                             "merge", plan, est, layers))
    _print_holdout("pre-registered inference holdout 4 (after run 28): predictions made "
                   "before any measurement of these points", points)


def holdout5() -> None:
    """Inference holdout 5, pre-registered after run 29's trace (bitsandbytes' no-grad 4-bit
    dispatch, repeat_kv under a masked sdpa prefill): seed 45, 12 generate() points where
    those mechanisms act (nf4 at batch 1-16 across the fused / dequantize boundary, prompts
    past mistral-7b's 4096-token window, gemma-2 long prompts), 4 of them at full depth,
    sized like holdout 4 (estimated peak device <= 20 GiB, batch x new tokens <= 4096)."""
    archs = ["mistral-7b", "llama-2-7b", "qwen2.5-7b", "gemma-2-2b", "mistral-7b",
             "llama-3.1-8b", "phi-3-mini", "qwen3-8b"]
    points = _generate_draws(random.Random(45), "io", 12, 8, archs, {
        "batch_size": [1, 2, 4, 6, 8, 16], "prompt_len": [512, 2048, 4096, 5000, 8192],
        "new_tokens": [64, 128, 256, 512], "quant": ["nf4", "nf4", "nf4", "int8", "none"],
        "rank": [8, 16, 64]}, max_batch_tokens=4096, max_device_gib=20)
    _print_holdout("pre-registered inference holdout 5 (after run 29's trace): "
                   "predictions made before any measurement of these points", points)


def holdout6() -> None:
    """Inference holdout 6, pre-registered after run 32's prefill trace (generate()'s
    prefill requests in the order traced: norms, eager attention's copies, peft's output
    cast, bitsandbytes' absmax; required memory on the requested peak): seed 46, 12
    generate() points, 8 at 4 layers over architectures the trace was not read on
    (gemma-2-9b eager, phi-3-mini, qwen2.5-3b, llama-3.2-3b, qwen3-4b, mistral-7b) and 4 at
    full depth, sized like holdouts 4 and 5 (estimated peak device <= 20 GiB, batch x new
    tokens <= 4096)."""
    archs = ["gemma-2-9b", "phi-3-mini", "qwen2.5-3b", "llama-3.2-3b", "qwen3-4b",
             "mistral-7b", "gemma-2-9b", "phi-3-mini"]
    points = _generate_draws(random.Random(46), "ip", 12, 8, archs, {
        "batch_size": [1, 2, 4, 6, 8, 16], "prompt_len": [512, 1024, 2048, 4096, 6000],
        "new_tokens": [64, 128, 256, 512], "quant": ["nf4", "nf4", "int8", "none"],
        "rank": [8, 16, 64]}, max_batch_tokens=4096, max_device_gib=20)
    _print_holdout("pre-registered inference holdout 6 (after run 32's prefill trace): "
                   "predictions made before any measurement of these points", points)


def holdout7() -> None:
    """Inference holdout 7, pre-registered after run 34/34b's traces (phi-3's views and
    copies, new segments at descending addresses, the adapter read from its file): seed 47,
    12 generate() points, 8 at 4 layers over architectures none of those traces was read on
    (qwen2.5-7b, llama-3.1-8b, mistral-7b, qwen3-8b, qwen2.5-3b, llama-3.2-3b), int8 drawn
    more often (ik09's int8 miss is untraced), and 4 at full depth, sized like holdouts 4-6
    (estimated peak device <= 20 GiB, batch x new tokens <= 4096)."""
    archs = ["qwen2.5-7b", "llama-3.1-8b", "mistral-7b", "qwen3-8b", "qwen2.5-3b",
             "llama-3.2-3b", "qwen2.5-7b", "llama-3.1-8b"]
    points = _generate_draws(random.Random(47), "iq", 12, 8, archs, {
        "batch_size": [1, 2, 4, 6, 8, 16], "prompt_len": [512, 1024, 2048, 4096, 8192],
        "new_tokens": [64, 128, 256, 512], "quant": ["nf4", "int8", "int8", "none"],
        "rank": [8, 16, 64]}, max_batch_tokens=4096, max_device_gib=20)
    _print_holdout("pre-registered inference holdout 7 (after run 34/34b's traces): "
                   "predictions made before any measurement of these points", points)


# holdout 8's full-depth models: none in holdouts 6-7, each cached in bf16 at <= 5 GiB
FULL_DEPTH_8 = ["tinyllama-1.1b", "qwen3-1.7b", "gemma-2b"]


def holdout8() -> None:
    """Inference holdout 8, pre-registered after run 36's trace of ik09 (bitsandbytes'
    no-grad int8 matmul chain, program.infer._int8_matmul): seed 48, 8 generate() points,
    6 of them int8: 3 at 4 layers over architectures no inference holdout 6-7 point used
    (mistral-nemo-12b, qwen2.5-14b, gemma-7b) and 3 at full depth over FULL_DEPTH_8
    (tinyllama-1.1b, qwen3-1.7b, gemma-2b); then 2 nf4 / 16-bit points at 4 layers
    (phi-3-medium, qwen3-14b). Batches and prompt lengths are ones holdouts 6-7 did not draw
    (batch 3-24, prompt 768-12288); sized like holdouts 4-7 (estimated peak device <= 20
    GiB, batch x new tokens <= 4096). The drawn points' weights caches (bf16 checkpoints,
    one per model and depth) total 28.2 GiB."""
    rng = random.Random(48)
    sizes = {"batch_size": [3, 5, 12, 24], "prompt_len": [768, 1536, 3072, 6144, 12288],
             "new_tokens": [64, 128, 256, 384]}
    points = _generate_draws(rng, "ir", 6, 3, ["mistral-nemo-12b", "qwen2.5-14b", "gemma-7b"],
                             {**sizes, "quant": ["int8"], "rank": [8, 16, 64]},
                             max_batch_tokens=4096, max_device_gib=20, full_depth=FULL_DEPTH_8)
    points += _generate_draws(rng, "ir", 2, 2, ["phi-3-medium", "qwen3-14b"],
                              {**sizes, "quant": ["nf4", "none"], "rank": [8, 16, 64]},
                              max_batch_tokens=4096, max_device_gib=20, start=len(points))
    _print_holdout("pre-registered inference holdout 8 (after run 36's int8 trace): "
                   "predictions made before any measurement of these points", points)


def _print_holdout(note: str, points: list[dict]) -> None:
    """A holdout's matrix on stdout: its note and its points."""
    json.dump({"note": note, "points": points}, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _generate_draws(rng: random.Random, prefix: str, n: int, cut: int, archs: list[str],
                    choices: dict[str, list], max_batch_tokens: int,
                    max_device_gib: int, full_depth: list[str] | None = None,
                    start: int = 0) -> list[dict]:
    """`n` generate() points drawn by `rng`: the first `cut` at 4 layers over `archs` in
    turn, the rest at full depth over `full_depth` (FULL_DEPTH unless given); each plan key
    drawn from its `choices` in order; a draw whose batch x new tokens passes
    `max_batch_tokens` or whose estimated peak device passes `max_device_gib` is drawn
    again. Ids are `prefix` and the point's number from `start`."""
    full_depth = FULL_DEPTH if full_depth is None else full_depth
    points: list[dict] = []
    while len(points) < n:
        full = len(points) >= cut
        name = (full_depth[rng.randrange(len(full_depth))] if full
                else archs[len(points) % len(archs)])
        layers = None if full else 4
        spec = get_spec(name) if full else depth_cut(get_spec(name), 4)
        plan = {key: rng.choice(options) for key, options in choices.items()}
        if plan["batch_size"] * plan["new_tokens"] > max_batch_tokens:
            continue
        est = estimate_inference(spec, InferPlan.model_validate(plan))
        if est.peak_device_bytes > max_device_gib * GiB:
            continue
        tag = "full" if full else "4L"
        points.append(_point(f"{prefix}{start + len(points):02d}-{name}-{tag}", name, "infer",
                             plan, est, layers))
    return points


def _point(pid: str, name: str, task: str, plan: dict, est: object,
           layers: int | None = 4) -> dict:
    spec = get_spec(name)
    return {"id": pid, "worker": "vramcalc.calibrate.infer_worker", "spec": name,
            "layers": layers,
            "job": {"task": task, "spec": spec.model_dump(mode="json"), "layers": layers,
                    "plan": plan, "device": "cuda"},
            "reserve_gib": round(min(120, max(4, est.peak_device_bytes / GiB * 1.3 + 2)), 1),
            "prediction": {k: getattr(est, k) for k in (
                "peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes",
                "required_device_bytes", "peak_phase")}}


if __name__ == "__main__":
    main()
