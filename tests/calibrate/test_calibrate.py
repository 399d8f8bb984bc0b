"""`vramcalc calibrate`: measure_point vs the estimator, the run store, corrections, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from vramcalc import user_files
from vramcalc.calibrate import campaign, store
from vramcalc.cli import app
from vramcalc.commands import calibrate as calibrate_cmd
from vramcalc.corrections import factors as corr
from vramcalc.corrections.report import replay_points
from vramcalc.errors import NoGpuError, OutputFileError
from vramcalc.memory.estimate import CUDA_CONTEXT, estimate
from vramcalc.memory.program.optimizer import optimizer_bytes
from vramcalc.memory.program.trainable import lora_param_bytes
from vramcalc.memory.program.weights import (
    DYNAMIC_MAP_BYTES,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
    rounded,
    weight_bytes,
)
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.units import MiB

REPO = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"

# hidden 128: every fp32 norm, LoRA and embedding tensor is a multiple of 512 bytes, so the
# allocator rounding the estimator applies is a no-op and the bytes compare exactly.
TINY = ModelSpec(
    name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)


def _fake_device() -> SimpleNamespace:
    return SimpleNamespace(name=H100, total_bytes=85_520_809_984, driver_version="580.159.04",
                           cuda_driver_version="13.0")


# ---- measure_point on CPU vs static_bytes ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_measured() -> tuple[TrainPlan, dict]:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from vramcalc.calibrate.run import measure_point

    plan = TrainPlan(batch_size=1, seq_len=16, optimizer="adamw_torch")
    return plan, measure_point(TINY, plan, None, steps=1, device="cpu")


def test_measured_static_bytes_equal_estimator(tiny_measured: tuple[TrainPlan, dict]) -> None:
    plan, result = tiny_measured
    assert result["oom"] is False
    got = result["static_after_peft"]
    st = weight_bytes(TINY, plan)
    assert got["base_weights"] == st.base_weights  # packed nf4: numel / 2 per Linear
    assert got["lora"] == lora_param_bytes(TINY, plan)  # fp32 A (r x in) and B (out x r)
    assert got["unquantized"] == st.unquantized_params  # embeddings, lm_head, norms in fp32
    assert result["optimizer_state_bytes"] == {
        "device": optimizer_bytes(TINY, plan).device, "paged": 0,
    }


def test_measured_quant_constants_match_per_tensor(tiny_measured: tuple[TrainPlan, dict]) -> None:
    """Double quant, per Linear: uint8 absmax per 64-block, fp32 nested absmax per 256 of
    those, an fp32 offset, the 16-entry 4-bit code and the 256-entry nested code table
    (each QuantState holds its own). run.py counts exact bytes; the estimator rounds each
    tensor up to the allocator's 512 bytes, which is the only difference."""
    plan, result = tiny_measured
    exact = rounded_sum = 0
    for lin in TINY.block_linears():
        blocks = math.ceil(lin.weight_numel / NF4_BLOCKSIZE)
        tensors = [blocks, 4 * math.ceil(blocks / NESTED_BLOCKSIZE), 4, 16 * 4,
                   DYNAMIC_MAP_BYTES]
        exact += sum(tensors)
        rounded_sum += sum(rounded(t) for t in tensors)
    layers = TINY.num_hidden_layers
    assert result["static_after_peft"]["quant_constants"] == layers * exact
    assert weight_bytes(TINY, plan).quant_constants == layers * rounded_sum


# ---- store -----------------------------------------------------------------------------------


def _run_doc(n_points: int = 2) -> store.RunFile:
    run = store.new_run(store.Environment(gpu_name=H100, gpu_memory_bytes=80 * 2**30,
                                          torch="2.11.0+cu130", transformers="5.17.0"))
    spec = get_spec("qwen2.5-0.5b")
    for b in range(1, n_points + 1):
        plan = TrainPlan(batch_size=b)
        run.points.append(store.RunPoint(
            model=spec.name, plan=plan, steps=3,
            prediction=store.Prediction.of(estimate(spec, plan)),
            measurement={"oom": False, "marks": {"a": {"max_allocated": 10 * b, "reserved": 20,
                                                       "max_reserved": 30}}},
        ))
    return run


