"""Step timing in the measurement harness on CPU: measure_point's step_seconds, the
time worker (several plans of one model in one process) through the matrix driver, and
the timing-grade mark of points that ran alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramcalc.models.spec import ModelSpec

TINY = ModelSpec(
    name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)


def test_step_seconds_is_the_median_after_the_first_step() -> None:
    from vramcalc.calibrate.run import step_seconds

    clock = [0.0, 5.0, 5.5, 6.5, 7.0, 10.0, 10.0, 12.0]  # steps of 5, 1, 3, 2 s
    out = step_seconds(clock)
    assert out["step_seconds_each"] == [5.0, 1.0, 3.0, 2.0]
    assert out["step_seconds"] == 2.0
    assert step_seconds([0.0, 1.0])["step_seconds"] is None  # one step: warm-up only


def test_record_is_timing_grade_only_alone() -> None:
    from vramcalc.calibrate.matrix import Point, _record

    p = Point(id="x", raw={}, spec=None, layers=None, plan=None, worker="w", job={})
    assert _record(p, "ok", {}, 1.0, 1)["timing_grade"] is True
    assert _record(p, "ok", {}, 1.0, 2)["timing_grade"] is False
    assert _record(p, "not_run", None, None)["timing_grade"] is False


def test_time_worker_through_the_matrix_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    spec = TINY.model_dump(mode="json")
    matrix = {"points": [
        {"id": "g", "worker": "vramcalc.calibrate.time_worker", "spec": spec, "layers": 1,
         "reserve_gib": 1, "job": {"points": [
             {"id": "g/lora", "steps": 3, "plan": {"method": "lora", "seq_len": 16,
                                                    "optimizer": "adamw_torch"}},
             {"id": "g/bad", "steps": 3, "plan": {"method": "nope"}},
             {"id": "g/full-plain", "steps": 3,
              "plan": {"method": "full", "loop": "plain", "seq_len": 16,
                       "optimizer": "adamw_torch"}}]}},
    ]}
    mpath, out = tmp_path / "m.json", tmp_path / "out.jsonl"
    mpath.write_text(json.dumps(matrix))
    proc = subprocess.run(
        [sys.executable, "-m", "vramcalc.calibrate.matrix", str(mpath), "--out", str(out),
         "--weights-cache", str(tmp_path / "w"), "--max-parallel", "1", "--device", "cpu",
         "--deadline-s", "150"],
        capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["status"] == "ok" and rec["timing_grade"] is True and rec["max_running"] == 1
    subs = {p["id"]: p for p in rec["measurement"]["points"]}
    assert subs["g/bad"]["status"] == "error"
    for pid in ("g/lora", "g/full-plain"):
        assert subs[pid]["status"] == "ok", subs[pid]
        assert len(subs[pid]["step_seconds_each"]) == 3
        assert subs[pid]["step_seconds"] > 0
    assert rec["measurement"]["device_name"] == "cpu"
    host = rec["measurement"]["host"]  # the host probe: which CPU, seconds per operator
    assert host["device"] == "cpu" and 0 < host["op_seconds"] < 1e-3 and host["cpus"] >= 1


def test_calibrate_point_line_shows_the_step_time() -> None:
    from vramcalc.commands.calibrate import _point_line
    from vramcalc.plans import TrainPlan

    result = {"peak_allocated_bytes": 2**30, "steps": [], "step_seconds": 0.1234}
    line = _point_line(TrainPlan(), result, 2**30)
    assert line.endswith("step 0.123 s"), line
    assert "step" not in _point_line(TrainPlan(), {"peak_allocated_bytes": 2**30}, 2**30)
