"""Step-time accuracy on a timing run: measured vs pre-registered step_seconds.

    python bench/time_accuracy.py RESULTS.jsonl [PREDICTIONS.json] [--current] [--points]
                                  [--fit]

RESULTS is the matrix driver's output (`python -m vramcalc.calibrate.matrix ...`): one line
per matrix point; a `vramcalc.calibrate.time_worker` point holds several timed points in
`measurement.points`, a plain training point its own `measurement.step_seconds`.
PREDICTIONS (default: calibration/matrices/h200-time1-predictions.json; time holdout 2:
calibration/matrices/h200-time2-predictions.json) are the step times committed before the
run, for the H200 (`step_seconds`) and the H100 SXM (`by_gpu`): the
card the time workers report (`device_name`) picks which. `--current` also shows the time
model as it is now, which is not a holdout result once the model has changed; with
`--host-probe` the current model's host time is scaled by each record's host probe
(`measurement.host.op_seconds`, since run 31) over `step_time.HOST_PROBE_REF_S`.

`--fit` searches the efficiencies (matmul, attention, memory) and a host-time factor that
minimize the median |error| on this run and prints them with their errors: what to write
into gpu_speed.yaml as `measured` for the card's generation. Fitted on the run itself, so
its errors are not a holdout result.

Only timing-grade records count: the point ran alone on the GPU (`timing_grade`, from
`--max-parallel 1`); others are listed and left out. Targets (issue 30): median |error|
<= 10 %, p90 <= 25 %. Exit code 0 when both are met, 3 when not, 1 on bad input.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_PREDICTIONS = ROOT / "calibration" / "matrices" / "h200-time1-predictions.json"
MEDIAN_TARGET = 10.0
P90_TARGET = 25.0


def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def p90(values: list[float]) -> float:
    a = sorted(values)
    return a[min(len(a) - 1, int(round(0.9 * (len(a) - 1))))]


def timed_points(lines: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every timed point of the result lines: (points, ids left out and why). A point is
    {"id", "plan", "spec", "layers", "step_seconds", "timing_grade"}."""
    points: list[dict[str, Any]] = []
    skipped: list[str] = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"line {n + 1}: not JSON ({err.msg})") from None
        meas = rec.get("measurement") or {}
        grade = bool(rec.get("timing_grade"))
        subs = meas.get("points")
        if subs is None:
            subs = [{"id": rec.get("id"), "plan": rec.get("plan"), "status": rec.get("status"),
                     "step_seconds": meas.get("step_seconds")}]
        elif rec.get("status") != "ok":
            skipped.append(f"{rec.get('id')}: {rec.get('status')}")
        for sub in subs:
            sid = str(sub.get("id"))
            secs = sub.get("step_seconds")
            if sub.get("status") != "ok" or not isinstance(secs, (int, float)) or secs <= 0:
                skipped.append(f"{sid}: {sub.get('status')} {sub.get('error', '')}".strip())
                continue
            if not grade:
                skipped.append(f"{sid}: not timing-grade (ran beside other points)")
                continue
            probe = (meas.get("host") or {}).get("op_seconds")
            points.append({"id": sid, "plan": sub.get("plan") or {}, "spec": rec.get("spec"),
                           "layers": rec.get("layers"), "step_seconds": float(secs),
                           "probe_s": float(probe) if isinstance(probe, (int, float))
                           and probe > 0 else None})
    return points, skipped


def gpu_of(lines: list[str]) -> str:
    """The catalog GPU the predictions are read for: h100-sxm when the time workers ran on
    an H100, else h200."""
    for line in lines:
        if '"device_name"' in line and "H100" in line:
            return "h100-sxm"
    return "h200"


