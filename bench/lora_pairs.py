"""LoRA vs full fine-tuning, measured in pairs: the step-time ratios of a pair matrix.

    python bench/lora_pairs.py RESULTS.jsonl [PREDICTIONS.json]
    python bench/lora_pairs.py --host-by-method RESULTS.jsonl ...
    python bench/lora_pairs.py --pairs RESULTS.jsonl ...

RESULTS is the matrix driver's output for calibration/matrices/h100-lorapair.json
(calibration/design_time.py matrix_pairs); PREDICTIONS (default:
calibration/matrices/h100-lorapair-predictions.json) the step times committed before the
run, read for the card the time workers report (bench/time_accuracy.py gpu_of). For each
model and batch: every method's measured and pre-registered step time, the ratios LoRA /
full and QLoRA / full (and LoRA with full's optimizer / full), measured and predicted, and
the host factor each point wants (the `h` with `step_time.step_at_host(work, speed)(h)` =
measured, by bisection on 0.05-20; "-" when no factor reaches it: the point is GPU-bound
beyond the host's reach, or faster than the model's GPU time). If the model counts LoRA's
host work right, the host-bound points of one machine want about the same factor,
whatever their method (docs/time-model.md "LoRA vs full fine-tuning on a small model").
Only timing-grade points count (time_accuracy.timed_points). Exit 0, or 1 on bad input.

`--host-by-method` reads any timing runs (the committed time holdouts have no full/LoRA
pair: their plans are drawn apart) and prints, per run, the median host factor its
host-bound points want per method (host-bound: the model's host time at factor 1 more than
HOST_BOUND x its GPU time): the test of LoRA's host operators without pairs, since one
machine's host costs the same per operator whichever method issues it; and the median
signed error of its GPU-bound points per method (the model's GPU time more than its host
time at factor 1): LoRA's adapter kernels (the `lora` class) against full's weight
gradients and optimizer where the GPU decides; then, over all the files, the median signed
error per method of the GPU-bound, balanced (host / GPU within HOST_BOUND) and host-bound
points.

`--pairs` lists, per file, the timing-grade points that share model, depth, batch,
sequence, checkpointing and loop but not the method, with the measured and predicted
ratio of their step times.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from time_accuracy import gpu_of, read_run, timed_points  # noqa: E402

DEFAULT_PREDICTIONS = ROOT / "calibration" / "matrices" / "h100-lorapair-predictions.json"
HOST_BOUND = 1.5
ORDER = ["full", "lora", "lora-fused", "nf4", "fp4", "int8"]  # a pair's ratio: later / earlier


def kind(plan: dict[str, Any]) -> str:
    """full, lora, nf4 (QLoRA) or lora+<optimizer> when a LoRA plan has full's optimizer."""
    method = str(plan.get("method", "qlora"))
    if method == "qlora":
        return str(plan.get("quant", "nf4"))
    if method == "lora" and plan.get("optimizer") == "adamw_torch_fused":
        return "lora-fused"
    return method


def _at(spec_name: str, layers: int | None, plan: dict[str, Any], gpu: str) -> Any:
    """step_time.step_at_host of the plan on the catalog `gpu`."""
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.resolve import resolve_model
    from vramcalc.models.spec import depth_cut
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import step_at_host, train_work

    spec = resolve_model(spec_name.split("@")[0])
    spec = depth_cut(spec, layers) if layers else spec
    speed = gpu_speed(resolve_gpu(gpu))
    assert speed is not None
    return step_at_host(train_work(spec, TrainPlan.model_validate(plan)), speed)


def host_root(spec_name: str, layers: int | None, plan: dict[str, Any], gpu: str,
              measured: float, host_bound: float = 0.0) -> float | None:
    """The host factor at which the time model gives `measured` (None: none in 0.05-20, or
    the model's host time at factor 1 is not more than `host_bound` x its GPU time)."""
    at = _at(spec_name, layers, plan, gpu)
    one = at(1.0)
    if one.host_seconds <= host_bound * one.gpu_seconds:
        return None
    lo, hi = 0.05, 20.0
    if not at(lo).step_seconds <= measured <= at(hi).step_seconds:
        return None
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if at(mid).step_seconds < measured:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def host_by_method(paths: list[str]) -> int:
    import statistics

    print(f"median host factor of the host-bound points (host > {HOST_BOUND} x GPU at "
          "factor 1), per run and method: n, median [min-max]")
    regimes: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            points, _ = timed_points(lines)
        except (OSError, ValueError) as err:
            print(f"Error: {err}", file=sys.stderr)
            return 1
        gpu = gpu_of(lines)
        by: dict[str, list[float]] = {}
        gpu_bound: dict[str, list[float]] = {}
        for p in points:
            k = kind(p["plan"]).replace("-fused", "")
            h = host_root(str(p["spec"]), p["layers"], p["plan"], gpu, p["step_seconds"],
                          HOST_BOUND)
            if h is not None:
                by.setdefault(k, []).append(h)
            one = _at(str(p["spec"]), p["layers"], p["plan"], gpu)(1.0)
            err = 100 * (one.step_seconds - p["step_seconds"]) / p["step_seconds"]
            if one.gpu_seconds > one.host_seconds:
                gpu_bound.setdefault(k, []).append(err)
            x = one.host_seconds / one.gpu_seconds
            regime = ("GPU-bound" if x < 1 / HOST_BOUND else "host-bound" if x > HOST_BOUND
                      else "balanced")
            regimes.setdefault(regime, {}).setdefault(k, []).append(err)
        cells = [f"{k} {len(v)}, {statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"
                 for k, v in sorted(by.items())]
        print(f"{Path(path).name} ({gpu}): " + "; ".join(cells))
        cells = [f"{k} {len(v)}, {statistics.median(v):+.1f} %"
                 for k, v in sorted(gpu_bound.items())]
        print("  GPU-bound (GPU > host at factor 1), median signed error: " + "; ".join(cells))
    print(f"all runs, median signed error at factor 1 by the model's host / GPU ratio "
          f"(GPU-bound < 1/{HOST_BOUND}, balanced, host-bound > {HOST_BOUND}):")
    for regime in ("GPU-bound", "balanced", "host-bound"):
        cells = [f"{k} {len(v)}, {statistics.median(v):+.1f} %"
                 for k, v in sorted(regimes.get(regime, {}).items())]
        print(f"  {regime}: " + "; ".join(cells))
    return 0


