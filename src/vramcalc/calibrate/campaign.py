"""Measure a matrix of points, one fresh process per point, appending JSON lines.

`python -m vramcalc.calibrate.campaign MATRIX.json OUT.jsonl [--device cuda]`

MATRIX is a JSON list of {"model": catalog name or spec path, "plan": {TrainPlan fields}}.
Points of one model run together: its random-weight checkpoint is written once, then
removed. An out-of-memory point is a result (oom: true), a crashed or timed-out worker
is recorded with its error; the driver always goes on to the next point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path
from typing import Any

from vramcalc.models.resolve import resolve_model
from vramcalc.plans import TrainPlan

WORKER_TIMEOUT_S = 240
NO_EXTRA = (
    "calibrate needs torch, transformers, bitsandbytes and peft (missing: {}); "
    "pip install 'qlora-vramcalc[calibrate]'"
)


def _run(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def build_weights(model: str, out_dir: str, device: str) -> float:
    t0 = time.perf_counter()
    code = (
        "import sys; from vramcalc.models.resolve import resolve_model;"
        "from vramcalc.calibrate.weights import save_random_weights;"
        "save_random_weights(resolve_model(sys.argv[1]), sys.argv[2], device=sys.argv[3])"
    )
    rc, _, err = _run([sys.executable, "-c", code, model, out_dir, device], timeout=600)
    if rc != 0:
        raise RuntimeError(f"building weights for {model} failed: {err[-2000:]}")
    return time.perf_counter() - t0


def fetch_weights(weights: str) -> str:
    """A local folder as is; otherwise a hub id, downloaded (config + safetensors only)."""
    import stat

    from vramcalc.errors import CalibrationError, MissingExtraError
    from vramcalc.user_files import probe

    local = probe(Path(weights).expanduser(), f"--weights {weights}", CalibrationError)
    if local is not None and stat.S_ISDIR(local.st_mode):
        return str(Path(weights).expanduser())
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtraError(NO_EXTRA.format("huggingface_hub")) from None
    return str(snapshot_download(weights, allow_patterns=["*.json", "*.safetensors"]))


def measure_in_subprocess(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        rc, out, err = _run(
            [sys.executable, "-m", "vramcalc.calibrate.worker", json.dumps(job)],
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        return {"error": f"worker exit {rc}: {err[-1500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def run_matrix(points: list[dict[str, Any]], out_path: Path, device: str, steps: int) -> None:
    scratch = Path(os.environ.get("VRAMCALC_SCRATCH", tempfile.gettempdir()))
    for model, group in groupby(points, key=lambda p: p["model"]):
        spec = resolve_model(model)
        weights = scratch / f"weights-{spec.name}"
        try:
            build_s = build_weights(model, str(weights), device)
        except Exception as err:  # recorded, the next model still runs
            with out_path.open("a") as fh:
                fh.write(json.dumps({"model": spec.name, "error": str(err)}) + "\n")
            continue
        print(f"[{spec.name}] weights built in {build_s:.1f} s", flush=True)
        for point in group:
            plan = TrainPlan.model_validate(point.get("plan", {}))
            job = {
                "spec": spec.model_dump(mode="json"),
                "plan": plan.model_dump(mode="json"),
                "weights_dir": str(weights),
                "steps": steps,
                "device": device,
            }
            result = measure_in_subprocess(job)
            record = {"model": spec.name, "plan": plan.model_dump(mode="json"), **result}
            with out_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            peak = result.get("torch_peak_allocated", 0) / 2**30
            print(
                f"[{spec.name}] b{plan.batch_size} s{plan.seq_len} r{plan.rank} "
                f"gc={int(plan.gradient_checkpointing)} {plan.attn} {plan.optimizer}: "
                f"alloc {peak:.2f} GiB oom={result.get('oom')} err={result.get('error', '')[:200]}"
                f" wall {result.get('process_wall_s')}",
                flush=True,
            )
        shutil.rmtree(weights, ignore_errors=True)


def main(argv: list[str]) -> int:
    matrix, out = Path(argv[0]), Path(argv[1])
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cuda"
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 3
    points = json.loads(matrix.read_text())
    from vramcalc.errors import OutputFileError
    from vramcalc.user_files import check_writable

    try:  # lines are appended: a regular file or a new path only
        check_writable(out, "OUT")
    except OutputFileError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    run_matrix(points, out, device, steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
