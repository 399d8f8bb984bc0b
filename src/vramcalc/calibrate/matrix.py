"""Measure a matrix of points in parallel on one GPU, one fresh worker process per point.

    python -m vramcalc.calibrate.matrix MATRIX.json --out OUT.jsonl --weights-cache DIR \\
        [--max-parallel 8] [--gpu-budget-gib 120] [--deadline-s 500] [--device cuda|cpu]

MATRIX is a JSON list of points (or {"points": [...]}), each:
  {"id": "p1", "spec": catalog name | inline spec dict, "layers": 4 (optional depth cut),
   "plan": {TrainPlan fields}, "steps": 3, "snapshot": false, "task": "train",
   "prep": "peft" | "axolotl" | "llama-factory" | "unsloth", "gc_reentrant": true | false (optional:
   the model prepared as that trainer does it, calibrate/run.py TRAINER_PREPS)}
A point may name another worker module and its job instead:
  {"id": "i1", "worker": "vramcalc.calibrate.infer_worker", "job": {...},
   "spec": ..., "layers": ..., "reserve_gib": 10}
Such a worker gets its job plus "device" (and "spec", "weights_dir" when the point has a
spec) as a JSON file path in argv[1], and prints one JSON object on its last stdout line.

Timing: every record says how many points ran at once beside it (`max_running`) and
whether its step times are timing-grade (`timing_grade`: it ran alone). Time a matrix
with `--max-parallel 1`; points of `vramcalc.calibrate.time_worker` time several plans of
one model in one process.

Order of work: random bf16 weights are built once per distinct (spec, layers) into
--weights-cache (kept between runs), two builds at a time; then points run largest first,
admitted only while the sum of the running points' estimated peak device bytes (the raw
`estimate()` of the depth-cut spec, +30% + 2 GiB) stays under --gpu-budget-gib, at most
--max-parallel at once. An out-of-memory error is a result; a worker that crashes or
runs past its timeout is recorded with its stderr tail; every result is one line appended
to OUT.jsonl. No point is launched once the deadline is near; those are listed at the
end (and written as `"status": "not_run"` lines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vramcalc.memory.result import Estimate
from vramcalc.models.resolve import resolve_model
from vramcalc.models.spec import ModelSpec, depth_cut
from vramcalc.plans import LOOP_NAMES, TrainPlan, current_loop_names
from vramcalc.units import GiB

TRAIN_WORKER = "vramcalc.calibrate.worker"
SAFETY_FACTOR = 1.3
SAFETY_BYTES = 2 * GiB
DEFAULT_RESERVE_GIB = 8.0  # a point of another worker that names no reserve_gib
STDERR_TAIL = 2000
# Bytes per parameter that full fine-tuning holds for certain (weights + grads + AdamW
# states): a floor under the estimate, which under-predicted some full MoE points by up to
# 27 % (calibration/h200/run1-design.jsonl), so that neighbours are not squeezed.
FULL_FLOOR_BYTES = {"bf16": 2 + 2 + 4, "fp16": 2 + 2 + 4, "fp32": 4 + 4 + 8}


@dataclass
class Point:
    """One matrix entry, resolved."""

    id: str
    raw: dict[str, Any]
    spec: ModelSpec | None
    layers: int | None
    plan: TrainPlan | None
    worker: str
    job: dict[str, Any]
    prediction: dict[str, Any] | None = None
    need_bytes: int = 0
    weights_dir: str | None = None
    error: str | None = None


@dataclass
class Running:
    point: Point
    proc: subprocess.Popen[bytes]
    started: float
    timeout_s: float
    stdout: IO[bytes]
    stderr: IO[bytes]
    job_path: str
    extra: dict[str, Any] = field(default_factory=dict)


def matrix_points(data: Any) -> list[Any]:
    """The points of a matrix file (its JSON: `{"points": [...]}` or the list itself), their
    plans in today's loop names: a file without `loop_names` predates issue 27 and names
    the Trainer-built plain loops `plain*` (plans.current_loop_names)."""
    raw = data.get("points", []) if isinstance(data, dict) else data
    names = int(data.get("loop_names", 1)) if isinstance(data, dict) else 1
    return [{**p, "plan": current_loop_names(p["plan"], names)}
            if isinstance(p, dict) and isinstance(p.get("plan"), dict) else p
            for p in raw]


def point_spec(raw: dict[str, Any]) -> ModelSpec:
    """A matrix point's model: its "spec" (catalog name, path or inline spec), cut to
    "layers" decoder layers when given."""
    value = raw["spec"]
    spec = ModelSpec.model_validate(value) if isinstance(value, dict) else resolve_model(
        str(value))
    return depth_cut(spec, int(raw["layers"])) if raw.get("layers") else spec


def emulated_card_bytes(est: Estimate, limit_bytes: int) -> int:
    """What a card emulated with `memory_limit_gib` offers the fit rule: the limit caps
    torch's reserved bytes only (set_per_process_memory_fraction), so the CUDA context and
    managed (paged) memory come on top, as they lie outside torch on a real card."""
    return limit_bytes + est.components.cuda_context + est.paged_bytes


def _need_bytes(spec: ModelSpec, plan: TrainPlan, predicted_device: int) -> int:
    floor = 0
    if plan.method == "full":
        floor = spec.num_params() * FULL_FLOOR_BYTES[plan.load_dtype]
    elif plan.method == "lora":
        floor = spec.num_params() * {"fp32": 4}.get(plan.load_dtype, 2)
    return int(max(predicted_device, floor) * SAFETY_FACTOR) + SAFETY_BYTES


def load_points(raw_points: list[dict[str, Any]]) -> list[Point]:
    """Resolve specs, depth cuts, plans and predictions; a bad point is kept with `error`."""
    from vramcalc.calibrate.run import prep_error
    from vramcalc.calibrate.store import Prediction
    from vramcalc.errors import PlanError
    from vramcalc.memory.estimate import estimate

    points: list[Point] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_points):
        pid = str(raw.get("id", f"p{n}"))
        if pid in seen:
            pid = f"{pid}#{n}"
        seen.add(pid)
        point = Point(id=pid, raw=raw, spec=None, layers=raw.get("layers"), plan=None,
                      worker=str(raw.get("worker", TRAIN_WORKER)), job=dict(raw.get("job", {})))
        try:
            if raw.get("spec") is not None:
                point.spec = point_spec(raw)
            if point.worker == TRAIN_WORKER:
                if point.spec is None:
                    raise ValueError("a train point needs a spec")
                point.plan = TrainPlan.model_validate(raw.get("plan", {}))
                why = prep_error(point.plan, str(raw.get("prep", "peft")),
                                 raw.get("gc_reentrant"))
                if why is not None:
                    raise ValueError(why)
                try:
                    est = estimate(point.spec, point.plan)
                except PlanError as err:  # predicted not to start: run it to see
                    point.prediction = {"cannot_start": str(err)}
                    point.need_bytes = int(float(raw.get("reserve_gib", 8)) * GiB)
                else:
                    point.prediction = Prediction.of(est).model_dump(mode="json")
                    point.need_bytes = _need_bytes(point.spec, point.plan,
                                                   est.peak_device_bytes)
                limit = raw.get("memory_limit_gib")
                if limit is not None:  # an emulated smaller card: it cannot take more
                    point.need_bytes = min(point.need_bytes, int((float(limit) + 1.5) * GiB))
            else:
                reserve = float(raw.get("reserve_gib", DEFAULT_RESERVE_GIB))
                point.need_bytes = int(reserve * GiB)
                point.prediction = raw.get("prediction")
        except Exception as err:  # recorded as the point's result, the rest still runs
            point.error = f"bad point: {type(err).__name__}: {' '.join(str(err).split())}"[:500]
        points.append(point)
    return points


def _weights_key(spec: ModelSpec) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in spec.name)


def _weights_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# Headroom kept free on the weights disk beyond one model's bf16 safetensors.
DISK_HEADROOM = 2 * 2**30


def disk_shortfall(spec: ModelSpec, cache: Path) -> str | None:
    """Why the bf16 weights of `spec` cannot be written under `cache`, or None. A full disk
    mid-write left three points of run 6 unmeasured (`No space left on device`)."""
    import shutil

    need = 2 * spec.num_params() + DISK_HEADROOM
    free = shutil.disk_usage(cache).free
    if free >= need:
        return None
    return (f"not enough disk for the weights: {need / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free under {cache} (use a larger --weights-cache disk)")


def build_one(spec: ModelSpec, out_dir: Path, device: str, timeout_s: float) -> str | None:
    """Build random weights in a fresh process; None on success, else the error tail."""
    if _weights_ready(out_dir):
        return None
    short = disk_shortfall(spec, out_dir.parent)
    if short is not None:
        return short
    tmp = out_dir.with_name(out_dir.name + ".partial")
    code = (
        "import json, sys; from vramcalc.models.spec import ModelSpec;"
        "from vramcalc.calibrate.weights import save_random_weights;"
        "save_random_weights(ModelSpec.model_validate(json.loads(sys.argv[1])), sys.argv[2],"
        " device=sys.argv[3])"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, spec.model_dump_json(), str(tmp), device],
            capture_output=True, text=True, timeout=timeout_s, env=_child_env(None, 4),
        )
    except subprocess.TimeoutExpired:
        return f"building weights timed out after {timeout_s:.0f} s"
    if proc.returncode != 0:
        return f"building weights failed (exit {proc.returncode}): {proc.stderr[-STDERR_TAIL:]}"
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return None


def build_weights(points: list[Point], cache: Path, device: str, parallel: int,
                  timeout_s: float) -> dict[str, float]:
    """Weights once per distinct depth-cut spec (skipped when cached); sets weights_dir."""
    by_key: dict[str, ModelSpec] = {}
    for p in points:
        if p.spec is not None and p.error is None and (p.worker == TRAIN_WORKER
                                                        or p.raw.get("needs_weights", True)):
            key = _weights_key(p.spec)
            by_key.setdefault(key, p.spec)
            p.weights_dir = str(cache / key)
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def job(key: str) -> tuple[str, str | None, float]:
        t0 = time.perf_counter()
        err = build_one(by_key[key], cache / key, device, timeout_s)
        return key, err, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for key, err, secs in pool.map(job, sorted(by_key)):
            timings[key] = round(secs, 2)
            print(f"[weights] {key}: {'ok' if err is None else 'FAILED'} in {secs:.1f} s",
                  flush=True)
            if err is not None:
                for p in points:
                    if p.weights_dir == str(cache / key):
                        p.error = err
    return timings


def _child_env(plan: TrainPlan | None, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if plan is not None and plan.expandable_segments:
        conf = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if "expandable_segments" not in conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                x for x in (conf, "expandable_segments:True") if x
            )
    elif plan is not None:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # measure the default allocator
    return env


def _trace_file(point: Point, trace_dir: Path | None) -> str | None:
    """Where a point with `"snapshot": true` writes its whole allocator trace: under
    `--trace-dir`, none without it."""
    if trace_dir is None or not point.raw.get("snapshot"):
        return None
    return str(trace_dir.resolve() / f"{point.id}.json.gz")


def _job_for(point: Point, device: str, trace_dir: Path | None = None) -> dict[str, Any]:
    if point.worker == TRAIN_WORKER:
        assert point.spec is not None and point.plan is not None
        return {
            "spec": point.spec.model_dump(mode="json"),
            "plan": point.plan.model_dump(mode="json"),
            "weights_dir": point.weights_dir,
            "steps": int(point.raw.get("steps", 3)),
            "snapshot": bool(point.raw.get("snapshot", False)),
            "memory_limit_gib": point.raw.get("memory_limit_gib"),
            "trace_file": _trace_file(point, trace_dir),
            "device": device,
            "prep": str(point.raw.get("prep", "peft")),
            "gc_reentrant": point.raw.get("gc_reentrant"),
        }
    job = dict(point.job)
    job["device"] = device
    trace_file = _trace_file(point, trace_dir)
    if trace_file:
        job["trace_file"] = trace_file
    if point.spec is not None:
        job.setdefault("spec", point.spec.model_dump(mode="json"))
        job.setdefault("weights_dir", point.weights_dir)
    return job


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - STDERR_TAIL))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_json(path: str) -> dict[str, Any] | None:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def status_of(measurement: dict[str, Any]) -> str:
    if measurement.get("oom"):
        return "oom"
    if measurement.get("cannot_start"):
        return "cannot_start"
    if measurement.get("error"):
        return "error"
    return "ok"


def append_line(out: Path, record: dict[str, Any]) -> None:
    """One JSON line, written with a single O_APPEND write (whole lines only)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _record(point: Point, status: str, measurement: dict[str, Any] | None,
            wall_s: float | None, max_running: int | None = None) -> dict[str, Any]:
    """One result line. `timing_grade` is true only for a point that ran alone on the GPU
    (`max_running` == 1): neighbours share the GPU's compute and memory bandwidth, so the
    step times of points run side by side are not the card's."""
    return {
        "id": point.id,
        "status": status,
        "spec": point.spec.name if point.spec is not None else point.raw.get("spec"),
        "layers": point.layers,
        "worker": point.worker,
        "task": point.raw.get("task", "train"),
        "plan": point.plan.model_dump(mode="json") if point.plan is not None else None,
        "loop_names": LOOP_NAMES,  # the plan's loop names (plans.current_loop_names)
        "steps": point.raw.get("steps", 3) if point.worker == TRAIN_WORKER else None,
        "admitted_bytes": point.need_bytes,
        "prediction": point.prediction,
        "measurement": measurement,
        "wall_s": wall_s,
        "max_running": max_running,
        "timing_grade": max_running == 1,
        # how the model was prepared (calibrate/run.py TRAINER_PREPS), where the point says
        **{k: point.raw[k] for k in ("prep", "gc_reentrant") if k in point.raw},
    }


