"""Published multi-GPU training times vs the time of several GPUs (timing/parallel_time.py).

    python bench/published_multi_gpu_time.py

Rows: bench/data/published_multi_gpu_time.yaml (Answer.AI's FSDP-QLoRA benchmarks: each a
run over 1,024 samples on 2-8 GPUs of one machine). Per row: our seconds for the run
(ceil(samples / (gpus x batch)) steps of `parallel_step_time`), the error, and how much of
our step is exposed communication. Then the same rig's FSDP-over-DDP time per sample,
which leaves the one-GPU compute out. No target is claimed for these rows: they are a
different stack (the YAML's header) and what is published is a whole run's time; the
errors are reported as they are (docs/time-model.md "Time on several GPUs").
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.hardware.catalog import resolve_gpu  # noqa: E402
from vramcalc.memory.multi_gpu import ParallelPlan  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.timing.gpu_speed import gpu_link, gpu_speed  # noqa: E402
from vramcalc.timing.parallel_time import ParallelStepTime, parallel_step_time  # noqa: E402

DATA = Path(__file__).parent / "data" / "published_multi_gpu_time.yaml"


def predict(row: dict[str, Any], common: dict[str, Any]) -> ParallelStepTime:
    card = resolve_gpu(row["gpu"])
    speed, link = gpu_speed(card), gpu_link(card)
    assert speed is not None and link is not None, row["id"]
    plan = TrainPlan.model_validate({**common, **row["plan"]})
    par = ParallelPlan(gpus=row["gpus"], strategy="fsdp", sharding_strategy=row["sharding"])
    return parallel_step_time(get_spec(row["model"]), plan, par, speed, link)


def main() -> int:
    data = yaml.safe_load(DATA.read_text(encoding="utf-8"))
    samples, common = data["samples"], data["common"]
    ours: dict[str, float] = {}
    errors: list[float] = []
    print(f"{'id':30} {'published s':>11} {'ours s':>8} {'err %':>7} {'exposed comm':>13}")
    for row in data["rows"]:
        pt = predict(row, common)
        steps = math.ceil(samples / (row["gpus"] * row["plan"]["batch_size"]))
        pred = steps * pt.step_seconds
        ours[row["id"]] = pred
        err = 100.0 * (pred - row["seconds"]) / row["seconds"]
        errors.append(err)
        print(f"{row['id']:30} {row['seconds']:11,} {pred:8,.0f} {err:+7.1f} "
              f"{100 * pt.communication_share:12.1f}%")
    print(f"median |error| {statistics.median(abs(e) for e in errors):.1f} % over "
          f"{len(errors)} rows, signed median {statistics.median(errors):+.1f} %")
    print("FSDP over DDP, time per sample on the same rig:")
    seconds = {r["id"]: r["seconds"] for r in data["rows"]}
    for fsdp, ddp in data["pairs"]:
        print(f"  {fsdp} / {ddp}: published {seconds[fsdp] / seconds[ddp]:.3f}, "
              f"ours {ours[fsdp] / ours[ddp]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