def current_prediction(spec_name: str, layers: int | None, plan: dict[str, Any],
                       gpu: str = "h200", probe_s: float | None = None) -> float:
    """The time model as it is now; with `probe_s` (the record's `measurement.host.op_seconds`)
    the host time scaled by probe_s / HOST_PROBE_REF_S (step_time.host_factor_of_probe)."""
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.resolve import resolve_model
    from vramcalc.models.spec import depth_cut
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import host_factor_of_probe, step_time, train_work

    base = spec_name.split("@")[0]
    spec = resolve_model(base)
    spec = depth_cut(spec, layers) if layers else spec
    speed = gpu_speed(resolve_gpu(gpu))
    assert speed is not None
    if probe_s is not None:
        speed = speed._replace(host_factor=speed.host_factor * host_factor_of_probe(probe_s))
    return step_time(train_work(spec, TrainPlan.model_validate(plan)), speed).step_seconds


def fit(points: list[dict[str, Any]], gpu: str) -> None:
    """Grid search of (matmul, attention, memory, host factor) on the run's points."""
    import itertools

    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.resolve import resolve_model
    from vramcalc.models.spec import depth_cut
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import step_time, train_work

    base = gpu_speed(resolve_gpu(gpu))
    assert base is not None
    works = []
    for p in points:
        spec = resolve_model(str(p["spec"]).split("@")[0])
        spec = depth_cut(spec, p["layers"]) if p["layers"] else spec
        works.append((train_work(spec, TrainPlan.model_validate(p["plan"])), p["step_seconds"]))
    grid = itertools.product([x / 20 for x in range(6, 17)], [x / 20 for x in range(4, 15)],
                             [x / 20 for x in range(10, 20)], [x / 4 for x in range(2, 13)])
    best: tuple[float, float, tuple[float, ...]] | None = None
    for mm, att, mem, host in grid:
        speed = base._replace(matmul_efficiency=mm, attention_efficiency=att,
                              memory_efficiency=mem, host_factor=host)
        errs = [abs(pct(step_time(w, speed).step_seconds, m)) for w, m in works]
        score = (statistics.median(errs), p90(errs))
        if best is None or score < best[:2]:
            best = (*score, (mm, att, mem, host))
    assert best is not None
    mm, att, mem, host = best[2]
    print(f"fitted on this run ({gpu}, {len(works)} points; seen, not a holdout): matmul "
          f"{mm:.2f}, attention {att:.2f}, memory {mem:.2f}, host factor {host:.2f}: "
          f"median |err| {best[0]:.1f} %, p90 {best[1]:.1f} %")


def label(plan: dict[str, Any]) -> str:
    method = str(plan.get("method", "qlora"))
    if method == "qlora":
        method = str(plan.get("quant", "nf4"))
    ckpt = "ckpt" if plan.get("gradient_checkpointing", True) else "no-ckpt"
    return f"{method:5} {ckpt:7} b{plan.get('batch_size', 1):<2} s{plan.get('seq_len', 512)}"