def run_points(points: list[Point], out: Path, device: str, max_parallel: int,
               budget_bytes: int, deadline_s: float, point_timeout_s: float,
               launch_margin_s: float, t_start: float, trace_dir: Path | None = None
               ) -> dict[str, dict[str, Any]]:
    """Run every point, several at once under the byte budget; returns id -> record.
    Snapshot points write their whole allocator trace under `trace_dir` if given."""
    records: dict[str, dict[str, Any]] = {}
    pending = [p for p in points if p.error is None]
    for p in points:
        if p.error is not None:
            records[p.id] = _record(p, "cannot_start", {"error": p.error, "cannot_start": True},
                                    None)
            append_line(out, records[p.id])
    pending.sort(key=lambda p: -p.need_bytes)  # largest first
    running: list[Running] = []
    threads = max(1, (os.cpu_count() or 2) // max(1, max_parallel))
    scratch = Path(tempfile.mkdtemp(prefix="vramcalc-matrix-"))

    def in_use() -> int:
        return sum(r.point.need_bytes for r in running)

    def finish(r: Running, status: str | None, note: str | None) -> None:
        r.stdout.close()
        r.stderr.close()
        wall = round(time.perf_counter() - r.started, 2)
        measurement = None if status in ("timeout", "killed_at_deadline") else _last_json(
            r.stdout.name)
        if measurement is None:
            status = status or "crash"
            measurement = {"error": note or f"worker exit {r.proc.returncode}",
                           "stderr_tail": _tail(r.stderr.name)}
        else:
            status = status_of(measurement)
            if r.proc.returncode != 0:
                measurement["worker_exit"] = r.proc.returncode
        rec = _record(r.point, status, measurement, wall, int(r.extra.get("max_running", 1)))
        records[r.point.id] = rec
        append_line(out, rec)
        m = measurement.get("peak_allocated_bytes")
        print(f"[{len(records)}/{len(points)}] {r.point.id}: {status}"
              + (f" alloc {m / GiB:.2f} GiB" if isinstance(m, int) else "")
              + f" in {wall:.1f} s", flush=True)

    try:
        while pending or running:
            now = time.perf_counter() - t_start
            # reap
            for r in list(running):
                elapsed = time.perf_counter() - r.started
                if r.proc.poll() is not None:
                    running.remove(r)
                    finish(r, None, None)
                elif elapsed > r.timeout_s or now > deadline_s:
                    r.proc.kill()
                    r.proc.wait()
                    running.remove(r)
                    why = "timeout" if elapsed > r.timeout_s else "killed_at_deadline"
                    finish(r, why, f"worker {why} after {elapsed:.0f} s")
            # launch
            if now < deadline_s - launch_margin_s:
                for p in list(pending):
                    if len(running) >= max_parallel:
                        break
                    fits = in_use() + p.need_bytes <= budget_bytes
                    if not fits and running:
                        continue  # a smaller point may fit now (largest first, then backfill)
                    pending.remove(p)
                    running.append(_launch(p, device, scratch, threads, point_timeout_s,
                                           max(1.0, deadline_s - now), trace_dir))
            elif not running:
                break
            for r in running:  # how many points shared the GPU with each, at most
                r.extra["max_running"] = max(int(r.extra.get("max_running", 1)), len(running))
            time.sleep(0.1)

    finally:  # the workers' job files and output tails
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)

    for p in pending:
        records[p.id] = _record(p, "not_run", {"error": "deadline reached before launch"},
                                None)
        append_line(out, records[p.id])
    return records