def test_store_round_trip(tmp_path: Path) -> None:
    run = _run_doc()
    path = tmp_path / "runs" / store.run_file_name(run)
    store.write_run(path, run)
    assert path.name.startswith("h100-")
    back = store.read_run(path)
    assert back == run
    points = store.measured_points(path, back)
    assert [p.peak_allocated_bytes for p in points] == [10, 20]
    assert points[0].gpu == H100 and points[0].versions["torch"] == "2.11.0+cu130"


def test_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.json"
    store.write_run(path, _run_doc(1))
    before = path.read_text()

    def broken_dump(obj, fh, **kw):  # type: ignore[no-untyped-def]
        fh.write('{"half": ')
        raise OSError("disk full")

    monkeypatch.setattr(user_files.json, "dump", broken_dump)
    with pytest.raises(OutputFileError, match="disk full"):
        store.write_run(path, _run_doc(3))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


def test_corrupt_and_foreign_files_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write_run(tmp_path / "good.json", _run_doc(1))
    (tmp_path / "corrupt.json").write_text('{"schema_version": 1, "kind": "vramcalc-cal')
    (tmp_path / "foreign.json").write_text('{"name": "some other tool"}')
    future = _run_doc(1).model_dump(mode="json") | {"schema_version": 99}
    (tmp_path / "future.json").write_text(json.dumps(future))
    runs = store.load_runs(tmp_path)
    assert [p.name for p, _ in runs] == ["good.json"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("warning: skipping") for line in err)
    assert any("corrupt.json" in e for e in err) and any("foreign.json" in e for e in err)


# ---- corrections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family"),
    [(H100, "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
     ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("rtx-4090", "RTX 4090"), ("h100", "H100"),
     ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"),
     ("NVIDIA RTX A6000", "RTX A6000")],
)
def test_gpu_family(name: str, family: str) -> None:
    assert corr.gpu_family(name) == family


def test_stack_key() -> None:
    assert corr.stack_key("2.11.0+cu130", "5.17.0") == "torch2.11-transformers5.17"
    assert corr.stack_key(None, "5.17.0") == "torch?-transformers5.17"


def test_fit_recovers_known_factors() -> None:
    spec = get_spec("llama-3.1-8b")
    truth = corr.Corrections(gpu_family="H100", stack="s", k_act=1.07, k_slack=0.8,
                             context_bytes=500 * MiB)
    obs = []
    for b, s, gc in [(1, 512, True), (4, 1024, True), (2, 2048, False), (8, 256, False)]:
        est = estimate(spec, TrainPlan(batch_size=b, seq_len=s, gradient_checkpointing=gc))
        true = corr.corrected(est, truth)
        obs.append(corr.observation(
            est, model=spec.name, gpu=H100, stack="s", meas_alloc=true.peak_allocated_bytes,
            meas_reserved=true.peak_reserved_bytes, meas_device=true.peak_device_bytes,
        ))
    (fitted,) = corr.fit(obs)
    assert fitted.k_act == pytest.approx(1.07, abs=1e-5)
    assert fitted.k_slack == pytest.approx(0.8, abs=1e-5)
    assert fitted.context_bytes == pytest.approx(500 * MiB, abs=2)
    assert fitted.n_points == 4 and fitted.key == "H100/s"


def test_corrected_keeps_the_sum_and_identity_is_a_no_op() -> None:
    est = estimate(get_spec("qwen2.5-0.5b"), TrainPlan(batch_size=4, optimizer="paged_adamw_32bit"))
    same = corr.corrected(est, corr.Corrections(gpu_family="H100", stack="s"))
    assert same.peak_device_bytes == est.peak_device_bytes
    assert same.peak_allocated_bytes == est.peak_allocated_bytes
    c = corr.Corrections(gpu_family="H100", stack="s", k_act=1.2, k_slack=0.5,
                         context_bytes=CUDA_CONTEXT - 100 * MiB)
    out = corr.corrected(est, c)
    assert out.total == out.peak_device_bytes
    assert out.peak_allocated_bytes > est.peak_allocated_bytes
    assert out.peak_reserved_bytes - out.peak_allocated_bytes == round(
        0.5 * est.components["allocator_slack"])


