"""--trainer trl / --from-config (TRL) plan QLoRA as SFTTrainer prepares it: no
prepare_model_for_kbit_training (--no-kbit-prep), bf16 adapters (--adapter-dtype bf16), for
a quantized base only (trl 1.16 sft_trainer.py); the options are refused where they do not
apply, and the estimate moves (the step program, not a label)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

import vramcalc
from vramcalc.cli import app
from vramcalc.trainers import apply_trainer

runner = CliRunner()


def _plan(*args: str) -> dict[str, Any]:
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout))


def test_trl_preset_skips_kbit_prep_and_casts_adapters_for_qlora() -> None:
    got = _plan("-m", "llama-3.2-1b", "--trainer", "trl")
    assert got["plan"]["kbit_prep"] is False and got["plan"]["adapter_dtype"] == "bf16"
    prepared = _plan("-m", "llama-3.2-1b", "--trainer", "trl", "--kbit-prep",
                     "--adapter-dtype", "fp32")
    # norms, embeddings, lm_head in bf16 and a bf16 residual stream: less memory
    c, p = got["components"], prepared["components"]
    assert c["unquantized_params"] < p["unquantized_params"]
    assert c["adapter_weights"] * 2 == p["adapter_weights"]
    assert c["activations"] < p["activations"]
    assert got["peak_allocated_bytes"] < prepared["peak_allocated_bytes"]


@pytest.mark.parametrize("args", [("--method", "lora"), ("--quant", "none"),
                                  ("--method", "full")])
def test_trl_preset_leaves_a_16bit_base_alone(args: tuple[str, ...]) -> None:
    got = _plan("-m", "llama-3.2-1b", "--trainer", "trl", *args)
    assert got["plan"]["kbit_prep"] is True and got["plan"]["adapter_dtype"] == "fp32"


def test_trl_preset_with_dora_keeps_fp32_adapters() -> None:
    out, _ = apply_trainer({"kbit_prep": None, "adapter_dtype": None, "dora": True,
                            "loop": "trainer"}, "trl", set())
    assert out["kbit_prep"] is False and out["adapter_dtype"] is None


@pytest.mark.parametrize(("args", "words"), [
    (("--method", "lora", "--no-kbit-prep"), "--no-kbit-prep"),
    (("--method", "lora", "--kbit-prep"), "--kbit-prep"),
    (("--method", "full", "--adapter-dtype", "bf16"), "--adapter-dtype"),
    (("--dora", "--adapter-dtype", "bf16"), "--adapter-dtype"),
    (("--adapter-dtype", "bf32"), "--adapter-dtype"),
    (("--task", "infer", "--no-kbit-prep"), "--kbit-prep: not used by --task infer"),
])
def test_refused_where_it_does_not_apply(args: tuple[str, ...], words: str) -> None:
    r = runner.invoke(app, ["plan", "-m", "llama-3.2-1b", *args])
    assert r.exit_code != 0
    assert "Error:" in r.output and words in r.output
    assert "Traceback" not in r.output


def test_infer_still_reads_adapter_dtype() -> None:
    r = runner.invoke(app, ["plan", "-m", "llama-3.2-1b", "--task", "infer",
                            "--adapter-dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert "bf16" in r.output


def test_one_answer_cli_api_check() -> None:
    cli = _plan("-m", "llama-3.2-3b", "--no-kbit-prep", "--adapter-dtype", "bf16",
                "--batch", "2", "--seq-len", "1024")
    api = vramcalc.plan("llama-3.2-3b", kbit_prep=False, adapter_dtype="bf16", batch_size=2,
                        seq_len=1024)
    assert api.required_device_bytes == cli["required_device_bytes"]
    chk = vramcalc.check("llama-3.2-3b", gpus=["H100 80GB"], kbit_prep=False,
                         adapter_dtype="bf16", batch_size=2, seq_len=1024, calibration=False)
    assert chk.estimate.required_device_bytes == cli["required_device_bytes"]


def test_axolotl_preset_plans_its_kbit_preparation() -> None:
    """axolotl 067b021 loaders/model.py: prepare_model_for_kbit_training, then the norms,
    embeddings and lm_head back to the load dtype (--no-kbit-prep), peft's fp32 adapters;
    for a 4-bit and an 8-bit base, not for a 16-bit LoRA."""
    for args in ((), ("--quant", "int8")):
        got = _plan("-m", "llama-3.2-1b", "--trainer", "axolotl", *args)
        assert got["plan"]["kbit_prep"] is False and got["plan"]["adapter_dtype"] == "fp32"
        prepared = _plan("-m", "llama-3.2-1b", "--trainer", "axolotl", "--kbit-prep", *args)
        assert prepared["plan"]["kbit_prep"] is True
        assert (got["components"]["unquantized_params"]
                < prepared["components"]["unquantized_params"])
    lora = _plan("-m", "llama-3.2-1b", "--trainer", "axolotl", "--method", "lora")
    assert lora["plan"]["kbit_prep"] is True and lora["plan"]["adapter_dtype"] == "fp32"
    r = runner.invoke(app, ["plan", "-m", "llama-3.2-1b", "--trainer", "axolotl",
                            "--method", "lora", "--json"])
    assert "prepare_model_for_kbit_training" not in r.stderr
