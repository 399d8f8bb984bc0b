"""`vramcalc check`: listing GPUs, verdicts, advice (CPU only; NVML is faked)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.commands import targets as gpu_targets
from vramcalc.hardware.catalog import MIB, catalog, resolve_gpu
from vramcalc.hardware.devices import DeviceInfo, GpuProcess
from vramcalc.memory.estimate import estimate
from vramcalc.models.resolve import resolve_model
from vramcalc.plans import TrainPlan
from vramcalc.sizing import advice
from vramcalc.sizing.verdict import fits_certainly

GIB = 2**30
MARGIN = GIB // 2
runner = CliRunner()

BIG = ["--model", "llama-3.1-8b", "--batch", "16", "--seq-len", "4096",
       "--no-gradient-checkpointing"]


def device(name: str, total_mib: int, free_mib: int, cc: tuple[int, int] = (8, 9),
           index: int = 0, **kwargs: Any) -> DeviceInfo:
    return DeviceInfo(index=index, name=name, uuid=f"GPU-{index}", total_bytes=total_mib * MIB,
                      free_bytes=free_mib * MIB, used_bytes=(total_mib - free_mib) * MIB,
                      compute_capability=cc, **kwargs)


def h100(index: int = 0, free_mib: int = 81000, **kw: Any) -> DeviceInfo:
    return device("NVIDIA H100 80GB HBM3", 81559, free_mib, (9, 0), index, **kw)


def rtx_4090(index: int = 0, free_mib: int = 24000) -> DeviceInfo:
    return device("NVIDIA GeForce RTX 4090", 24564, free_mib, (8, 9), index)


def t4(index: int = 0) -> DeviceInfo:
    return device("Tesla T4", 15360, 14900, (7, 5), index)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the detected devices; `gpus([...])`. Detection is refused unless set."""
    state: dict[str, Any] = {"devices": None, "calls": 0}

    def detect() -> list[DeviceInfo]:
        state["calls"] += 1
        assert state["devices"] is not None, "NVML must not be called here"
        return state["devices"]

    monkeypatch.setattr(gpu_targets, "detect_devices", detect)

    def set_devices(devices: list[DeviceInfo] | None) -> dict[str, Any]:
        state["devices"] = devices
        return state

    return set_devices


def run(*args: str) -> Any:
    return runner.invoke(app, ["check", *args])


def as_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


# ---- listing ------------------------------------------------------------------------------


def test_lists_detected_gpus_as_a_table(gpus: Any) -> None:
    mig = device("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9856, 9800, (8, 0), 1, is_mig=True,
                 mig_parent_index=0)
    gpus([h100(processes=(GpuProcess(pid=7, used_bytes=2 * GIB),)), mig])
    result = run()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "H100 80GB" in out and "79.65" in out and "GiB" in out
    assert "0:1" in out and "MIG" in out and "9.0" in out and "yes" in out
    assert "2.00" in out  # other processes' memory


def test_lists_detected_gpus_as_json(gpus: Any) -> None:
    gpus([h100(), t4(index=1)])
    code, data = as_json()
    assert code == 0
    assert [d["name"] for d in data] == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    assert data[0]["total_bytes"] == 81559 * MIB and data[1]["bf16_supported"] is False


def test_no_gpu_is_one_line_and_exit_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the real query_devices: ImportError
    for args in ([], ["--model", "llama-3.1-8b"]):
        result = run(*args)
        assert result.exit_code == 4
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "--gpu" in lines[0]


def test_nvml_error_is_exit_4(monkeypatch: pytest.MonkeyPatch) -> None:
    class NVMLError(Exception):
        value = 9

    def init() -> None:
        raise NVMLError()

    nvml = SimpleNamespace(NVMLError=NVMLError, NVML_ERROR_DRIVER_NOT_LOADED=9, nvmlInit=init)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    result = run()
    assert result.exit_code == 4 and "no NVIDIA GPU detected" in result.stderr


# ---- verdicts -----------------------------------------------------------------------------


