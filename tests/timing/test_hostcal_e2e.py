"""Run 37's protocol without a GPU (calibration/device/run37-hostcal.sh DRY=1,
calibration/design_hostcal.py, bench/host_calibration_e2e.py): the user's calibrate
commands get the designed plans, `plan` times every test point as the time model does
with and without the calibration, and each failing step is one `Error:` line. Run 42
(time holdout 6, run42-time6.sh) is the same protocol on a new matrix: its design, its
dry run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.models.resolve import resolve_model
from vramcalc.models.spec import depth_cut
from vramcalc.plans import TrainPlan
from vramcalc.timing.gpu_speed import gpu_speed
from vramcalc.timing.step_time import step_time, train_work

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "calibration/device/run37-hostcal.sh"
SCRIPT42 = ROOT / "calibration/device/run42-time6.sh"


@pytest.fixture(scope="module")
def design() -> Any:
    sys.path.insert(0, str(ROOT / "calibration"))
    try:
        import design_hostcal
    finally:
        sys.path.remove(str(ROOT / "calibration"))
    return design_hostcal


def _groups(design: Any) -> list[dict[str, Any]]:
    return list(json.loads((ROOT / design.MATRIX).read_text())["points"])


def test_matrix_is_the_design_and_disjoint_from_the_calibration(design: Any) -> None:
    assert json.loads((ROOT / design.MATRIX).read_text()) == design.matrix()
    test_models = {g["spec"] for g in _groups(design)}
    assert not test_models & set(design.CAL)
    subs = [s["plan"] for g in _groups(design) for s in g["job"]["points"]]
    assert len(subs) == 24
    kinds = {(design.SLOT_METHODS[i % 8].get("quant", p["method"]), p["gradient_checkpointing"])
             for i, p in enumerate(subs)}
    assert kinds == {(k, c) for k in ("full", "lora", "nf4", "int8") for c in (True, False)}
    assert {1, 2, 16} <= {p["batch_size"] for p in subs}
    assert design.budget(str(ROOT / design.MATRIX)) <= 250  # the script's bound on step c


def test_calibrate_run_gets_the_designed_plans(design: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's command of step a, up to the GPU: the plans it would measure."""
    import vramcalc.commands.calibrate as cal
    from vramcalc.cli import app

    got: dict[str, list[TrainPlan]] = {}
    monkeypatch.setattr(cal, "_require_gpu", lambda: object())
    monkeypatch.setattr(cal, "_missing_extras", lambda: [])
    monkeypatch.setattr(cal, "_run_points",
                        lambda spec, model, plans, *a: got.setdefault(model, plans))
    for model, plans in design.CAL.items():
        r = CliRunner().invoke(app, ["calibrate", "run", "-m", model, "--matrix",
                                     str(ROOT / design.cal_path(model))])
        assert r.exit_code == 0, r.output
        assert got[model] == [TrainPlan.model_validate(p) for p in plans]


def test_plan_commands_time_each_point_as_the_model(design: Any, tmp_path: Path) -> None:
    """Every test point's `plan` argv, with a calibration made at host factor 1.5 and
    with --no-calibration, gives the time model's step at 1.5 and at 1."""
    from vramcalc.cli import app

    data = Path(os.environ["VRAMCALC_DATA_DIR"])
    design.fake(data, tmp_path / "m.jsonl", "h100-sxm", 1.5)
    speed = gpu_speed(resolve_gpu("h100-sxm"))
    assert speed is not None
    specs = ROOT / "calibration/matrices/hostcal37-specs"
    for g in _groups(design):
        spec = resolve_model(g["spec"])
        spec = depth_cut(spec, g["layers"]) if g.get("layers") else spec
        for s in g["job"]["points"]:
            work = train_work(spec, TrainPlan.model_validate(s["plan"]))
            for on, h in ((True, 1.5), (False, 1.0)):
                argv = design.plan_argv(g, s["plan"], specs, "h100-sxm", on)
                r = CliRunner().invoke(app, argv[3:])  # after `python -m vramcalc`
                assert r.exit_code == 0, (s["id"], r.output)
                doc = json.loads(r.stdout)
                want = step_time(work, speed._replace(host_factor=h)).step_seconds
                assert doc["step_seconds"] == pytest.approx(want, rel=1e-9), s["id"]
                assert doc["time_basis"] == ("calibrated" if on else "measured")