def test_save_load_and_select(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "corrections.json"
    a = corr.Corrections(gpu_family="H100", stack=corr.installed_stack() or "x", k_act=1.01,
                         n_points=3, helps=True)
    b = corr.Corrections(gpu_family="H100", stack="torch1.0-transformers1.0", n_points=30,
                         helps=True)
    corr.save(path, [a, b])
    assert corr.load(path) == [a, b]
    monkeypatch.setenv(corr.ENV_PATH, str(path))
    corr._load_cached.cache_clear()
    assert corr.select_corrections(H100).corrections == a  # only the installed stack
    assert corr.select_corrections(H100).origin == str(path)
    assert corr.select_corrections("NVIDIA A100-SXM4-80GB").corrections is None
    assert corr.select_corrections(None).corrections is None  # no GPU, no family
    assert corr.match([a, b], H100, "torch1.0-transformers1.0") == b
    assert corr.match([a, b], H100, "other") is None
    corr._load_cached.cache_clear()


def test_validation_verdict() -> None:
    helps, v = corr.validation_of({"allocated": [0.02, 0.04], "device": [0.03]},
                                  {"allocated": [0.01, 0.02], "device": [0.01]})
    assert helps and v.n_points == 2 and v.raw_median_abs_error["allocated"] == 0.03
    worse, _ = corr.validation_of({"allocated": [0.01], "device": [0.03]},
                                  {"allocated": [0.02], "device": [0.01]})
    assert not worse  # better device, worse allocated: not applied
    assert corr.validation_of({}, {}) == (False, corr.Validation())


def test_broken_corrections_file_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "corrections.json"
    path.write_text("[1, 2")
    assert corr.load(path) == []
    assert "ignored" in capsys.readouterr().err


# ---- report / fit on the committed measurements -----------------------------------------------


def test_report_replays_committed_data() -> None:
    result = replay_points(REPO / "calibration")
    (entry,) = result["corrections"]
    assert entry["helps"] is not None and entry["validation"]["n_points"] >= 10
    summary = result["summary"]
    assert summary["n_measured"] >= 10 and len(summary["models"]) >= 2
    assert summary["validation"] == "leave-one-architecture-out"
    assert 0 <= summary["median_abs_error"] < 0.05
    assert summary["raw"]["allocated"]["worst_abs_error"] < 0.2
    point = result["points"][0]
    for key in ("gpu", "batch_size", "seq_len", "measured_peak_allocated_bytes",
                "measured_peak_reserved_bytes", "measured_peak_device_bytes"):
        assert key in point
    assert set(point["estimated_peak_allocated_bytes"]) == {"raw", "corrected"}


def test_report_json_cli() -> None:
    res = CliRunner().invoke(app, ["calibrate", "report", "--json", "--data",
                                   str(REPO / "calibration")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["median_abs_error"] is not None


def test_report_without_measurements_says_so() -> None:
    res = CliRunner().invoke(app, ["calibrate", "report"])  # the (empty) user data folder
    assert res.exit_code == 0, res.output
    assert "no measured points under" in res.stderr


def test_fit_cli_writes_corrections(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    src = sorted((REPO / "calibration" / "raw").glob("*.jsonl"))[0]
    (tmp_path / "raw" / src.name).write_text(src.read_text())
    user_file = corr.user_corrections_path()
    other = corr.Corrections(gpu_family="A100", stack="torch2.11-transformers5.17")
    corr.save(user_file, [other])
    res = CliRunner().invoke(app, ["calibrate", "fit", "--data", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert user_file.parent == tmp_path / "user-data"  # VRAMCALC_DATA_DIR (conftest)
    kept, entry = corr.load(user_file)  # the other GPU's entry is kept
    assert kept == other
    assert entry.gpu_family == "H100" and entry.n_points >= 10
    assert 0.9 < entry.k_act < 1.1
    assert entry.helps is not None and entry.validation is not None
    assert not list(user_file.parent.glob("*.tmp"))  # written atomically, nothing left


def test_shipped_corrections_are_in_the_package() -> None:
    entries = {e.gpu_family: e for e in corr.shipped_entries()}
    assert set(entries) == {"H100", "H200"}
    assert all(e.validation is not None and e.helps is not None for e in entries.values())


# ---- calibrate run -----------------------------------------------------------------------------


def test_default_matrix_has_six_distinct_points() -> None:
    plans = calibrate_cmd.default_matrix(TrainPlan())
    assert len(plans) == 6 and len(set(plans)) == 6 and plans[0] == TrainPlan()


def test_run_without_gpu_exits_4(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gpu():  # type: ignore[no-untyped-def]
        raise NoGpuError("NVML: driver not loaded")

    monkeypatch.setattr("vramcalc.hardware.devices.query_devices", no_gpu)
    res = CliRunner().invoke(app, ["calibrate", "run", "--model", "qwen2.5-0.5b"])
    assert res.exit_code == 4
    assert res.stderr == f"Error: {calibrate_cmd.NO_GPU}\n"


def test_group_model_option_runs_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate_cmd, "_require_gpu", lambda: (_ for _ in ()).throw(
        NoGpuError(calibrate_cmd.NO_GPU)))
    res = CliRunner().invoke(app, ["calibrate", "--model", "qwen2.5-0.5b"])
    assert res.exit_code == 4


def test_run_without_extra_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate_cmd, "_require_gpu", _fake_device)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec -> None: not installed
    res = CliRunner().invoke(app, ["calibrate", "run", "--model", "qwen2.5-0.5b"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1
    assert "missing: bitsandbytes" in res.stderr
    assert "pip install 'qlora-vramcalc[calibrate]'" in res.stderr


@pytest.fixture
def fake_gpu_run(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    jobs: list[dict] = []
    monkeypatch.setattr(calibrate_cmd, "_require_gpu", _fake_device)
    monkeypatch.setattr(calibrate_cmd, "_missing_extras", lambda: [])
    monkeypatch.setattr(campaign, "build_weights", lambda model, out, device: 0.0)
    return jobs


def test_oom_points_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu_run: list[dict]
) -> None:
    def oom(job: dict) -> dict:
        fake_gpu_run.append(job)
        return {"oom": True, "oom_phase": "train", "oom_message": "CUDA out of memory"}

    monkeypatch.setattr(campaign, "measure_in_subprocess", oom)
    res = CliRunner().invoke(app, ["calibrate", "run", "-m", "qwen2.5-0.5b", "--steps", "1",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert len(fake_gpu_run) == 6 and not fake_gpu_run[0]["trust_remote_code"]
    ((path, run),) = store.load_runs(tmp_path / "runs")
    assert len(run.points) == 6 and all(p.oom for p in run.points)
    assert run.environment.gpu_name == H100 and run.points[0].prediction is not None
    replayed = replay_points(tmp_path)
    assert len(replayed["points"]) == 6 and all(p["oom"] for p in replayed["points"])


def test_interrupt_keeps_measured_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu_run: list[dict]
) -> None:
    def measure(job: dict) -> dict:
        fake_gpu_run.append(job)
        if len(fake_gpu_run) == 3:
            raise KeyboardInterrupt
        return {"oom": False, "marks": {"x": {"max_allocated": 1, "reserved": 2,
                                              "max_reserved": 2}}}

    monkeypatch.setattr(campaign, "measure_in_subprocess", measure)
    res = CliRunner().invoke(app, ["calibrate", "run", "-m", "qwen2.5-0.5b",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 130
    assert "kept 2 measured point(s)" in res.stderr
    ((_, run),) = store.load_runs(tmp_path / "runs")
    assert len(run.points) == 2


def test_calibrate_command_import_is_light() -> None:
    code = ("import sys, vramcalc.cli, vramcalc.commands.calibrate, vramcalc.corrections.factors;"
            "heavy = {'torch', 'transformers', 'bitsandbytes', 'peft'} & set(sys.modules);"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
def test_measure_point_on_gpu_matches_static_bytes() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vramcalc.calibrate.run import measure_point

    plan = TrainPlan(batch_size=1, seq_len=64, optimizer="adamw_torch")
    result = measure_point(TINY, plan, None, steps=1, device="cuda")
    st = weight_bytes(TINY, plan)
    assert result["static_after_peft"]["base_weights"] == st.base_weights
    assert result["static_after_peft"]["lora"] == lora_param_bytes(TINY, plan)
    assert result["peak_allocated_bytes"] > st.base_weights + lora_param_bytes(TINY, plan)


def test_weights_that_cannot_fit_on_disk_are_refused_before_writing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vramcalc.calibrate.matrix import build_one, disk_shortfall
    from vramcalc.models.spec import get_spec

    assert disk_shortfall(get_spec("qwen2.5-0.5b").model_copy(
        update={"num_hidden_layers": 1}), tmp_path) is None
    huge = get_spec("llama-3.1-405b")  # 810 GB of bf16 weights: more than this disk
    msg = build_one(huge, tmp_path / "w", "cpu", timeout_s=5)
    assert msg is not None and msg.startswith("not enough disk for the weights")
    assert not any(tmp_path.iterdir())  # nothing half-written
