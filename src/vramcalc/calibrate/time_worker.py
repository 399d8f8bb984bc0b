"""`python -m vramcalc.calibrate.time_worker JOB`: time several training points of one
model in this process, one after another.

JOB is a JSON object or the path of a file holding one: {"spec": ModelSpec fields,
"weights_dir", "device", "points": [{"id", "plan": TrainPlan fields, "steps"}, ...]}
(the matrix driver adds spec, weights_dir and device to a point's "job"). Step times do not
need a fresh process the way memory peaks do, and a fresh process per point costs its
imports (about 15 s on the H200 machine, calibration/h200/run26-holdout14.log): one
process per model lets a serial time matrix of 30+ points fit a few minutes. Each point
runs `run.measure_point` with NVML polling off (`poll_nvml=False`); its `step_seconds` is
the median of the steps after the first. The matrix driver marks a point timing-grade only
when it ran alone on the GPU (`--max-parallel 1`).

Prints one JSON object on the last line of stdout: {"points": [{"id", "plan", "status",
"step_seconds", "step_seconds_each", "wall_s", "allocated_after_bytes", "error"?}],
"versions", "device_name", "host": `host_probe`}.
A point's error or out-of-memory is its result; the next point still runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

from vramcalc.calibrate.worker import read_job
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

PROBE_OPS = 2000


def host_probe(device: str) -> dict[str, Any]:
    """What the host machine is, beside the step times: the CPU model (/proc/cpuinfo) and
    the host seconds per dispatched operator of a fixed loop (`x.add_(1)` on a one-element
    tensor, PROBE_OPS times, the queue drained before and after; the median of three).
    step_time's HOST_OP_S holds for one host; runs 28 and 30 (both "H100 80GB HBM3",
    the same package versions) wanted 13 and 15-16 us per operator, and neither recorded
    its CPU (docs/time-model.md): this lets the next run say whether the host differs."""
    import platform
    import statistics

    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    on_gpu = device == "cuda" and torch.cuda.is_available()
    x = torch.zeros(1, device="cuda" if on_gpu else "cpu")
    runs = []
    for _ in range(3):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(PROBE_OPS):
            x.add_(1)
        runs.append((time.perf_counter() - t0) / PROBE_OPS)
        if on_gpu:
            torch.cuda.synchronize()
    del x
    if on_gpu:
        torch.cuda.empty_cache()  # the probe's block back: the points start as before
    return {"cpu": cpu, "cpus": os.cpu_count(),
            "op_seconds": round(statistics.median(runs), 9), "device": device}


def time_points(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vramcalc.calibrate.run import measure_point

    spec = ModelSpec.model_validate(job["spec"])
    device = str(job.get("device", "cuda"))
    probe = host_probe(device)
    out: list[dict[str, Any]] = []
    versions: dict[str, Any] = {}
    for raw in job.get("points", []):
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"id": raw.get("id"), "plan": raw.get("plan")}
        try:
            plan = TrainPlan.model_validate(raw.get("plan", {}))
            result = measure_point(spec, plan, job.get("weights_dir"),
                                   steps=int(raw.get("steps", 6)), device=device,
                                   poll_nvml=False)
        except Exception as err:  # a bad point is a result; the next one still runs
            rec.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
        else:
            status = ("oom" if result.get("oom") else "cannot_start"
                      if result.get("cannot_start") else "error" if result.get("error")
                      else "ok")
            rec.update(status=status, step_seconds=result.get("step_seconds"),
                       step_seconds_each=result.get("step_seconds_each"),
                       peak_allocated_bytes=result.get("peak_allocated_bytes"),
                       trainable_params=result.get("trainable_params"))
            if result.get("error"):
                rec["error"] = result["error"]
            versions = result.get("versions", versions)
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        out.append(rec)
        print(f"[time] {rec['id']}: {rec['status']} step {rec.get('step_seconds')} s "
              f"in {rec['wall_s']} s", file=sys.stderr, flush=True)
        gc.collect()
        if device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
            # what the point left behind: a leak would crowd the next points
            rec["allocated_after_bytes"] = torch.cuda.memory_allocated()
    name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() \
        else "cpu"
    return {"points": out, "versions": versions, "timing": True, "device_name": name,
            "host": probe}


def main(argv: list[str]) -> int:
    result = time_points(read_job(argv[0]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