def test_fitting_plan_exits_0(gpus: Any) -> None:
    gpus([rtx_4090()])
    code, data = as_json("--model", "llama-3.1-8b")
    assert code == 0 and data["fits"] is True and data["suggestions"] == []
    (v,) = data["gpus"]
    peak = data["estimate"]["required_device_bytes"]
    assert v["fits_free"] and v["fits_empty"] and v["index"] == 0
    assert v["headroom_bytes"] == 24000 * MIB - peak
    assert v["total_bytes"] == 24564 * MIB and v["free_bytes"] == 24000 * MIB
    text = run("--model", "llama-3.1-8b")
    assert text.exit_code == 0 and "fits" in text.stdout and "NOT" not in text.stdout


def test_margin_decides_a_tight_fit(gpus: Any) -> None:
    spec = resolve_model("llama-3.1-8b")
    peak = estimate(spec, TrainPlan()).required_low  # the least it needs
    free_mib = (peak + GIB // 4) // MIB + 1  # 0.25 GiB over it
    gpus([device("NVIDIA GeForce RTX 4090", 24564, free_mib)])
    assert as_json("--model", "llama-3.1-8b")[0] == 3  # default margin 0.5 GiB
    assert as_json("--model", "llama-3.1-8b", "--margin", "0.2")[0] == 0
    assert "0.5 GiB" in " ".join(run("--help").stdout.split())


def test_not_fitting_exits_3_with_suggestions_that_fit(gpus: Any) -> None:
    gpus([h100()])
    code, data = as_json(*BIG)
    assert code == 3 and data["fits"] is False
    spec = resolve_model("llama-3.1-8b")
    plan = TrainPlan.model_validate(data["estimate"]["plan"])
    kinds = {s["kind"] for s in data["suggestions"]}
    assert {"batch", "seq_len"} <= kinds
    for s in data["suggestions"]:
        new = plan.model_copy(update=s["changes"])
        peak = estimate(spec, new).required_device_bytes
        assert s["fits"] and peak == s["required_device_bytes"]
        assert peak + MARGIN <= 81000 * MIB
    batch = next(s for s in data["suggestions"] if s["kind"] == "batch")
    n = batch["changes"]["batch_size"]
    assert 16 % n == 0 and batch["gradient_accumulation_steps"] == 16 // n  # exactly 16
    text = run(*BIG)
    assert text.exit_code == 3 and "does NOT fit" in text.stdout
    assert "gradient accumulation" in text.stdout


def test_nothing_fits_names_a_larger_gpu(gpus: Any) -> None:
    code, data = as_json("--model", "llama-3.1-8b", "--gpu-memory", "4")
    assert code == 3 and data["suggestions"] == []
    larger = resolve_gpu(data["larger_gpu"])
    spec = resolve_model("llama-3.1-8b")
    plan = advice.for_gpu(TrainPlan(), larger.bf16_supported)
    change = data["larger_gpu_change"]  # as is, or with the change it names
    changed = plan if change is None else plan.model_copy(update=change["changes"])
    assert fits_certainly(larger.usable_bytes, estimate(spec, changed).required_device_bytes,
                          MARGIN)
    smaller = [g for g in catalog() if g.usable_bytes < larger.usable_bytes]
    assert not any(fits_certainly(
        g.usable_bytes,
        estimate(spec, advice.for_gpu(TrainPlan(), g.bf16_supported)).required_device_bytes,
        MARGIN) for g in smaller)
    text = run("--model", "llama-3.1-8b", "--gpu-memory", "4")
    assert "even at batch 1" in text.stdout and larger.name in text.stdout


def test_advice_checkpointing_optimizer_rank_targets_attn() -> None:
    spec = resolve_model("llama-3.1-8b")
    plan = TrainPlan(rank=128, optimizer="adamw_torch", gradient_checkpointing=False,
                     attn="eager", batch_size=2, seq_len=2048)
    peak = estimate(spec, plan).required_device_bytes
    # a margin above the spread: "fits" is then required <= peak - 1
    margin = 4 * 2**30
    found = {s.kind: s for s in advice.candidates(spec, plan, peak - 1 + margin, margin)}
    assert set(found) == {"allocator", "gradient_checkpointing", "optimizer", "attn", "batch",
                          "seq_len", "rank", "targets", "offload_activations", "loss_kernel"}
    assert found["offload_activations"].changes == {"offload_activations": "all"}
    assert "pinned host memory" in found["offload_activations"].cost
    assert found["targets"].changes == {"targets": "q_proj,k_proj,v_proj,o_proj"}
    assert found["rank"].changes == {"rank": 64}
    for s in found.values():
        assert s.required_device_bytes == estimate(spec, s.apply(plan)).required_device_bytes
        assert s.required_device_bytes < peak
        assert s.fits == (s.required_device_bytes <= peak - 1)
    assert all(s.fits for s in advice.suggest(spec, plan, peak - 1 + margin, margin))


# ---- --gpu / --gpu-memory -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rtx-4090", "4090", "RTX 4090", "NVIDIA GeForce RTX 4090"])
def test_gpu_by_name_needs_no_nvml(gpus: Any, name: str) -> None:
    state = gpus(None)
    code, data = as_json("--model", "llama-3.1-8b", "--gpu", name)
    assert code == 0 and state["calls"] == 0
    (v,) = data["gpus"]
    gpu = resolve_gpu("rtx-4090")
    assert v["name"] == "rtx-4090" and v["total_bytes"] == 24564 * MIB
    # an empty card offers its total less the driver's reservation, as a detected one does
    assert v["free_bytes"] == v["empty_bytes"] == gpu.usable_bytes < 24564 * MIB


def test_unknown_gpu_is_exit_1_with_suggestion(gpus: Any) -> None:
    result = run("--model", "llama-3.1-8b", "--gpu", "rtx-4091")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: unknown GPU 'rtx-4091'") and "did you mean" in (
        result.stderr
    )
    assert "rtx-4090" in result.stderr


