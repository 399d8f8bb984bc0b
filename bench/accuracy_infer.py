"""Inference and merge estimates vs the H200 measurements: run 3 (calibration/h200/
run3-infer.jsonl, the points the inference model was written and fixed on) and run 5 (the
pre-registered holdout, calibration/matrices/h200-infer-holdout.json, measured in
calibration/h200/run5-infer-holdout-snaps.jsonl).

    python bench/accuracy_infer.py [--run run3|run5|run6]
    python bench/accuracy_infer.py --records RUN.jsonl --matrix MATRIX.json

Joins each record to its point of the run's matrix by id and prints,
per point, the measured peak (torch allocated, reserved, NVML process peak = device), the
pre-registered prediction (committed in the matrix before measuring) and the current
estimate (`estimate_inference` / `estimate_merge` now), with relative errors. Then the
median and worst |error| of both, and the out-of-memory verdicts: a point is called
out-of-memory when its required_device_bytes exceeds what an empty H200 offers
(cudaMemGetInfo free, calibration/h200/run1-gpu.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.calibrate.matrix import point_spec  # noqa: E402
from vramcalc.memory.inference import estimate_inference, estimate_merge  # noqa: E402
from vramcalc.memory.result import Estimate  # noqa: E402
from vramcalc.plans import InferPlan, MergePlan  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "calibration"
RUNS: dict[str, tuple[Path | tuple[Path, ...], Path, str]] = {  # run -> (records, matrix, title)
    "run3": (ROOT / "h200" / "run3-infer.jsonl", ROOT / "matrices" / "h200-infer2.json",
             "run 3: the points the model was written and fixed on (not a holdout)"),
    "run5": (ROOT / "h200" / "run5-infer-holdout-snaps.jsonl",
             ROOT / "matrices" / "h200-run5.json",
             "run 5: the PRE-REGISTERED holdout (predictions committed before measuring)"),
    "run6": (ROOT / "h200" / "run6-holdout3.jsonl", ROOT / "matrices" / "h200-run6.json",
             "run 6: PRE-REGISTERED holdout 2, after the sliding-window fix"),
    "run27": (ROOT / "h100" / "run27-infer-holdout3.jsonl",
              ROOT / "matrices" / "h200-infer-holdout3.json",
              "run 27 (H100): PRE-REGISTERED inference holdout 3, generate() replayed"),
    # the points of run 29's first call that crashed for a full disk ran in its second
    "run29": ((ROOT / "h100" / "run29-infer-holdout4.jsonl",
               ROOT / "h100" / "run29b-infer-holdout4.jsonl"),
              ROOT / "matrices" / "h200-infer-holdout4.json",
              "run 29 (H100): PRE-REGISTERED inference holdout 4, 10 generate() + 4 merges"),
    "run31": (ROOT / "h100" / "run31-infer-holdout5.jsonl",
              ROOT / "matrices" / "h200-infer-holdout5.json",
              "run 31: PRE-REGISTERED inference holdout 5, 12 generate() after run 29's traces"),
    "run33": (ROOT / "h100" / "run33-infer6.jsonl",
              ROOT / "matrices" / "h100-infer-holdout6.json",
              "run 33: PRE-REGISTERED inference holdout 6, 12 generate() after run 32's "
              "prefill order (seen since: ip00, ip10, ip11 traced in run 34b)"),
    "run36": (ROOT / "h100" / "run36-infer7.jsonl",
              ROOT / "matrices" / "h100-infer-holdout7.json",
              "run 36: PRE-REGISTERED inference holdout 7, 12 generate() after run 34/34b's "
              "mechanisms (predictions at 9aac1c5)"),
    "run39": (ROOT / "h100" / "run39-infer8.jsonl",
              ROOT / "matrices" / "h100-infer-holdout8.json",
              "run 39: PRE-REGISTERED inference holdout 8, 8 generate() (6 int8) after run 36's "
              "int8 trace"),
}
H200_USABLE = 149557477376  # run1-gpu.txt: mem_get_info free of an empty H200


def current_estimate(point: dict[str, Any]) -> Estimate:
    spec = point_spec(point)
    job = point["job"]
    if job["task"] == "merge":
        return estimate_merge(spec, MergePlan.model_validate(job["plan"]))
    return estimate_inference(spec, InferPlan.model_validate(job["plan"]))


def describe(point: dict[str, Any]) -> str:
    plan = point["job"]["plan"]
    adapter = plan.get("adapter_dtype", "fp32")
    if point["job"]["task"] == "merge":
        return f"merge {plan.get('base_quant', 'none')} on {plan.get('on', 'gpu')}"
    return (f"b{plan['batch_size']} p{plan['prompt_len']} n{plan['new_tokens']} "
            f"{plan['quant']}{' merged' if plan.get('merged') else ''}"
            f"{' ' + plan['cache'] if plan.get('cache', 'dynamic') != 'dynamic' else ''}"
            f"{' ad-' + adapter if adapter != 'fp32' else ''}")


def err(est: int | None, meas: int | None) -> float | None:
    if est is None or not meas:
        return None
    return est / meas - 1


def summary(name: str, vals: list[float]) -> str:
    if not vals:
        return f"{name}: no points"
    a = sorted(abs(x) for x in vals)
    n = len(a)
    med = a[n // 2] if n % 2 else (a[n // 2 - 1] + a[n // 2]) / 2
    p90 = a[min(n - 1, -(-9 * n // 10) - 1)]  # nearest rank
    return (f"{name}: n={n} median |err| {100 * med:.2f}%  p90 {100 * p90:.2f}%  "
            f"worst {100 * a[-1]:.2f}%")


def pct(x: float | None) -> str:
    return "     -" if x is None else f"{100 * x:6.1f}"


def main(argv: list[str]) -> int:
    if "--records" in argv:  # a new run: its records and the matrix it ran
        report(Path(argv[argv.index("--records") + 1]), Path(argv[argv.index("--matrix") + 1]),
               "records " + argv[argv.index("--records") + 1])
        return 0
    runs = [argv[argv.index("--run") + 1]] if "--run" in argv else list(RUNS)
    for run in runs:
        report(*RUNS[run])
        print()
    return 0


def report(records_path: Path | tuple[Path, ...], matrix_path: Path, title: str) -> None:
    """One run's table and summaries; a run of several calls gives its record files in
    order, and a point's last ok record counts (else its last record)."""
    print(f"== {title}")
    points = {p["id"]: p for p in json.loads(matrix_path.read_text())["points"]
              if p.get("worker") == "vramcalc.calibrate.infer_worker"}
    paths = records_path if isinstance(records_path, tuple) else (records_path,)
    last: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["id"] in points and (r.get("status") == "ok"
                                      or last.get(r["id"], {}).get("status") != "ok"):
                last[r["id"]] = r
    records = list(last.values())
    keys = ("alloc", "reserved", "device")
    errs: dict[str, dict[str, list[float]]] = {
        who: {k: [] for k in keys} for who in ("pre", "now")}
    by_task: dict[str, dict[str, list[float]]] = {}
    verdicts = []
    print(f"{'id':28} {'model':16} {'plan':30} {'meas GiB':>8} {'pre GiB':>8} {'now GiB':>8} "
          f"{'pre%':>6} {'now%':>6} {'res pre%':>8} {'res now%':>8} {'dev pre%':>8} "
          f"{'dev now%':>8} phase")
    for rec in sorted(records, key=lambda r: r["id"]):
        point = points[rec["id"]]
        pre = point["prediction"]
        now = current_estimate(point)
        model = point["spec"] + (f"@{point['layers']}L" if point.get("layers")
                                 and "@" not in point["spec"] else "")
        if rec["status"] != "ok":
            verdicts.append((rec["id"], rec["status"], pre["required_device_bytes"],
                             now.required_device_bytes))
            print(f"{rec['id'][:28]:28} {model[:16]:16} {describe(point)[:30]:30} "
                  f"{rec['status']:>8} {pre['peak_allocated_bytes'] / GiB:8.2f} "
                  f"{now.peak_allocated_bytes / GiB:8.2f}")
            continue
        meas = rec["measurement"]
        m = {"alloc": meas.get("peak_allocated_bytes"),
             "reserved": meas.get("peak_reserved_bytes"),
             "device": meas.get("nvml_process_peak") or None}
        e_pre = {"alloc": err(pre["peak_allocated_bytes"], m["alloc"]),
                 "reserved": err(pre["peak_reserved_bytes"], m["reserved"]),
                 "device": err(pre["peak_device_bytes"], m["device"])}
        e_now = {"alloc": err(now.peak_allocated_bytes, m["alloc"]),
                 "reserved": err(now.peak_reserved_bytes, m["reserved"]),
                 "device": err(now.peak_device_bytes, m["device"])}
        for k in keys:
            if e_pre[k] is not None:
                errs["pre"][k].append(e_pre[k])  # type: ignore[arg-type]
            if e_now[k] is not None:
                errs["now"][k].append(e_now[k])  # type: ignore[arg-type]
        task = point["job"]["task"]
        for k in keys:
            slot = by_task.setdefault(f"{k}, {task}", {"pre": [], "now": []})
            if e_pre[k] is not None and e_now[k] is not None:
                slot["pre"].append(e_pre[k])  # type: ignore[arg-type]
                slot["now"].append(e_now[k])  # type: ignore[arg-type]
        verdicts.append((rec["id"], "ok", pre["required_device_bytes"],
                         now.required_device_bytes))
        print(f"{rec['id'][:28]:28} {model[:16]:16} {describe(point)[:30]:30} "
              f"{m['alloc'] / GiB:8.2f} {pre['peak_allocated_bytes'] / GiB:8.2f} "
              f"{now.peak_allocated_bytes / GiB:8.2f} {pct(e_pre['alloc'])} "
              f"{pct(e_now['alloc'])} {pct(e_pre['reserved']):>8} {pct(e_now['reserved']):>8} "
              f"{pct(e_pre['device']):>8} {pct(e_now['device']):>8} {now.peak_phase}"
              # cudaMalloc failed and the allocator freed its cache to retry: the GPU was
              # shared and short, so the reserved bytes are not those of plentiful memory
              + (f" (alloc retries {meas['num_alloc_retries']}: reserved under pressure)"
                 if meas.get("num_alloc_retries") else ""))
    print()
    for who, label in (("pre", "pre-registered"), ("now", "current model")):
        for k in keys:
            print(summary(f"{label:14} peak {k:9}", errs[who][k]))
        for task, slot in sorted(by_task.items()):
            print(summary(f"{label:14} peak {task}", slot[who]))
        print()
    print(f"out-of-memory verdicts (required_device_bytes vs {H200_USABLE / GiB:.2f} GiB usable "
          f"on an empty H200):")
    for who, idx in (("pre-registered", 2), ("current model", 3)):
        right = wrong = 0
        for v in verdicts:
            if v[1] == "timeout":
                continue
            predicted_oom = v[idx] > H200_USABLE
            if predicted_oom == (v[1] == "oom"):
                right += 1
            else:
                wrong += 1
        print(f"  {who:14}: {right} of {right + wrong} right")
    for v in verdicts:
        if v[1] != "ok":
            print(f"  {v[0]}: {v[1]}; required pre-registered {v[2] / GiB:.1f} GiB, "
                  f"now {v[3] / GiB:.1f} GiB"
                  + ("" if v[1] == "timeout" else
                     f" -> {'right' if v[3] > H200_USABLE else 'WRONG'}"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
