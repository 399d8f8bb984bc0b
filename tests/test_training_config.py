"""--from-config: axolotl, TRL / TrainingArguments and LLaMA-Factory files -> plan options.

The example files (tests/fixtures/training_configs/) follow each project's documented
examples; their headers name the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.errors import PlanError
from vramcalc.models.spec import get_spec
from vramcalc.training_config import read_training_config

FIX = Path(__file__).parent / "fixtures" / "training_configs"


def test_axolotl() -> None:
    tc = read_training_config(FIX / "axolotl-qlora.yml")
    assert tc.format == "axolotl"
    assert tc.model == "NousResearch/Meta-Llama-3-8B"
    assert tc.options == {
        "quant": "nf4", "method": "qlora", "rank": 32, "alpha": 16.0, "lora_dropout": 0.05,
        "targets": "all-linear", "batch": 2, "seq_len": 4096, "gradient_checkpointing": True,
        "optimizer": "paged_adamw_32bit", "compute_dtype": "bf16", "attn": "flash_attention_2",
    }
    assert tc.used["batch"] == "micro_batch_size"
    assert [u.split(":")[0] for u in tc.unmodelled] == ["deepspeed", "lora_modules_to_save"]
    assert tc.notes[0].startswith("sample_packing: sequences are packed to sequence_len")


def test_trl_training_arguments_json() -> None:
    tc = read_training_config(FIX / "trl-sft-config.json")
    assert tc.format == "trl" and tc.model is None
    assert tc.options == {
        "weights_dtype": "bf16", "batch": 4, "seq_len": 1024, "gradient_checkpointing": True,
        "optimizer": "adamw_torch_fused", "attn": "flash_attention_2", "compute_dtype": "bf16",
    }
    assert [u.split(":")[0] for u in tc.unmodelled] == ["use_liger_kernel"]


def test_trl_yaml_with_model_config_keys() -> None:
    tc = read_training_config(FIX / "trl-sft.yaml")
    assert tc.model == "Qwen/Qwen2.5-0.5B"
    assert tc.options == {
        "quant": "nf4", "double_quant": False, "method": "qlora", "rank": 32, "alpha": 16.0,
        "targets": "q_proj,k_proj,v_proj,o_proj", "batch": 2, "seq_len": 2048,
        "gradient_checkpointing": True, "attn": "sdpa", "compute_dtype": "bf16",
    }


def test_llama_factory() -> None:
    tc = read_training_config(FIX / "llama-factory-qlora.yaml")
    assert tc.format == "llama-factory"
    assert tc.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert tc.options == {
        "quant": "nf4", "method": "qlora", "rank": 8, "alpha": 16.0, "targets": "all-linear",
        "batch": 1, "seq_len": 2048, "compute_dtype": "bf16",
    }
    assert tc.used["alpha"] == "lora_alpha (default: 2 x lora_rank)"
    assert [u.split(":")[0] for u in tc.unmodelled] == ["enable_liger_kernel"]


def test_unknown_optimizer_is_listed_not_ignored(tmp_path: Path) -> None:
    f = tmp_path / "a.yml"
    f.write_text("base_model: x/y\nadapter: lora\noptimizer: lion_8bit\nmicro_batch_size: 1\n")
    tc = read_training_config(f)
    assert "optimizer" not in tc.options
    assert tc.unmodelled[0].startswith("optimizer: lion_8bit (optimizer not modelled")


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("foo: 1\n", "--from-config {f}: not an axolotl, TRL/TrainingArguments or LLaMA-Factory"),
        ("[1, 2]\n", "--from-config {f}: expected a mapping"),
        ("base_model: x\nmicro_batch_size: two\n",
         "{f}: key 'micro_batch_size': expected a positive integer, got 'two'"),
        ("a: [\n", "--from-config {f}: malformed YAML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, start: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(PlanError) as err:
        read_training_config(f)
    assert str(err.value).startswith(start.format(f=f))


def test_cli_from_config_flags_override_the_file() -> None:
    r = CliRunner().invoke(app, ["plan", "--from-config", str(FIX / "llama-factory-qlora.yaml"),
                                 "--batch", "3", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert plan["batch_size"] == 3  # the flag
    assert plan["seq_len"] == 2048 and plan["rank"] == 8 and plan["alpha"] == 16.0  # the file
    assert json.loads(r.stdout)["model"] == get_spec("meta-llama/Meta-Llama-3-8B-Instruct").name
    assert "command line overrides --batch" in r.stderr
    assert "not modelled: enable_liger_kernel" in r.stderr


def test_cli_default_valued_flag_still_overrides() -> None:
    # --batch 1 equals vramcalc's default but was typed: it wins over the file's 2
    f = FIX / "trl-sft.yaml"
    r = CliRunner().invoke(app, ["plan", "--from-config", str(f), "--batch", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["batch_size"] == 1


def test_cli_from_config_without_model_needs_model() -> None:
    f = FIX / "trl-sft-config.json"
    r = CliRunner().invoke(app, ["plan", "--from-config", str(f)])
    assert r.exit_code == 1
    assert r.stderr == f"Error: --from-config {f}: the file names no base model; add --model\n"
    r = CliRunner().invoke(app, ["plan", "--from-config", str(f), "-m", "llama-7b", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["batch_size"] == 4


def test_cli_plan_without_model_is_usage_error() -> None:
    r = CliRunner().invoke(app, ["plan"])
    assert r.exit_code == 2
    assert "--model" in r.stderr


def test_cli_check_from_config() -> None:
    r = CliRunner().invoke(app, ["check", "--from-config", str(FIX / "trl-sft.yaml"),
                                 "--gpu-memory", "80", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["estimate"]["plan"]["seq_len"] == 2048


def test_trl_activation_checkpointing_name(tmp_path: Path) -> None:
    # transformers 5.2x's TrainingArguments renames gradient_checkpointing
    f = tmp_path / "args.json"
    f.write_text(json.dumps({"output_dir": "o", "per_device_train_batch_size": 1,
                             "activation_checkpointing": False}))
    assert read_training_config(f).options["gradient_checkpointing"] is False


def test_trl_use_cache(tmp_path: Path) -> None:
    """TrainingArguments.use_cache: what Trainer.__init__ sets model.config.use_cache to."""
    f = tmp_path / "args.json"
    f.write_text(json.dumps({"per_device_train_batch_size": 2, "use_cache": True,
                             "gradient_checkpointing": False}))
    tc = read_training_config(f)
    assert tc.options["use_cache"] is True and tc.used["use_cache"] == "use_cache"
    f.write_text(json.dumps({"per_device_train_batch_size": 2, "use_cache": "yes"}))
    with pytest.raises(PlanError, match="use_cache"):
        read_training_config(f)