def test_gpu_memory_and_usage_errors(gpus: Any) -> None:
    code, data = as_json("--model", "llama-3.1-8b", "--gpu-memory", "24")
    assert code == 0 and data["gpus"][0]["total_bytes"] == 24 * GIB
    both = run("--model", "llama-3.1-8b", "--gpu", "h100", "--gpu-memory", "24")
    assert both.exit_code == 1 and "not both" in both.stderr
    assert run("--gpu", "h100").exit_code == 1
    assert run("--model", "llama-3.1-8b", "--margin", "-1").exit_code == 1
    assert run("--model", "llama-3.1-8b", "--batch", "x").exit_code == 2


# ---- detected GPUs ------------------------------------------------------------------------


def test_busy_card_fits_empty_but_not_free(gpus: Any) -> None:
    busy = h100(free_mib=4000, processes=(GpuProcess(pid=42, used_bytes=75 * GIB),))
    gpus([busy])
    code, data = as_json("--model", "llama-3.1-8b")
    (v,) = data["gpus"]
    assert code == 3 and v["fits_empty"] is True and v["fits_free"] is False
    assert "other processes" in run("--model", "llama-3.1-8b").stdout


def test_t4_plans_fp16_instead_of_bf16(gpus: Any) -> None:
    gpus([t4()])
    result = run("--model", "llama-3.1-8b", "--json")
    assert "bf16" in result.stderr and "fp16" in result.stderr
    data = json.loads(result.stdout)
    assert data["estimate"]["plan"]["compute_dtype"] == "fp16"
    assert data["gpus"][0]["compute_dtype"] == "fp16"
    gpus([rtx_4090()])
    result = run("--model", "llama-3.1-8b", "--json")
    assert "fp16" not in result.stderr
    assert json.loads(result.stdout)["estimate"]["plan"]["compute_dtype"] == "bf16"


def test_several_gpus_plan_on_the_most_free(gpus: Any) -> None:
    gpus([rtx_4090(index=0), h100(index=1, free_mib=60000), t4(index=2)])
    code, data = as_json(*BIG[:-1], "--batch", "4")
    assert [v["index"] for v in data["gpus"]] == [0, 1, 2]
    assert data["best_gpu"]["index"] == 1
    assert data["fits"] == data["gpus"][1]["fits_free"]
    assert code == (0 if data["fits"] else 3)
    assert data["gpus"][2]["compute_dtype"] == "fp16"
    assert data["estimate"]["plan"]["compute_dtype"] == "bf16"


def test_check_path_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vramcalc.cli import app\n"
        "r = CliRunner().invoke(app, ['check', '-m', 'llama-3.1-8b', '--gpu', 'h100-sxm',"
        " '--batch', '64', '--seq-len', '8192'])\n"
        "assert r.exit_code == 3, r.output\n"
        "r = CliRunner().invoke(app, ['check', '-m', 'llama-3.1-8b', '--gpu', 'h100'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = {'torch', 'transformers', 'bitsandbytes', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