def same_setting_pairs(paths: list[str]) -> int:
    """Timing-grade points of one file with the same model, depth, batch, sequence,
    checkpointing and loop but another method: measured and predicted ratios, the method
    later in ORDER over the earlier."""
    print("same-setting pairs (one file: model, depth, batch, sequence, checkpointing, "
          "loop), method b / method a: measured, predicted at factor 1")
    n = 0
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            points, _ = timed_points(lines)
        except (OSError, ValueError) as err:
            print(f"Error: {path}: {err}", file=sys.stderr)
            return 1
        gpu = gpu_of(lines)
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for p in points:
            pl = p["plan"]
            if "method" not in pl:
                continue
            key = (p["spec"], p["layers"], pl.get("batch_size", 1), pl.get("seq_len", 512),
                   pl.get("gradient_checkpointing", True), pl.get("loop", "trainer"))
            groups.setdefault(key, []).append(p)
        for key, ps in groups.items():
            for i, a in enumerate(ps):
                for b in ps[i + 1:]:
                    if kind(a["plan"]) == kind(b["plan"]):
                        continue
                    if ORDER.index(kind(a["plan"])) > ORDER.index(kind(b["plan"])):
                        a, b = b, a
                    pa = _at(str(a["spec"]), a["layers"], a["plan"], gpu)(1.0).step_seconds
                    pb = _at(str(b["spec"]), b["layers"], b["plan"], gpu)(1.0).step_seconds
                    n += 1
                    print(f"{Path(path).name} {key[0]} b{key[2]} s{key[3]} "
                          f"{'ckpt' if key[4] else 'no-ckpt'} {kind(b['plan'])} / "
                          f"{kind(a['plan'])}: {b['step_seconds'] / a['step_seconds']:.2f}, "
                          f"{pb / pa:.2f}")
    print(f"{n} pairs")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--host-by-method"] and len(argv) > 1:
        return host_by_method(argv[1:])
    if argv[:1] == ["--pairs"] and len(argv) > 1:
        return same_setting_pairs(argv[1:])
    if not 1 <= len(argv) <= 2 or any(a.startswith("--") for a in argv):
        print("usage: lora_pairs.py RESULTS.jsonl [PREDICTIONS.json] | --host-by-method "
              "RESULTS.jsonl ... | --pairs RESULTS.jsonl ...", file=sys.stderr)
        return 2
    try:
        gpu, predicted, points, skipped, _ = read_run(
            Path(argv[0]), Path(argv[1]) if len(argv) > 1 else DEFAULT_PREDICTIONS)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(f"predictions read for: {gpu}")
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for p in points:
        if p["id"] not in predicted:
            continue
        key = (str(p["spec"]), int(p["plan"].get("batch_size", 1)))
        groups.setdefault(key, {})[kind(p["plan"])] = p
    print(f"{'model':16} {'batch':>5} {'method':10} {'meas s':>8} {'pred s':>8} {'err %':>7} "
          f"{'host h':>7} {'/full meas':>10} {'/full pred':>10}")
    for (spec, batch), by_kind in sorted(groups.items()):
        full = by_kind.get("full")
        for k in ("full", "lora", "nf4", "lora-fused"):
            p = by_kind.get(k)
            if p is None:
                continue
            meas, pred = p["step_seconds"], predicted[p["id"]]
            h = host_root(spec, p["layers"], p["plan"], gpu, meas)
            ratio = ""
            if full is not None and k != "full":
                ratio = (f"{meas / full['step_seconds']:10.2f} "
                         f"{pred / predicted[full['id']]:10.2f}")
            print(f"{spec:16} {batch:5d} {k:10} {meas:8.4f} {pred:8.4f} "
                  f"{100 * (pred - meas) / meas:7.1f} {'-' if h is None else f'{h:.2f}':>7} "
                  f"{ratio}")
    for s in skipped:
        print(f"left out: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