def _launch(p: Point, device: str, scratch: Path, threads: int, point_timeout_s: float,
            left_s: float, trace_dir: Path | None) -> Running:
    job_path = scratch / f"{_weights_key_id(p.id)}.job.json"
    job_path.write_text(json.dumps(_job_for(p, device, trace_dir)), encoding="utf-8")
    stdout = open(scratch / f"{_weights_key_id(p.id)}.out", "wb")  # noqa: SIM115
    stderr = open(scratch / f"{_weights_key_id(p.id)}.err", "wb")  # noqa: SIM115
    env = _child_env(p.plan, threads)
    # The worker's own temp folder inside the scratch folder: what a worker killed at its
    # timeout leaves (HF Trainer's output_dir, random weights) goes with the scratch.
    worker_tmp = scratch / f"{_weights_key_id(p.id)}.tmp"
    worker_tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(worker_tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", p.worker, str(job_path)],
        stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
    )
    print(f"[launch] {p.id} ({p.need_bytes / GiB:.1f} GiB admitted)", flush=True)
    return Running(p, proc, time.perf_counter(), min(point_timeout_s, left_s), stdout, stderr,
                   str(job_path))


def _weights_key_id(pid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in pid)


def table(points: list[Point], records: dict[str, dict[str, Any]]) -> str:
    """id, method, status, measured peak allocated, predicted, error % (measured base)."""
    rows = [f"{'id':<28} {'method':<7} {'status':<13} {'meas GiB':>9} {'pred GiB':>9} "
            f"{'err %':>7}"]
    for p in points:
        rec = records.get(p.id, {})
        meas = (rec.get("measurement") or {}).get("peak_allocated_bytes")
        pred = (rec.get("prediction") or {}).get("peak_allocated_bytes")
        method = p.plan.method if p.plan is not None else str(p.raw.get("task", "-"))
        m = f"{meas / GiB:9.2f}" if isinstance(meas, int) and meas > 0 else f"{'-':>9}"
        q = f"{pred / GiB:9.2f}" if isinstance(pred, int) else f"{'-':>9}"
        e = (f"{100 * (pred - meas) / meas:7.1f}"
             if isinstance(meas, int) and meas > 0 and isinstance(pred, int) else f"{'-':>7}")
        rows.append(f"{p.id[:28]:<28} {method:<7} {rec.get('status', '-'):<13} {m} {q} {e}")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vramcalc.calibrate.matrix")
    ap.add_argument("matrix", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights-cache", type=Path, required=True)
    ap.add_argument("--max-parallel", type=int, default=8)
    ap.add_argument("--gpu-budget-gib", type=float, default=120.0)
    ap.add_argument("--deadline-s", type=float, default=500.0)
    ap.add_argument("--point-timeout-s", type=float, default=240.0)
    ap.add_argument("--launch-margin-s", type=float, default=30.0,
                    help="launch nothing once fewer seconds than this are left")
    ap.add_argument("--build-parallel", type=int, default=2)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--only", default="", help="comma list of point ids to run")
    ap.add_argument("--trace-dir", type=Path, default=None,
                    help="snapshot points also write their whole allocator trace here")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        data = json.loads(args.matrix.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"Error: {args.matrix}: {err}", file=sys.stderr)
        return 1
    raw = matrix_points(data)
    if args.only:
        wanted = set(args.only.split(","))
        raw = [p for p in raw if str(p.get("id")) in wanted]
    points = load_points(raw)
    from vramcalc.errors import OutputFileError
    from vramcalc.user_files import check_writable

    try:  # lines are appended: a regular file or a new path only
        check_writable(args.out, "--out")
    except OutputFileError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    build_timeout = max(30.0, args.deadline_s / 2)
    timings = build_weights(points, args.weights_cache, args.device, args.build_parallel,
                            build_timeout)
    print(f"[weights] {len(timings)} checkpoints ready after "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)
    records = run_points(points, args.out, args.device, args.max_parallel,
                         int(args.gpu_budget_gib * GiB), args.deadline_s, args.point_timeout_s,
                         args.launch_margin_s, t_start, args.trace_dir)
    print(table(points, records))
    not_run = [p.id for p in points if records.get(p.id, {}).get("status") == "not_run"]
    counts: dict[str, int] = {}
    for rec in records.values():
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    print(f"done in {time.perf_counter() - t_start:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if not_run:
        print(f"not run (deadline): {', '.join(not_run)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
