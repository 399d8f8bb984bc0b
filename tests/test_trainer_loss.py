"""Trainer presets apply the loss their trainer applies by default (trainers.py): TRL
SFTTrainer's fused LM head of TRL >= 1.15 (--loss-kernel trl-fused; trl-chunked was TRL
1.4-1.14's chunked_nll), Unsloth's fused cross-entropy
(planned as liger's), none for the HF Trainer and axolotl; a given --loss-kernel or one
read from --from-config wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import vramcalc
from vramcalc.cli import app
from vramcalc.trainers import TRAINERS, apply_trainer
from vramcalc.training_config import read_training_config

runner = CliRunner()


def _plan(*args: str) -> tuple[dict[str, Any], str]:
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout)), r.stderr


@pytest.mark.parametrize(("trainer", "kernel"), [
    ("trl", "trl-fused"), ("unsloth", "liger"), ("hf", "torch"), ("axolotl", "torch"),
    ("plain", "torch"),
])
def test_preset_plans_its_loss(trainer: str, kernel: str) -> None:
    got, _ = _plan("-m", "llama-3.2-1b", "--trainer", trainer)
    assert got["plan"]["loss_kernel"] == kernel


def test_preset_loss_is_the_estimate_of_that_kernel() -> None:
    """--trainer trl's bytes are the bytes of its options given by hand (one answer)."""
    got, _ = _plan("-m", "llama-3.2-1b", "--trainer", "trl")
    by_hand, _ = _plan("-m", "llama-3.2-1b", "--batch", "8", "--seq-len", "1024",
                       "--optimizer", "adamw_torch_fused", "--loss-kernel", "trl-fused",
                       "--no-kbit-prep", "--adapter-dtype", "bf16")
    assert got["required_device_bytes"] == by_hand["required_device_bytes"]
    full, _ = _plan("-m", "llama-3.2-1b", "--batch", "8", "--seq-len", "1024",
                    "--optimizer", "adamw_torch_fused", "--no-kbit-prep", "--adapter-dtype",
                    "bf16")
    assert got["peak_allocated_bytes"] < full["peak_allocated_bytes"]  # no full logits
    api = vramcalc.plan("llama-3.2-1b", batch_size=8, seq_len=1024,
                        optimizer="adamw_torch_fused", loss_kernel="trl-fused",
                        kbit_prep=False, adapter_dtype="bf16")
    assert api.required_device_bytes == got["required_device_bytes"]


def test_given_loss_kernel_wins_with_a_note() -> None:
    got, err = _plan("-m", "llama-3.2-1b", "--trainer", "trl", "--loss-kernel", "torch")
    assert got["plan"]["loss_kernel"] == "torch"
    assert "applies the loss 'fused_lm_head' by default" in " ".join(err.split())


def test_unsloth_note_says_what_differs() -> None:
    _, notes = apply_trainer({"loss_kernel": "torch", "loop": "trainer",
                              "gradient_checkpointing": True}, "unsloth", set())
    assert any("planned as liger-kernel's" in n for n in notes)
    assert TRAINERS["unsloth"].options["loss_kernel"] == "liger"


@pytest.mark.parametrize(("text", "kernel"), [
    # trl 1.16.0: chunked_nll is an alias of nll; both run SFTTrainer's fused LM head
    ("loss_type: chunked_nll\n", "trl-fused"),
    ("loss_type: nll\n", "trl-fused"),
    ("use_liger_kernel: true\n", "liger"),
    ("loss_type: nll\nuse_liger_kernel: true\n", "liger"),
])
def test_config_loss_type(tmp_path: Path, text: str, kernel: str) -> None:
    f = tmp_path / "sft.yaml"
    f.write_text("model_name_or_path: meta-llama/Llama-3.2-1B\n" + text)
    assert read_training_config(f).options["loss_kernel"] == kernel
    got, _ = _plan("--from-config", str(f), "-m", "llama-3.2-1b", "--trainer", "trl")
    assert got["plan"]["loss_kernel"] == kernel  # the config wins over the preset


def test_config_dft_is_listed_not_modelled(tmp_path: Path) -> None:
    """dft runs the fused head too (trl 1.16.0 compute_loss): planned as it, its per-token
    weights listed as not modelled."""
    f = tmp_path / "sft.yaml"
    f.write_text("model_name_or_path: m\nloss_type: dft\n")
    tc = read_training_config(f)
    assert tc.options["loss_kernel"] == "trl-fused"
    assert any(u.startswith("loss_type: dft") for u in tc.unmodelled)


@pytest.mark.parametrize(("model", "trainer"), [("phi-2", "trl"), ("falcon-7b", "trl"),
                                                 ("phi-2", "unsloth")])
def test_preset_loss_falls_back_where_it_cannot_be_planned(model: str, trainer: str) -> None:
    """phi-2 / falcon (parallel blocks: the step program does not cover a fused head) and
    Liger's model types: the preset's loss is planned as the full logits, with a note;
    a given --loss-kernel is still refused."""
    extra = ["--targets", "all-linear"] if trainer == "unsloth" else []
    got, err = _plan("-m", model, "--trainer", trainer, *extra)
    assert got["plan"]["loss_kernel"] == "torch"
    assert "cannot plan here" in " ".join(err.split())
    r = runner.invoke(app, ["plan", "-m", model, "--trainer", trainer, *extra,
                            "--loss-kernel", "trl-chunked" if trainer == "trl" else "liger"])
    assert r.exit_code != 0
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("Error: --loss-kernel")]
