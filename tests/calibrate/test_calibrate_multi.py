"""`vramcalc calibrate multi`: a real 2-process `accelerate launch` on CPU (gloo, DDP) of a
tiny random-init llama, the one-line errors, and (GPU marker) the same on two GPUs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vramcalc.calibrate.multi_gpu_run import RANK_FIELDS, SAFE_ENV
from vramcalc.cli import app
from vramcalc.commands import calibrate_multi

runner = CliRunner()
TINY_YAML = """\
name: tiny-llama
model_type: llama
vocab_size: 1000
hidden_size: 64
intermediate_size: 128
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
"""
TINY_ARGS = ["--quant", "none", "--optimizer", "adamw_torch", "--batch", "1", "--seq-len",
             "32", "--steps", "2"]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def _run(args: list[str]):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["calibrate", "multi", *args])


def test_cpu_ddp_two_processes(tiny: Path, tmp_path: Path) -> None:
    """Launch, one process per rank, gloo DDP, per-rank files, merge, plan.json beside."""
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    out = tmp_path / "out"
    res = _run(["-m", str(tiny), "--gpus", "2", "--strategy", "ddp", "--device", "cpu",
                "--out", str(out), "--json", *TINY_ARGS])
    assert res.exit_code == 0, res.output + (out / "launch.log").read_text()[-3000:]
    doc = json.loads(res.stdout)
    merged = json.loads((out / "merged.json").read_text())
    assert doc["measured"] == merged and doc["out"] == str(out)
    assert merged["world_size"] == 2 and [r["rank"] for r in merged["ranks"]] == [0, 1]
    for r in merged["ranks"]:
        assert set(RANK_FIELDS) <= set(r)
        assert (r["device"], r["world_size"], r["backend"]) == ("cpu", 2, "gloo")
        assert r["distributed_type"] == "MULTI_CPU" and r["wrapper"] == "DistributedDataParallel"
        assert r["env"] == SAFE_ENV  # every launched process kept the no-multicast switches
        assert len(r["losses"]) == 2 and r["host_peak_rss"] > 0
        assert len(r["step_seconds"]) == 2 and all(t > 0 for t in r["step_seconds"])
        assert r["max_allocated"] is None and r["nvml_peak_used"] is None  # no GPU: unknown
        assert r["point"]["parallel"]["strategy"] == "ddp"
    assert merged["max_allocated"] is None and merged["host_peak_rss"] > 0
    assert merged["step_seconds"] == [max(a, b) for a, b in zip(
        merged["ranks"][0]["step_seconds"], merged["ranks"][1]["step_seconds"], strict=True)]
    # random init, random tokens: every rank's loss is about ln(vocab)
    assert all(abs(x - math.log(1000)) < 1 for r in merged["ranks"] for x in r["losses"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan == doc["estimated"]
    assert plan["parallel"]["gpus"] == 2 and plan["parallel"]["strategy"] == "ddp"
    assert len(plan["per_gpu"]) == 2 and plan["plan"]["batch_size"] == 1
    assert {p.name for p in out.iterdir()} >= {"merged.json", "plan.json", "point.json",
                                               "accelerate.yaml", "launch.log"}


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--strategy", "fsdp", "--device", "cpu"], 1,
     "Error: --device cpu runs ddp only: accelerate enables fsdp for GPU process groups only"),
    (["--strategy", "zero3"], 1, "Error: calibrate multi launches ddp, fsdp, device-map, not "
     "zero3 (DeepSpeed ZeRO is estimated, not measured yet)"),
    (["--device", "tpu"], 1, "Error: --device must be cuda or cpu, got 'tpu'"),
    (["--steps", "0"], 1, "Error: --steps must be a positive integer, got 0"),
    (["--strategy", "ddp", "--offload", "cpu"], 1,
     "Error: --offload cpu needs a sharded strategy (fsdp, zero2, zero3), not ddp"),
])
def test_bad_options(tiny: Path, args: list[str], code: int, message: str) -> None:
    res = _run(["-m", str(tiny), "--gpus", "2", *TINY_ARGS, *args])
    assert res.exit_code == code, res.output
    assert res.stderr.strip() == message


def test_fewer_gpus_visible_than_asked(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    res = _run(["-m", str(tiny), "--gpus", "2", *TINY_ARGS])
    assert res.exit_code == 4
    assert res.stderr.strip() == ("Error: --gpus 2 but 1 CUDA GPU(s) visible; lower --gpus or "
                                  "check CUDA_VISIBLE_DEVICES")


def test_accelerate_missing(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = calibrate_multi.missing_libraries
    monkeypatch.setattr(calibrate_multi, "missing_libraries", lambda plan: real(
        plan, find=lambda name: None if name == "accelerate" else object()))
    res = _run(["-m", str(tiny), "--gpus", "2", "--device", "cpu", *TINY_ARGS])
    assert res.exit_code == 1
    assert res.stderr.strip() == ("Error: calibrate multi needs accelerate (missing); pip "
                                  "install 'qlora-vramcalc[calibrate]' (accelerate is part of it)")


def test_visible_gpus() -> None:
    assert calibrate_multi.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert calibrate_multi.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert calibrate_multi.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_missing_libraries_asks_bitsandbytes_only_when_used() -> None:
    from vramcalc.plans import TrainPlan

    none = lambda name: None  # noqa: E731
    assert "bitsandbytes" not in calibrate_multi.missing_libraries(
        TrainPlan(method="lora", optimizer="adamw_torch"), find=none)
    assert "bitsandbytes" in calibrate_multi.missing_libraries(TrainPlan(), find=none)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_record_every_rank(tiny: Path, tmp_path: Path, strategy: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / strategy
    res = _run(["-m", str(tiny), "--gpus", "2", "--strategy", strategy, "--out", str(out),
                "--json", "--batch", "1", "--seq-len", "64", "--steps", "2",
                "--optimizer", "adamw_torch"])
    assert res.exit_code == 0, res.output + (out / "launch.log").read_text()[-3000:]
    merged = json.loads((out / "merged.json").read_text())
    assert [r["rank"] for r in merged["ranks"]] == [0, 1]
    for r in merged["ranks"]:
        assert r["device"] == "cuda" and r["backend"] == "nccl"
        assert r["max_allocated"] > 0 and r["max_reserved"] >= r["max_allocated"]
        assert r["env"] == SAFE_ENV
    assert (out / "plan.json").is_file()
