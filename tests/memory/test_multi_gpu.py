"""Several GPUs: arithmetic by hand on a tiny spec, invariants, CLI keys and bad inputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.commands.check import EXIT_DOES_NOT_FIT
from vramcalc.memory.estimate import estimate
from vramcalc.memory.multi_gpu import (
    FSDP_UNITS_IN_FLIGHT,
    NCCL_BUFFERS,
    ParallelPlan,
    device_map_layers,
    estimate_parallel,
    smallest_fitting_parallel,
)
from vramcalc.memory.program.trainable import lora_param_bytes
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.verdict import fits_certainly

TINY = ModelSpec(
    name="tiny", model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
LORA = TrainPlan(method="lora", optimizer="adamw_torch", batch_size=2, seq_len=64)
QLORA = TrainPlan(batch_size=2, seq_len=64)
runner = CliRunner()


def test_ddp_by_hand() -> None:
    single = estimate(TINY, LORA)
    pe = estimate_parallel(TINY, LORA, ParallelPlan(gpus=2, strategy="ddp"))
    c = pe.busiest.components
    # DDP: everything replicated + one bucket copy of the fp32 LoRA gradients + NCCL buffers
    assert c.comm_buffers == lora_param_bytes(TINY, LORA)
    assert c.cuda_context == single.components.cuda_context + NCCL_BUFFERS
    assert c.base_weights == single.components.base_weights
    assert pe.busiest.peak_allocated_bytes == single.peak_allocated_bytes + c.comm_buffers
    assert len(pe.per_gpu) == 2


def test_fsdp_full_shard_by_hand() -> None:
    single = estimate(TINY, LORA)
    s = single.components
    pe = estimate_parallel(TINY, LORA, ParallelPlan(gpus=4, strategy="fsdp"))
    c = pe.busiest.components
    assert c.base_weights == -(-s.base_weights // 4)
    assert c.unquantized_params == -(-s.unquantized_params // 4)
    assert c.optimizer_states == -(-s.optimizer_states // 4)
    assert c.activations == s.activations  # per-device batch: activations are not sharded
    # gathered: 2 layers in flight + the root unit (embeddings, lm_head, final norm, bf16)
    root = (1000 * 64 + 1000 * 64 + 64) * 2  # 256128
    # one layer: bf16 Linears q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down
    # 128x64 = 36864 x 2 B; fp32 LoRA r=16 = 16384 x 4 B; the rest of the unquantized
    # tensors (norms, rotary buffer, rounded to 512 B) less the root: 2944 B over 2 layers.
    unit = 36864 * 2 + 16384 * 4 + 2944 // 2
    assert pe.comm_detail["gathered_params"] == FSDP_UNITS_IN_FLIGHT * unit + root


def test_fsdp_one_gpu_is_single_gpu_plus_nccl() -> None:
    single = estimate(TINY, LORA)
    pe = estimate_parallel(TINY, LORA, ParallelPlan(gpus=1, strategy="fsdp"))
    assert pe.busiest.required_device_bytes == single.required_device_bytes + NCCL_BUFFERS


def test_sharded_components_shrink_with_n() -> None:
    spec = get_spec("llama-3.1-8b")
    prev = None
    for n in (1, 2, 4, 8):
        c = estimate_parallel(spec, QLORA, ParallelPlan(gpus=n, strategy="fsdp")).busiest.components
        now = (c.base_weights, c.unquantized_params, c.adapter_weights, c.optimizer_states)
        if prev is not None:
            assert all(a <= b for a, b in zip(now, prev, strict=True))
            assert now[0] < prev[0]
        prev = now


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "phi-3-mini"])
def test_ddp_never_below_single(name: str) -> None:
    spec = get_spec(name)
    single = estimate(spec, QLORA)
    for n in (2, 8):
        pe = estimate_parallel(spec, QLORA, ParallelPlan(gpus=n, strategy="ddp"))
        assert pe.busiest.required_device_bytes >= single.required_device_bytes


def test_fsdp_qlora_stores_unquantized_in_bf16() -> None:
    spec = get_spec("llama-3.1-8b")
    pe = estimate_parallel(spec, QLORA, ParallelPlan(gpus=1, strategy="fsdp"))
    single = estimate(spec, QLORA)  # prepare_model_for_kbit_training: fp32
    assert pe.busiest.components.unquantized_params < 0.6 * single.components.unquantized_params
    assert pe.busiest.components.base_weights == single.components.base_weights


def test_offload_moves_state_to_host() -> None:
    spec = get_spec("llama-2-70b")
    on = estimate_parallel(spec, QLORA, ParallelPlan(gpus=2, strategy="fsdp"))
    off = estimate_parallel(spec, QLORA, ParallelPlan(gpus=2, strategy="fsdp", offload="cpu"))
    assert off.busiest.components.base_weights == 0
    assert off.busiest.required_device_bytes < on.busiest.required_device_bytes
    assert off.host_offload_bytes > 2 * on.busiest.components.base_weights * 0.99


def test_device_map_layers_and_weights() -> None:
    spec = get_spec("llama-3.1-8b")
    for n in (2, 3, 4):
        par = ParallelPlan(gpus=n, strategy="device-map")
        counts = device_map_layers(spec, QLORA, par)
        assert sum(counts) == spec.num_hidden_layers
        pe = estimate_parallel(spec, QLORA, par)
        single = estimate(spec, QLORA).components
        total = sum(e.components.base_weights for e in pe.per_gpu)
        assert abs(total - single.base_weights) <= n * 512 * 32  # int rounding per GPU
        assert pe.per_gpu[-1].components.logits_loss == single.logits_loss
        assert all(e.components.logits_loss == 0 for e in pe.per_gpu[:-1])


def test_zero3_shards_params_zero2_does_not() -> None:
    spec = get_spec("llama-3.1-8b")
    z2 = estimate_parallel(spec, QLORA, ParallelPlan(gpus=4, strategy="zero2")).busiest
    z3 = estimate_parallel(spec, QLORA, ParallelPlan(gpus=4, strategy="zero3")).busiest
    assert z2.components.base_weights == estimate(spec, QLORA).components.base_weights
    assert z3.components.base_weights < z2.components.base_weights / 3


def test_smallest_fitting_parallel_for_70b_on_24gb() -> None:
    found = smallest_fitting_parallel(get_spec("llama-2-70b"), QLORA, 22 * 2**30, 2**29)
    assert found and found[0].gpus >= 2
    assert all(fits_certainly(22 * 2**30, o.required_device_bytes, 2**29) for o in found)


def test_int8_suggestions_skip_the_strategies_it_cannot_use() -> None:
    """int8 weights cannot be sharded (FSDP / ZeRO-3 raise a PlanError for them): the
    multi-GPU suggestions leave those strategies out instead of failing `check`."""
    int8 = TrainPlan(method="qlora", quant="int8", batch_size=8, seq_len=1024)
    found = smallest_fitting_parallel(get_spec("mistral-7b"), int8, 22 * 2**30, 2**29)
    assert found
    assert {o.strategy for o in found} <= {"ddp", "device-map"}
    result = runner.invoke(app, ["check", "-m", "mistral-7b", "--quant", "int8", "--batch",
                                 "8", "--seq-len", "1024", "--gpu", "rtx-4090"])
    assert result.exit_code == EXIT_DOES_NOT_FIT  # a verdict, not an error (exit 1)
    assert "does NOT fit" in result.output
    assert "cannot be sharded" not in result.output


def test_bad_parallel_plans() -> None:
    with pytest.raises(ValueError):
        ParallelPlan(gpus=2, strategy="ddp", offload="cpu")
    with pytest.raises(ValueError):
        ParallelPlan(gpus=6, strategy="fsdp", gpus_per_node=4)


def test_cli_json_keys_and_per_gpu() -> None:
    one = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", "--json"])
    res = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", "--gpus", "4", "--strategy", "fsdp",
                              "--json"])
    assert res.exit_code == 0, res.output
    out, single = json.loads(res.stdout), json.loads(one.stdout)
    assert set(single) - {"calibration"} <= set(out)
    assert len(out["per_gpu"]) == 4
    assert out["required_device_bytes"] == max(g["required_device_bytes"] for g in out["per_gpu"])


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0"], "Error: --gpus must be a positive integer, got 0"),
    (["--gpus", "2", "--strategy", "tp"], "Error: unknown strategy 'tp'"),
    (["--gpus", "2", "--strategy", "ddp", "--offload", "cpu"], "Error: --offload cpu needs"),
    (["--gpus", "3", "--strategy", "fsdp", "--gpus-per-node", "2"], "Error: --gpus 3 is not"),
])
def test_cli_bad_inputs(args: list[str], message: str) -> None:
    res = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", *args])
    assert res.exit_code == 1
    assert res.stderr.startswith(message)
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_cli_max_per_gpu_count() -> None:
    res = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", "--gpus", "2", "--strategy", "fsdp",
                              "--gpu-memory", "24", "--max", "batch", "--json"])
    assert res.exit_code == 0, res.output
    two = json.loads(res.stdout)["value"]
    res1 = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", "--gpus", "1", "--strategy", "fsdp",
                               "--gpu-memory", "24", "--max", "batch", "--json"])
    assert two >= json.loads(res1.stdout)["value"] >= 1


def test_check_several_named_gpus() -> None:
    res = runner.invoke(app, ["check", "-m", "llama-2-70b", "--gpu", "rtx-4090", "--gpus", "2",
                              "--strategy", "fsdp", "--offload", "cpu", "--json"])
    assert res.exit_code in (0, 3), res.output
    out = json.loads(res.stdout)
    assert len(out["per_gpu"]) == 2 and "fits" in out


def test_multi_gpu_run_pieces(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from vramcalc.calibrate.multi_gpu_run import (
        SAFE_ENV,
        accelerate_config,
        child_env,
        launch_command,
        merge_ranks,
        write_config,
    )

    par = ParallelPlan(gpus=2, strategy="fsdp", offload="cpu")
    cfg = yaml.safe_load(write_config(par, tmp_path / "a.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] == 2
    assert cfg["fsdp_config"]["fsdp_offload_params"] is True
    assert cfg["fsdp_config"]["fsdp_use_orig_params"] is False
    assert accelerate_config(ParallelPlan(gpus=2))["distributed_type"] == "MULTI_GPU"
    with pytest.raises(ValueError):
        accelerate_config(ParallelPlan(gpus=2, strategy="zero3"))
    env = child_env({"PATH": "/bin"})
    assert all(env[k] == v for k, v in SAFE_ENV.items())
    cmd = launch_command(tmp_path / "a.yaml", par, tmp_path / "p.json", tmp_path)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert "--num_processes" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    for r, peak in ((0, 10), (1, 12)):
        (tmp_path / f"rank{r}.json").write_text(json.dumps(
            {"rank": r, "point": {}, "max_allocated": peak, "max_reserved": peak + 1,
             "nvml_peak_used": peak + 5}))
    merged = merge_ranks(tmp_path)
    assert merged["busiest_rank"] == 1 and merged["nvml_peak_used"] == 17
    assert len(merged["ranks"]) == 2


def test_published_multi_gpu_numbers() -> None:
    """bench/published_multi_gpu.py: every published per-GPU number within 10 % or with a
    recorded reason, and no row drifts more than 1 point from the error it had when the
    reason was written (llm-analysis's within_range, with the gaps named)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "bench"))
    try:
        import published_multi_gpu as bench
    finally:
        sys.path.pop(0)
    rows = bench.rows()
    assert len(rows) >= 18
    for r in rows:
        if abs(r["error"]) > bench.TOLERANCE:
            assert r["id"] in bench.GAP_REASONS, r
    within = [r for r in rows if abs(r["error"]) <= bench.TOLERANCE]
    assert len(within) >= 12
    known = {"peft-fsdp-qlora-70b": -0.045, "peft-zero3-qlora-70b": -0.079,
             "answerai-70b-qlora-offload-b2": -0.088, "torchtune-70b-lora-8gpu": 0.175}
    by_id = {r["id"]: r for r in rows}
    for key, err in known.items():
        assert by_id[key]["error"] == pytest.approx(err, abs=0.01), key
