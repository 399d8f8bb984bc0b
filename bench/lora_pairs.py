"""LoRA vs full fine-tuning, measured in pairs: the step-time ratios of a pair matrix.

    python bench/lora_pairs.py RESULTS.jsonl [PREDICTIONS.json]

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
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from time_accuracy import gpu_of, timed_points  # noqa: E402

DEFAULT_PREDICTIONS = ROOT / "calibration" / "matrices" / "h100-lorapair-predictions.json"


def kind(plan: dict[str, Any]) -> str:
    """full, lora, nf4 (QLoRA) or lora+<optimizer> when a LoRA plan has full's optimizer."""
    method = str(plan.get("method", "qlora"))
    if method == "qlora":
        return str(plan.get("quant", "nf4"))
    if method == "lora" and plan.get("optimizer") == "adamw_torch_fused":
        return "lora-fused"
    return method


def host_root(spec_name: str, layers: int | None, plan: dict[str, Any], gpu: str,
              measured: float) -> float | None:
    """The host factor at which the time model gives `measured` (None: none in 0.05-20)."""
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
    at = step_at_host(train_work(spec, TrainPlan.model_validate(plan)), speed)
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


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or any(a.startswith("--") for a in argv):
        print("usage: lora_pairs.py RESULTS.jsonl [PREDICTIONS.json]", file=sys.stderr)
        return 2
    try:
        lines = Path(argv[0]).read_text(encoding="utf-8").splitlines()
        preds = json.loads(Path(argv[1] if len(argv) > 1 else DEFAULT_PREDICTIONS)
                           .read_text(encoding="utf-8"))
        gpu = gpu_of(lines)
        predicted = {str(p["id"]): float(p.get("by_gpu", {}).get(gpu, p["step_seconds"]))
                     for p in preds["points"]}
        points, skipped = timed_points(lines)
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