def report(points: list[dict[str, Any]], predicted: dict[str, float],
           current: dict[str, float] | None, show_points: bool) -> tuple[float, float, int]:
    """Print the table and the summary; returns (median |err|, p90 |err|, n)."""
    errors: list[float] = []
    by_method: dict[str, list[float]] = {}
    rows = []
    for p in points:
        pred = predicted.get(p["id"])
        if pred is None:
            continue
        err = pct(pred, p["step_seconds"])
        errors.append(err)
        by_method.setdefault(label(p["plan"]).split()[0], []).append(err)
        cur = current.get(p["id"]) if current else None
        rows.append((p["id"], label(p["plan"]), p["step_seconds"], pred, err, cur))
    if show_points:
        head = f"{'id':26} {'plan':26} {'meas s':>9} {'pred s':>9} {'err %':>7}"
        print(head + (f" {'now s':>9} {'err %':>7}" if current else ""))
        for pid, lab, meas, pred, err, cur in rows:
            line = f"{pid[:26]:26} {lab:26} {meas:9.4f} {pred:9.4f} {err:7.1f}"
            if cur is not None:
                line += f" {cur:9.4f} {pct(cur, meas):7.1f}"
            print(line)
    if not errors:
        print("no timing-grade point with a prediction")
        return float("nan"), float("nan"), 0
    absolute = [abs(e) for e in errors]
    med, top = statistics.median(absolute), p90(absolute)
    signed = statistics.median(errors)
    print(f"pre-registered step time: n={len(errors)} median |err| {med:.1f} % "
          f"(target <= {MEDIAN_TARGET:.0f}), p90 {top:.1f} % (target <= {P90_TARGET:.0f}), "
          f"worst {max(absolute):.1f} %, median signed {signed:+.1f} %")
    for method, errs in sorted(by_method.items()):
        print(f"  {method:5} n={len(errs):2d} median |err| "
              f"{statistics.median([abs(e) for e in errs]):5.1f} %  signed "
              f"{statistics.median(errs):+6.1f} %")
    if current:
        now = [abs(pct(current[p["id"]], p["step_seconds"])) for p in points
               if p["id"] in current]
        signed_now = [pct(current[p["id"]], p["step_seconds"]) for p in points
                      if p["id"] in current]
        print(f"current model (not a holdout): median |err| {statistics.median(now):.1f} %, "
              f"p90 {p90(now):.1f} %, worst {max(now):.1f} %, median signed "
              f"{statistics.median(signed_now):+.1f} %")
        now_by: dict[str, list[float]] = {}
        for p in points:
            if p["id"] in current:
                now_by.setdefault(label(p["plan"]).split()[0], []).append(
                    pct(current[p["id"]], p["step_seconds"]))
        for method, errs in sorted(now_by.items()):
            print(f"  now {method:5} n={len(errs):2d} median |err| "
                  f"{statistics.median([abs(e) for e in errs]):5.1f} %  signed "
                  f"{statistics.median(errs):+6.1f} %")
    return med, top, len(errors)


def read_run(results: Path, predictions: Path) -> tuple[
        str, dict[str, float], list[dict[str, Any]], list[str], str]:
    """The card a time run's workers report, each point's predicted step seconds for that
    card (a predictions file's `by_gpu`, else its `step_seconds`), the timing-grade points
    with the ids left out (`timed_points`), and the predictions' note ("" if none)."""
    lines = results.read_text(encoding="utf-8").splitlines()
    preds = json.loads(predictions.read_text(encoding="utf-8"))
    gpu = gpu_of(lines)
    predicted = {str(p["id"]): float(p.get("by_gpu", {}).get(gpu, p["step_seconds"]))
                 for p in preds["points"]}
    points, skipped = timed_points(lines)
    return gpu, predicted, points, skipped, str(preds.get("note") or "")


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--current", "--points", "--fit", "--host-probe"}
    if not args or len(args) > 2 or unknown or ("--host-probe" in flags
                                                and "--current" not in flags):
        print("usage: time_accuracy.py RESULTS.jsonl [PREDICTIONS.json] [--current "
              "[--host-probe]] [--points] [--fit]", file=sys.stderr)
        return 2
    try:
        gpu, predicted, points, skipped, note = read_run(
            Path(args[0]), Path(args[1]) if len(args) > 1 else DEFAULT_PREDICTIONS)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    current = None
    if "--current" in flags:
        probe = "--host-probe" in flags
        current = {p["id"]: current_prediction(str(p["spec"]), p["layers"], p["plan"], gpu,
                                               p["probe_s"] if probe else None)
                   for p in points}
        if probe:
            probes = sorted({p["probe_s"] for p in points if p["probe_s"]})
            print(f"--host-probe: the records' host probes {probes or 'none (factor 1)'} s per "
                  "operator scale the host time (step_time.host_factor_of_probe)")
    if note:
        print(f"predictions: {note}")
    print(f"predictions read for: {gpu}")
    med, top, n = report(points, predicted, current, "--points" in flags)
    for s in skipped:
        print(f"left out: {s}")
    missing = [p["id"] for p in points if p["id"] not in predicted]
    if missing:
        print(f"no prediction for: {', '.join(missing)}")
    if "--fit" in flags and points:
        fit(points, gpu)
    return 0 if n and med <= MEDIAN_TARGET and top <= P90_TARGET else 3


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
