"""A user's own timed steps (DATA/runs/*.json from `vramcalc calibrate run`) set the host
factor of the time model (timing/host_calibration.py), in every command and the API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.calibrate import store
from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.models.spec import get_spec
from vramcalc.plans import TrainPlan
from vramcalc.timing.gpu_speed import gpu_speed
from vramcalc.timing.step_time import step_time, train_work

H100_NVML = "NVIDIA H100 80GB HBM3"
H100_BYTES = 81559 * 2**20
# the points a user's `calibrate run` might have timed: small steps (host-bound) and a
# larger one, so the host factor is what sets them
MODEL = "qwen2.5-0.5b"
PLANS = [TrainPlan(batch_size=b, seq_len=s, gradient_checkpointing=c)
         for b, s, c in ((1, 256, True), (2, 512, False), (4, 512, True), (1, 1024, False),
                         (8, 1024, True), (2, 256, False))]


def _data() -> Path:
    return Path(os.environ["VRAMCALC_DATA_DIR"])  # conftest: a temporary folder per test


def _measured(plan: TrainPlan, h: float, gpu: str = "h100-sxm") -> float:
    speed = gpu_speed(resolve_gpu(gpu))
    assert speed is not None
    return step_time(train_work(get_spec(MODEL), plan), speed._replace(host_factor=h)
                     ).step_seconds


def _write_run(h: float, nvml: str = H100_NVML, memory: int = H100_BYTES,
               name: str = "h100-20261207T120000Z.json", gpu: str = "h100-sxm",
               extra: list[dict[str, Any]] | None = None) -> Path:
    """A run file whose every step took what the time model predicts at host factor h."""
    run = store.new_run(store.Environment(gpu_name=nvml, gpu_memory_bytes=memory))
    for plan in PLANS:
        run.points.append(store.RunPoint(model=MODEL, plan=plan, steps=3, measurement={
            "step_seconds": _measured(plan, h, gpu), "peak_allocated_bytes": 1}))
    for m in extra or []:
        run.points.append(store.RunPoint(model=m.pop("model", MODEL), plan=TrainPlan(),
                                         steps=3, measurement=m))
    path = _data() / store.RUNS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_run(path, run)
    return path


def _cli(*args: str) -> Any:
    from vramcalc.cli import app

    return CliRunner().invoke(app, list(args))


PLAN = ["plan", "-m", MODEL, "--gpu", "h100-sxm", "--batch", "2", "--seq-len", "512", "--json"]


def test_fitted_factor_is_the_one_the_steps_were_made_with() -> None:
    from vramcalc.timing.host_calibration import host_fit

    _write_run(1.5, extra=[{"oom": True}, {"error": "boom"}, {"step_seconds": None},
                           {"step_seconds": -1.0}, {"model": "not-a-catalog-model",
                                                    "step_seconds": 0.2}])
    card = resolve_gpu("h100-sxm")
    speed = gpu_speed(card)
    assert speed is not None
    fit = host_fit(card, speed)
    assert fit is not None
    assert fit.factor == 1.5 and fit.steps == len(PLANS) and fit.left_out == 1
    assert fit.median_error_fitted < 1e-6 < fit.median_error_reference
    assert "host factor 1.50 from 6 timed steps on this machine" in fit.note()


def test_plan_json_uses_the_factor_and_says_the_basis() -> None:
    before = _cli(*PLAN)
    assert before.exit_code == 0, before.output
    raw = json.loads(before.stdout)
    assert raw["time_basis"] == "measured" and "host_factor" not in raw
    path = _write_run(1.5)
    out = json.loads(_cli(*PLAN).stdout)
    assert out["time_basis"] == "calibrated" and out["host_factor"] == 1.5
    assert str(path) in out["time_calibration"]
    assert out["step_seconds"] == pytest.approx(_measured(TrainPlan(batch_size=2, seq_len=512,
                                                                    gradient_checkpointing=True
                                                                    ), 1.5), rel=1e-12)
    assert out["step_seconds"] > raw["step_seconds"]  # a slower host than the reference
    # the memory is the same: only the time changes
    assert out["required_device_bytes"] == raw["required_device_bytes"]
    # --no-calibration: the shipped host constants, byte for byte
    assert _cli(*PLAN, "--no-calibration").stdout == before.stdout
    text = _cli(*PLAN[:-1])
    assert "time on h100-sxm (calibrated: host factor 1.50 from 6 timed steps" in text.stdout


def test_no_runs_and_other_gpus_runs_change_nothing() -> None:
    before = _cli(*PLAN).stdout
    (_data() / store.RUNS_DIR).mkdir(parents=True)
    assert _cli(*PLAN).stdout == before  # an empty runs folder
    _write_run(1.5, nvml="NVIDIA A100-SXM4-80GB", memory=81920 * 2**20, gpu="a100-80gb",
               name="a100-20261207T120000Z.json")
    assert _cli(*PLAN).stdout == before  # another GPU's runs
    # ... which apply to that GPU
    a100 = json.loads(_cli(*PLAN[:4], "a100-80gb", *PLAN[5:]).stdout)
    assert a100["time_basis"] == "calibrated" and a100["host_factor"] == 1.5


def test_every_command_and_the_api_give_the_same_step_seconds() -> None:
    from vramcalc.api import train_time

    _write_run(0.8)
    plan = json.loads(_cli(*PLAN).stdout)
    assert plan["host_factor"] == 0.8
    check = json.loads(_cli("check", "-m", MODEL, "--gpu", "h100-sxm", "--batch", "2",
                            "--seq-len", "512", "--json").stdout)
    row = check["gpus"][0]
    assert (row["step_seconds"], row["time_basis"]) == (plan["step_seconds"], "calibrated")
    assert check["ranking"][0]["host_factor"] == 0.8
    api = train_time(MODEL, "h100-sxm", batch_size=2, seq_len=512)
    assert api.step_seconds == plan["step_seconds"] and api.time_basis == "calibrated"
    raw = train_time(MODEL, "h100-sxm", batch_size=2, seq_len=512, calibration=False)
    assert raw.time_basis == "measured" and raw.host_factor is None
    fit = json.loads(_cli("fit", "--gpu", "h100-sxm", "--json").stdout)
    times = [r["time"] for r in fit["rows"] if r["time"] is not None]
    assert times and all(t["host_factor"] == 0.8 for t in times)
    raw_fit = json.loads(_cli("fit", "--gpu", "h100-sxm", "--json", "--no-calibration").stdout)
    assert all("host_factor" not in r["time"] for r in raw_fit["rows"] if r["time"])
    # compare times each method on its smallest GPU: the calibrated one only on the H100
    methods = json.loads(_cli("compare", "-m", "llama-3.1-8b", "--json").stdout)["methods"]
    timed = {m["time"]["gpu"]: m["time"] for m in methods if m["time"] is not None}
    assert "h100-sxm" in timed and len(timed) > 1
    for gpu, t in timed.items():
        assert (t.get("host_factor"), t["time_basis"] == "calibrated") == (
            (0.8, True) if gpu == "h100-sxm" else (None, False))


def test_a_bad_run_file_is_one_line_and_the_good_ones_still_count() -> None:
    _write_run(1.5)
    runs = _data() / store.RUNS_DIR
    (runs / "broken.json").write_text("{not json")
    (runs / "foreign.json").write_text('{"kind": "something else"}')
    (runs / "folder.json").mkdir()
    r = _cli(*PLAN)
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert json.loads(r.stdout)["host_factor"] == 1.5
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 3 and all(len(w) < 300 for w in warnings)


def test_only_bad_files_leave_the_shipped_constants() -> None:
    before = _cli(*PLAN).stdout
    runs = _data() / store.RUNS_DIR
    runs.mkdir(parents=True)
    (runs / "broken.json").write_bytes(b"\xff\xfe")
    r = _cli(*PLAN)
    assert r.exit_code == 0 and r.stdout == before
    assert "warning: skipping" in r.stderr and "Traceback" not in r.output


def test_plan_reads_and_writes_nothing_else() -> None:
    path = _write_run(1.5)
    listing = sorted(p.name for p in path.parent.iterdir())
    stamp = path.stat().st_mtime_ns
    _cli(*PLAN)
    assert sorted(p.name for p in path.parent.iterdir()) == listing
    assert path.stat().st_mtime_ns == stamp


def test_fit_prefers_the_reference_where_steps_say_nothing_of_the_host() -> None:
    from vramcalc.timing.host_calibration import fit_host_factor

    # a GPU-bound step: its time does not depend on the host
    assert fit_host_factor([(lambda h: 2.0, 2.0), (lambda h: 1.0, 1.1)]) == 1.0
    # one host-bound step and one GPU-bound one: the median is the mean of the two errors,
    # smallest where the host-bound one is met (h = 3)
    assert fit_host_factor([(lambda h: 0.1 * h, 0.3), (lambda h: 2.0, 2.0)]) == 3.0


def test_runs_folder_is_the_one_calibrate_writes() -> None:
    from vramcalc.timing.host_calibration import RUNS_DIR, runs_folder

    assert RUNS_DIR == store.RUNS_DIR and runs_folder() == _data() / store.RUNS_DIR


def test_plan_with_runs_imports_nothing_heavy() -> None:
    """With run files to read, `plan --gpu` still loads no torch (the run files are parsed
    by calibrate/store.py, which imports none)."""
    import subprocess
    import sys

    _write_run(1.5)
    code = ("import sys\nsys.argv = ['vramcalc', *" + repr(PLAN) + "]\n"
            "from vramcalc.cli import main\ntry:\n    main(exit_now=False)\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "print()\nprint(','.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    loaded = set(out[-1].split(","))
    assert '"host_factor": 1.5' in "\n".join(out[:-1])
    assert not loaded & {"torch", "transformers", "bitsandbytes", "peft", "pynvml"}
