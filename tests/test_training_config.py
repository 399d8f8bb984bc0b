"""--from-config: axolotl, TRL / TrainingArguments and LLaMA-Factory files -> plan options.

The example files (tests/fixtures/training_configs/) follow each project's documented
examples; their headers name the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        "batch_layout": "packed",
        # axolotl 067b021 loaders/model.py: prepare_model_for_kbit_training, then the norms,
        # embeddings and lm_head back to bf16; peft's fp32 adapters
        "kbit_prep": False, "adapter_dtype": "fp32",
    }
    assert tc.used["batch"] == "micro_batch_size"
    assert tc.used["batch_layout"] == "sample_packing"
    assert [u.split(":")[0] for u in tc.unmodelled] == ["deepspeed", "lora_modules_to_save"]
    assert tc.notes[0].startswith("sample_packing: micro_batch_size rows of sequence_len")


def test_trl_training_arguments_json() -> None:
    tc = read_training_config(FIX / "trl-sft-config.json")
    assert tc.format == "trl" and tc.model is None
    assert tc.options == {
        "weights_dtype": "bf16", "batch": 4, "seq_len": 1024, "gradient_checkpointing": True,
        "optimizer": "adamw_torch_fused", "attn": "flash_attention_2", "compute_dtype": "bf16",
        "loss_kernel": "liger",
    }
    assert tc.used["loss_kernel"] == "use_liger_kernel"
    # TRL >= 1.15 keeps its fused LM head and refuses Liger's fused linear cross-entropy
    assert len(tc.unmodelled) == 1 and "TRL's fused LM head" in tc.unmodelled[0]


def test_trl_yaml_with_model_config_keys() -> None:
    tc = read_training_config(FIX / "trl-sft.yaml")
    assert tc.model == "Qwen/Qwen2.5-0.5B"
    assert tc.options == {
        "quant": "nf4", "double_quant": False, "method": "qlora", "rank": 32, "alpha": 16.0,
        "targets": "q_proj,k_proj,v_proj,o_proj", "batch": 2, "seq_len": 2048,
        "gradient_checkpointing": True, "attn": "sdpa", "compute_dtype": "bf16",
        "batch_layout": "padding-free",  # packing: true, bfd by default
        # SFTTrainer on a quantized model: no prepare_model_for_kbit_training, bf16 adapters
        "kbit_prep": False, "adapter_dtype": "bf16",
    }


def test_llama_factory() -> None:
    tc = read_training_config(FIX / "llama-factory-qlora.yaml")
    assert tc.format == "llama-factory"
    assert tc.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert tc.options == {
        "quant": "nf4", "method": "qlora", "rank": 8, "alpha": 16.0, "targets": "all-linear",
        "batch": 1, "seq_len": 2048, "compute_dtype": "bf16", "loss_kernel": "liger",
        # LLaMA-Factory ff6d4d1: no prepare_model_for_kbit_training; init_adapter fp32
        "kbit_prep": False, "adapter_dtype": "fp32",
    }
    assert tc.used["alpha"] == "lora_alpha (default: 2 x lora_rank)"
    assert tc.unmodelled == ()


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
    assert "not modelled" not in r.stderr
    assert json.loads(r.stdout)["plan"]["loss_kernel"] == "liger"  # enable_liger_kernel


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


def _read(tmp_path: Path, text: str, name: str = "c.yml") -> Any:
    f = tmp_path / name
    f.write_text(text)
    return read_training_config(f)


AXO = "base_model: meta-llama/Llama-3.1-8B\nadapter: qlora\nload_in_4bit: true\n"
AXO_LIGER = ("plugins:\n  - axolotl.integrations.liger.LigerPlugin\nliger_rope: true\n"
             "liger_rms_norm: true\nliger_glu_activation: true\n"
             "liger_fused_linear_cross_entropy: true\n")


def test_axolotl_liger_plugin(tmp_path: Path) -> None:
    tc = _read(tmp_path, AXO + AXO_LIGER)
    assert tc.options["loss_kernel"] == "liger"
    assert tc.used["loss_kernel"] == "liger_fused_linear_cross_entropy"
    assert tc.unmodelled == ()


def test_axolotl_partial_liger_is_listed(tmp_path: Path) -> None:
    tc = _read(tmp_path, AXO + AXO_LIGER.replace("liger_rope: true", "liger_rope: false"))
    assert "loss_kernel" not in tc.options
    assert tc.unmodelled[0].startswith("liger_fused_linear_cross_entropy: Liger with "
                                       "liger_rope: False is not modelled")


def test_axolotl_liger_without_plugin_is_listed(tmp_path: Path) -> None:
    tc = _read(tmp_path, AXO + "liger_fused_linear_cross_entropy: true\n")
    assert "loss_kernel" not in tc.options
    assert tc.unmodelled[0].startswith("liger_fused_linear_cross_entropy: without the "
                                       "LigerPlugin")


def test_axolotl_cut_cross_entropy(tmp_path: Path) -> None:
    tc = _read(tmp_path, AXO + "plugins:\n  - axolotl.integrations.cut_cross_entropy."
               "CutCrossEntropyPlugin\ncut_cross_entropy: true\n")
    assert tc.options["loss_kernel"] == "cce"
    assert tc.unmodelled == ()


def test_trl_liger_kernel_config(tmp_path: Path) -> None:
    base = {"model_name_or_path": "Qwen/Qwen2.5-1.5B", "use_liger_kernel": True}
    tc = _read(tmp_path, json.dumps({**base, "liger_kernel_config": {"rope": True}}), "a.json")
    assert tc.options["loss_kernel"] == "liger"
    tc = _read(tmp_path, json.dumps({**base, "liger_kernel_config": {
        "fused_linear_cross_entropy": False, "cross_entropy": True}}), "b.json")
    assert "loss_kernel" not in tc.options
    assert "liger_kernel_config.fused_linear_cross_entropy: False" in tc.unmodelled[0]


def test_llama_factory_liger_off_the_fused_loss_stage(tmp_path: Path) -> None:
    tc = _read(tmp_path, "model_name_or_path: x/y\nstage: dpo\nenable_liger_kernel: true\n"
               "finetuning_type: lora\n")
    assert "loss_kernel" not in tc.options
    assert any(u.startswith("enable_liger_kernel: Liger without its fused loss")
               for u in tc.unmodelled)


# the quantized-base preparation each trainer applies (kbit_prep / adapter_dtype): a 4-bit
# and an 8-bit base get them, a 16-bit LoRA keeps the defaults (None: not set)
@pytest.mark.parametrize(("text", "quant"), [
    ("base_model: x/y\nadapter: qlora\nload_in_4bit: true\n", "nf4"),
    ("base_model: x/y\nadapter: lora\nload_in_8bit: true\n", "int8"),
    ("base_model: x/y\nadapter: lora\nmicro_batch_size: 1\n", None),
    ("model_name_or_path: x/y\nfinetuning_type: lora\nquantization_bit: 4\n", "nf4"),
    ("model_name_or_path: x/y\nfinetuning_type: lora\nquantization_bit: 8\n", "int8"),
    ("model_name_or_path: x/y\nfinetuning_type: lora\ncutoff_len: 512\n", None),
])
def test_kbit_preparation_of_axolotl_and_llama_factory(tmp_path: Path, text: str,
                                                      quant: str | None) -> None:
    f = tmp_path / "c.yml"
    f.write_text(text)
    tc = read_training_config(f)
    assert tc.options.get("quant") == quant
    if quant is None:
        assert tc.options["method"] == "lora"
        assert "kbit_prep" not in tc.options and "adapter_dtype" not in tc.options
        assert not any("quantized base" in n for n in tc.notes)
    else:
        assert tc.options["method"] == "qlora"
        assert tc.options["kbit_prep"] is False and tc.options["adapter_dtype"] == "fp32"
        assert any("quantized base" in n and "not measured" in n for n in tc.notes)


def test_axolotl_peft_autocast_adapter_dtype(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("base_model: x/y\nadapter: lora\nbf16: true\n"
                 "peft_autocast_adapter_dtype: false\n")
    assert read_training_config(f).options["adapter_dtype"] == "bf16"
    # on a 4-bit base peft makes the adapters fp32 whatever the key says
    f.write_text("base_model: x/y\nadapter: qlora\nload_in_4bit: true\n"
                 "peft_autocast_adapter_dtype: false\n")
    tc = read_training_config(f)
    assert tc.options["adapter_dtype"] == "fp32"
    assert any(n.startswith("peft_autocast_adapter_dtype") for n in tc.notes)


def test_llama_factory_upcast_keys_are_listed(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("model_name_or_path: x/y\nfinetuning_type: lora\nquantization_bit: 4\n"
                 "upcast_layernorm: true\nupcast_lmhead_output: true\npure_bf16: true\n")
    tc = read_training_config(f)
    assert [u.split(":")[0] for u in tc.unmodelled] == ["upcast_layernorm",
                                                         "upcast_lmhead_output"]
    # pure_bf16 keeps the adapters fp32 (peft autocast_adapter_dtype)
    assert tc.options["adapter_dtype"] == "fp32"
    assert any(n.startswith("pure_bf16") for n in tc.notes)


def test_cli_llama_factory_qlora_plans_without_kbit_prep() -> None:
    """The mapped options reach the estimate: the fixture's plan is --no-kbit-prep's, bf16
    norms / embeddings / lm_head, less than the same file with the preparation given."""
    f = str(FIX / "llama-factory-qlora.yaml")
    r = runner_invoke(["plan", "--from-config", f, "-m", "llama-3.2-1b", "--json"])
    prepared = runner_invoke(["plan", "--from-config", f, "-m", "llama-3.2-1b",
                              "--kbit-prep", "--json"])
    assert r["plan"]["kbit_prep"] is False and prepared["plan"]["kbit_prep"] is True
    assert (r["components"]["unquantized_params"]
            < prepared["components"]["unquantized_params"])


def runner_invoke(args: list[str]) -> dict[str, Any]:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout))


def test_cli_16bit_override_drops_the_quantized_preparation() -> None:
    """--method lora --quant none over a QLoRA file: the trainer's kbit options for the
    quantized base are not carried into the 16-bit plan (they would be refused)."""
    f = str(FIX / "llama-factory-qlora.yaml")
    r = CliRunner().invoke(app, ["plan", "--from-config", f, "-m", "llama-3.2-1b",
                                 "--method", "lora", "--quant", "none", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["plan"]["method"] == "lora" and got["plan"]["kbit_prep"] is True
    assert "preparation of a quantized base (--kbit-prep, --adapter-dtype) not used" in (
        " ".join(r.stderr.split()))
