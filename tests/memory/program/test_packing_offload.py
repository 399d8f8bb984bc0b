"""Issue 29 part B: batch layouts (packed, padding-free, real tokens, the worst step of a
lengths file), activation offloading, trainer presets, and their --from-config keys.

The mechanism tests derive the expected bytes from the spec and the technique's source
(docs/memory-model.md "Packing, padding-free batches and activation offloading"), and read
the step program's requested peaks (step_requests.requested_peaks: what the program holds,
before the allocator's rounding into blocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import vramcalc
from vramcalc.cli import app
from vramcalc.commands.options import worst_step
from vramcalc.errors import PlanError
from vramcalc.memory.estimate import estimate
from vramcalc.memory.program.activations import layer_saved_bytes_per_token, residual_bytes
from vramcalc.memory.program.load import load_requests
from vramcalc.memory.program.step import offload_host_bytes, requested_peaks, step_requests
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.trainers import TRAINERS
from vramcalc.training_config import read_training_config

runner = CliRunner()


def _round(n: int) -> int:
    """c10 round_size: requests are counted in 512-byte units."""
    return -(-n // 512) * 512


def _requested(spec: ModelSpec, plan: TrainPlan) -> dict[str, int]:
    r = step_requests(spec, plan)
    return requested_peaks(load_requests(spec, plan), r.requests, r.phases)


def _plan_json(*args: str) -> dict[str, Any]:
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout))


def _error(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# ---- the step program --------------------------------------------------------------------

@pytest.mark.replay
def test_offloaded_checkpoints_leave_the_gpu() -> None:
    """Unsloth's offloaded checkpointing: every checkpointed layer input but the last goes
    to a pinned host buffer, one GPU buffer of one input brings them back, and the first
    layer's input is the leaf enable_input_require_grads made, which its AccumulateGrad
    node keeps on the GPU through backward (run 32 trace of k015): the forward and backward
    peaks fall by (layers - 3) inputs, and the host holds (layers - 1)."""
    spec = get_spec("qwen2.5-0.5b")
    plan = TrainPlan(batch_size=2, seq_len=1024)
    off = plan.model_copy(update={"offload_activations": "checkpoints"})
    one = plan.tokens * spec.hidden_size * residual_bytes(plan)
    layers = spec.num_hidden_layers
    before, after = _requested(spec, plan), _requested(spec, off)
    for phase in ("forward", "backward"):
        assert before[phase] - after[phase] == (layers - 3) * _round(one)
    assert offload_host_bytes(spec, off) == (layers - 1) * one
    assert estimate(spec, off).host_bytes == (layers - 1) * one
    assert estimate(spec, plan).host_bytes == 0


@pytest.mark.replay
def test_offloading_every_saved_activation() -> None:
    """OffloadActivations without checkpointing: the host takes every layer's saved
    activations (activations.layer_saved_bytes_per_token, the formula side) and the loss's
    fp32 log-softmax output (outside the lm_head's NoOpManager), within 2 %; the GPU peak
    falls by most of it."""
    spec = get_spec("qwen2.5-0.5b")
    plan = TrainPlan(batch_size=2, seq_len=1024, gradient_checkpointing=False)
    off = plan.model_copy(update={"offload_activations": "all"})
    host = offload_host_bytes(spec, off)
    saved = (spec.num_hidden_layers * plan.tokens * layer_saved_bytes_per_token(spec, plan)
             + plan.tokens * spec.vocab_size * 4)
    assert abs(host - saved) <= 0.02 * saved
    before, after = _requested(spec, plan), _requested(spec, off)
    assert before["forward"] - after["forward"] >= 0.6 * host
    with_ck = off.model_copy(update={"gradient_checkpointing": True})
    assert 0 < offload_host_bytes(spec, with_ck) < host  # only the layer inputs, then


@pytest.mark.replay
def test_padding_free_is_one_row_of_the_real_tokens() -> None:
    """Padding-free with flash attention (varlen, no mask) holds what one row of the step's
    real tokens holds; under sdpa the packed sequences add the (1, 1, T, T) bool mask."""
    spec = get_spec("qwen2.5-0.5b")
    free = TrainPlan(batch_size=2, seq_len=1024, layout="padding-free", tokens_per_step=1500,
                     attn="flash_attention_2")
    row = TrainPlan(batch_size=1, seq_len=1500, attn="flash_attention_2")
    assert estimate(spec, free) == estimate(spec, row)
    sdpa = free.model_copy(update={"attn": "sdpa"})
    flash, masked = _requested(spec, free), _requested(spec, sdpa)
    assert masked["forward"] - flash["forward"] == _round(1500 * 1500)
    # fewer real tokens, less memory
    fewer = free.model_copy(update={"tokens_per_step": 700})
    assert estimate(spec, fewer).required_device_bytes < estimate(
        spec, free).required_device_bytes


@pytest.mark.replay
def test_eager_padding_free_scores_the_whole_row() -> None:
    """Eager attention over a padding-free row computes (1, heads, T, T) scores (the
    block-causal mask only hides entries), not batch rows of (heads, S, S): without
    checkpointing every layer keeps its fp32 probabilities, so the forward's end holds at
    least layers x heads x (T^2 - batch x S^2) x 4 bytes more."""
    spec = get_spec("qwen2.5-0.5b")
    padded = TrainPlan(batch_size=4, seq_len=512, attn="eager", gradient_checkpointing=False)
    free = padded.model_copy(update={"layout": "padding-free"})
    grow = spec.num_hidden_layers * spec.num_attention_heads * (2048**2 - 4 * 512**2) * 4
    assert _requested(spec, free)["forward"] - _requested(spec, padded)["forward"] >= grow


def test_worst_step() -> None:
    lengths = [100, 3000, 700, 2500, 50]
    assert worst_step(lengths, 2, 2048, "padded") == (2048, None)  # truncated
    assert worst_step(lengths, 2, 4096, "padded") == (3000, None)
    assert worst_step(lengths, 2, 2048, "padding-free") == (2048, 4096)
    assert worst_step(lengths, 3, 4096, "padding-free") == (4096, 3000 + 2500 + 700)
    assert worst_step(lengths, 9, 4096, "padding-free") == (4096, sum(lengths))
    with pytest.raises(PlanError, match="packed rows"):
        worst_step(lengths, 2, 2048, "packed")


def test_lengths_file_plans_the_worst_step(tmp_path: Path) -> None:
    f = tmp_path / "lengths.txt"
    f.write_text("# tokens per sample\n100\n3000\n\n700\n2500\n")
    got = _plan_json("-m", "qwen2.5-0.5b", "-b", "2", "-s", "4096", "--lengths", str(f))
    assert (got["plan"]["seq_len"], got["plan"]["tokens_per_step"]) == (3000, None)
    got = _plan_json("-m", "qwen2.5-0.5b", "-b", "2", "-s", "4096", "--lengths", str(f),
                     "--batch-layout", "padding-free")
    assert got["plan"]["tokens_per_step"] == 5500
    want = _plan_json("-m", "qwen2.5-0.5b", "-b", "2", "-s", "4096", "--batch-layout",
                      "padding-free", "--tokens-per-step", "5500")
    assert got["required_device_bytes"] == want["required_device_bytes"]


def test_options_refused_in_one_line(tmp_path: Path) -> None:
    m = ("plan", "-m", "qwen2.5-0.5b")
    assert "only with --batch-layout padding-free" in _error(*m, "--tokens-per-step", "100")
    assert "most a step holds" in _error(*m, "--batch-layout", "padding-free",
                                          "--tokens-per-step", "100000")
    assert "unknown batch layout" in _error(*m, "--batch-layout", "ragged")
    assert "unknown activation offloading" in _error(*m, "--offload-activations", "disk")
    assert "--no-gradient-checkpointing" in _error(*m, "--offload-activations", "checkpoints",
                                                   "--no-gradient-checkpointing")
    bad = tmp_path / "bad.txt"
    bad.write_text("12\nlong\n")
    assert "line 2" in _error(*m, "--lengths", str(bad))
    assert "cannot read" in _error(*m, "--lengths", str(tmp_path / "missing.txt"))
    good = tmp_path / "ok.txt"
    good.write_text("12\n")
    assert "give one" in _error(*m, "--lengths", str(good), "--batch-layout", "padding-free",
                                "--tokens-per-step", "5")
    assert "packed rows" in _error(*m, "--lengths", str(good), "--batch-layout", "packed")
    assert "contradicts --trainer trl" in _error(*m, "--trainer", "trl", "--loop", "plain")
    assert "contradicts --trainer plain" in _error(*m, "--trainer", "plain", "--loop",
                                                   "trainer")
    assert "unknown trainer" in _error(*m, "--trainer", "deepspeed")


# ---- trainer presets ---------------------------------------------------------------------

_FIELD = {"batch": "batch_size", "batch_layout": "layout", "dora": "use_dora"}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_sets_what_it_claims(name: str) -> None:
    got = _plan_json("-m", "llama-3.2-1b", "--trainer", name)["plan"]
    for option, value in TRAINERS[name].options.items():
        assert got[_FIELD.get(option, option)] == value, (option, got)


def test_given_options_override_the_trainer() -> None:
    got = _plan_json("-m", "llama-3.2-1b", "--trainer", "unsloth", "--batch", "2", "--rank",
                     "8", "--no-gradient-checkpointing", "--quant", "none")["plan"]
    assert (got["batch_size"], got["rank"], got["gradient_checkpointing"]) == (2, 8, False)
    assert got["offload_activations"] == "none"  # Unsloth's offloading goes with its GC
    assert (got["method"], got["quant"]) == ("lora", "none")
    assert got["seq_len"] == 2048 and got["lora_dropout"] == 0.0  # the rest as Unsloth's


def test_from_config_wins_over_the_trainer(tmp_path: Path) -> None:
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\nper_device_train_batch_size: 3\n"
                   "max_length: 333\npadding_free: true\nactivation_offloading: true\n")
    got = _plan_json("--from-config", str(cfg), "-m", "qwen2.5-0.5b", "--trainer", "trl")
    p = got["plan"]
    assert (p["batch_size"], p["seq_len"], p["layout"]) == (3, 333, "padding-free")
    assert p["offload_activations"] == "all"
    assert p["gradient_checkpointing"] is True and p["compute_dtype"] == "bf16"  # TRL's
    assert got["host_bytes"] > 0


# ---- --from-config -----------------------------------------------------------------------

def _config(tmp_path: Path, name: str, text: str) -> dict[str, Any]:
    f = tmp_path / name
    f.write_text(text)
    tc = read_training_config(f)
    for key in ("packing", "padding_free", "sample_packing", "neat_packing",
                "activation_offloading", "use_unsloth_gc", "gradient_checkpointing"):
        assert not any(u.startswith(key + ":") and "not modelled" in u and "disk" not in u
                       for u in tc.unmodelled), tc.unmodelled
    return tc.options


def test_config_keys_mapped(tmp_path: Path) -> None:
    trl = _config(tmp_path, "a.yaml", "model_name_or_path: m\npacking: true\n"
                  "activation_offloading: true\n")
    assert (trl["batch_layout"], trl["offload_activations"]) == ("padding-free", "all")
    wrapped = _config(tmp_path, "b.yaml", "model_name_or_path: m\npacking: true\n"
                      "packing_strategy: wrapped\n")
    assert "batch_layout" not in wrapped  # full rows, cross-attention: padded
    axo = _config(tmp_path, "c.yml", "base_model: m\nsequence_len: 2048\n"
                  "sample_packing: true\ngradient_checkpointing: offload\n")
    assert (axo["batch_layout"], axo["offload_activations"]) == ("packed", "all")
    assert axo["gradient_checkpointing"] is True
    axo2 = _config(tmp_path, "d.yml", "base_model: m\nsequence_len: 2048\n"
                   "gradient_checkpointing: true\nactivation_offloading: hidden_states\n")
    assert axo2["offload_activations"] == "checkpoints"
    hf = _config(tmp_path, "f.yaml", "model_name_or_path: m\ngradient_checkpointing: true\n"
                 "activation_checkpointing_kwargs:\n  offload: true\n")
    assert hf["offload_activations"] == "checkpoints"
    lf = _config(tmp_path, "e.yaml", "model_name_or_path: m\nfinetuning_type: lora\n"
                 "neat_packing: true\nuse_unsloth_gc: true\n")
    assert (lf["batch_layout"], lf["offload_activations"]) == ("packed", "checkpoints")


# ---- one answer --------------------------------------------------------------------------

@pytest.mark.replay
def test_one_answer_with_the_new_options() -> None:
    flags = ["-m", "qwen2.5-0.5b", "-b", "4", "-s", "1024", "--batch-layout", "padding-free",
             "--tokens-per-step", "3000", "--offload-activations", "checkpoints"]
    plan = _plan_json(*flags, "--gpu", "rtx-4090")
    r = runner.invoke(app, ["check", *flags, "--gpu", "rtx-4090", "--json"])
    assert r.exit_code in (0, 3), r.output
    assert json.loads(r.stdout)["best_gpu"]["required_device_bytes"] == plan[
        "required_device_bytes"]
    api = vramcalc.plan("qwen2.5-0.5b", batch_size=4, seq_len=1024, layout="padding-free",
                        tokens_per_step=3000, offload_activations="checkpoints")
    assert api.required_device_bytes == plan["required_device_bytes"]
    assert api.host_bytes == plan["host_bytes"] > 0


# ---- the calibration worker (CPU, a tiny model) -------------------------------------------

@pytest.mark.parametrize("layout", ["padding-free", "packed"])
def test_worker_runs_layouts_and_offloaded_checkpoints(layout: str) -> None:
    """The worker feeds padding-free / packed rows with position_ids and offloads the
    checkpointed layer inputs as the program models it: (layers - 1) inputs on the host."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramcalc.calibrate.run import measure_point

    tiny = get_spec("qwen2.5-0.5b").model_copy(update={
        "name": "tiny-qwen", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": None, "tie_word_embeddings": False})
    plan = TrainPlan(batch_size=2, seq_len=16, optimizer="adamw_torch", layout=layout,
                     offload_activations="checkpoints", lora_dropout=0.0)
    got = measure_point(tiny, plan, None, steps=1, device="cpu")
    assert "error" not in got, got.get("error")
    assert got["offload"]["layers"] == tiny.num_hidden_layers
    one = plan.tokens * tiny.hidden_size * residual_bytes(plan)
    assert got["offload"]["host_peak_bytes"] == (tiny.num_hidden_layers - 1) * one
    assert got["offload"]["host_peak_bytes"] == offload_host_bytes(tiny, plan)


def test_worker_refuses_layouts_outside_the_trainer() -> None:
    pytest.importorskip("peft")
    from vramcalc.calibrate.run import measure_point

    tiny = get_spec("qwen2.5-0.5b").model_copy(update={
        "name": "tiny-qwen", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": None, "tie_word_embeddings": False})
    plan = TrainPlan(batch_size=1, seq_len=16, optimizer="adamw_torch", loop="plain",
                     layout="padding-free")
    got = measure_point(tiny, plan, None, steps=1, device="cpu")
    assert got.get("cannot_start") and "--loop trainer" in got["error"]


def test_suggestions_keep_the_real_tokens_runnable() -> None:
    """A smaller batch for a padding-free plan whose --tokens-per-step it cannot hold
    suggests the tokens too (TrainPlan.tokens: at most batch x seq_len): every suggested
    plan passes the options' rule, and its bytes are the plan's."""
    from vramcalc.sizing.advice import suggest

    spec = get_spec("llama-3.1-8b")
    plan = TrainPlan(batch_size=8, seq_len=4096, layout="padding-free", tokens_per_step=30000)
    found = suggest(spec, plan, 40 * 2**30, 2**29)
    resized = [s for s in found if {"batch_size", "seq_len"} & set(s.changes)]
    assert resized
    for s in resized:
        new = s.apply(plan)
        assert new.tokens_per_step is not None
        assert new.tokens_per_step <= new.batch_size * new.seq_len
        assert "--tokens-per-step" in s.flags
        assert estimate(spec, new).required_device_bytes == s.required_device_bytes


@pytest.mark.replay
def test_required_memory_grows_with_the_real_tokens() -> None:
    """Required free memory never falls as the padding-free step's tokens grow (one more,
    and doubled), with and without offloading (docs "Required memory never falls")."""
    spec = get_spec("llama-3.2-1b")
    for offload in ("none", "checkpoints", "all"):
        base = TrainPlan(batch_size=4, seq_len=2048, layout="padding-free",
                         offload_activations=offload)
        needs = [estimate(spec, base.model_copy(update={"tokens_per_step": t}))
                 .required_device_bytes for t in (1000, 1001, 2002, 4004)]
        assert needs == sorted(needs), (offload, needs)