def test_predict_without_a_calibration_is_one_error_line(design: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    rc = design.main(["predict", str(ROOT / design.MATRIX),
                      str(ROOT / "calibration/matrices/hostcal37-specs"), "h100-sxm",
                      str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("Error: plan for h0-")
    assert "not calibrated" in err[0] and not (tmp_path / "p.json").exists()


def _script(tmp_path: Path, script: Path = SCRIPT, **env: str
            ) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    out.mkdir()
    return subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OUT": str(out), "DRY": "1",
                                            "PY": sys.executable, **env})


def test_dry_run_registers_then_scores(tmp_path: Path) -> None:
    """The script end to end on made-up data: the tests steps take 1.5x (host) the
    model's time, x1.0 and x1.1 alternately, so the calibrated errors are 0 and -1/11."""
    r = _script(tmp_path, DRY_H="1.5")
    assert r.returncode == 0, r.stderr
    assert "basis calibrated, host factor 1.5" in r.stdout
    assert "largest step-time difference 0.000 %" in r.stdout  # the committed predictions
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("calibrated "))
    assert row.split()[1:4] == ["24", "4.5%", "9.1%"]
    assert "calibrated: MET" in r.stdout and "uncalibrated: MISSED" in r.stdout
    tar = tmp_path / "out/run37.tar.gz"
    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert {"./pred-cal.json", "./pred-nocal.json", "./prereg.txt",
            "./hostcal37.jsonl"} <= names
    # a prediction changed after registration is refused
    folder = tmp_path / "x"
    with tarfile.open(tar) as t:
        t.extractall(folder, filter="data")
    doc = json.loads((folder / "pred-cal.json").read_text())
    doc["points"][0]["plan_json"]["step_seconds"] *= 2
    (folder / "pred-cal.json").write_text(json.dumps(doc))
    s = subprocess.run([sys.executable, str(ROOT / "bench/host_calibration_e2e.py"),
                        str(folder)], capture_output=True, text=True, timeout=120)
    assert s.returncode == 1
    assert s.stderr.strip() == "Error: pred-cal.json changed after it was registered"


def test_a_failed_step_is_one_error_line(tmp_path: Path) -> None:
    r = _script(tmp_path, GPU="no-such-gpu")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: vramcalc plan does not run here: ")
    assert (tmp_path / "out/run37.tar.gz").exists()


def test_time6_is_new_complete_and_within_the_budget(design: Any) -> None:
    """Run 42's matrix is its design, at model depths no earlier time matrix holds, every
    method with checkpointing on and off per model, batch 1 and 16, sequences 256-4096,
    and the whole call within 330 s by the budget; the script bounds step a as designed."""
    run = design.RUN42
    groups = json.loads((ROOT / run.matrix).read_text())["points"]
    assert {"points": groups} == design.matrix6()
    earlier = [*ROOT.glob("calibration/matrices/h200-time[0-9].json"),
               ROOT / design.MATRIX, ROOT / "calibration/matrices/h100-lorapair.json"]
    assert len(earlier) == 7  # time holdouts 1-5, run 37 and the LoRA pairs
    timed = {(g["spec"], g.get("layers"))
             for f in earlier for g in json.loads(f.read_text())["points"]}
    assert not {(g["spec"], g.get("layers")) for g in groups} & timed
    assert not {g["spec"] for g in groups} & {*run.cal, *design.CAL}
    subs = [s["plan"] for g in groups for s in g["job"]["points"]]
    assert len(subs) >= 32
    for g in groups:
        kinds = {(s["plan"].get("quant", s["plan"]["method"]), s["plan"]["gradient_checkpointing"])
                 for s in g["job"]["points"]}
        assert kinds == {(k, c) for k in ("full", "lora", "nf4", "int8") for c in (True, False)}
    assert {1, 16} <= {p["batch_size"] for p in subs} <= {1, 2, 4, 8, 16}
    assert {p["seq_len"] for p in subs} <= set(design.SEQS6)
    for gpu in ("h100-sxm", "h200"):
        committed = json.loads((ROOT / f"calibration/matrices/h100-time6-predictions-{gpu}.json")
                               .read_text())["points"]
        assert [p["id"] for p in committed] == [s["id"] for g in groups for s in g["job"]["points"]]
    assert design.call_budget(run) <= 330
    text = SCRIPT42.read_text()
    assert f"CAL=${{CAL:-{run.cal_s}}}" in text and f"M={run.matrix}" in text
    assert f"SPECS={run.specs}" in text and f"J={run.jsonl}" in text
    for model in run.cal:
        assert (ROOT / design.cal_path(model, run)).exists()


def test_time6_dry_run_registers_then_scores(tmp_path: Path) -> None:
    """Run 42's script end to end on made-up data (host factor 1.5, the test steps x1.0
    and x1.1 alternately: 17 of 32 exact, 15 at -1/11); the committed uncalibrated
    predictions are the model's now."""
    r = _script(tmp_path, SCRIPT42, DRY_H="1.5")
    assert r.returncode == 0, r.stderr
    assert "basis calibrated, host factor 1.5" in r.stdout
    assert "uncalibrated vs committed (h100-time6-predictions-h100-sxm.json): 32 points, " \
        "largest step-time difference 0.000 %" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("calibrated "))
    assert row.split()[1:4] == ["32", "0.0%", "9.1%"]
    assert "calibrated: MET" in r.stdout and "uncalibrated: MISSED" in r.stdout
    with tarfile.open(tmp_path / "out/run42.tar.gz") as t:
        names = set(t.getnames())
    assert {"./pred-cal.json", "./pred-nocal.json", "./prereg.txt", "./time6.jsonl"} <= names


def test_scoring_wants_one_jsonl(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    s = subprocess.run([sys.executable, str(ROOT / "bench/host_calibration_e2e.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert s.returncode == 1
    assert s.stderr.strip() == f"Error: {tmp_path}: 2 .jsonl files, one expected (the test points)"
