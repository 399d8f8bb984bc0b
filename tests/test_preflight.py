"""`vramcalc.preflight` and VramcalcCallback, on CPU: real TrainingArguments / SFTConfig /
LoraConfig / BitsAndBytesConfig objects, a tiny Llama built from its config (random
weights, nothing downloaded), a real Trainer run, and GPU lists given by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramcalc import api
from vramcalc.units import GiB, MiB

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")



def _args(tmp_path: Path, **kw: Any) -> Any:
    base = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": [],
            "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}
    return transformers.TrainingArguments(**{**base, **kw})


def test_importing_the_integration_loads_no_torch() -> None:
    """`import vramcalc.integrations` and `from vramcalc import preflight` import neither
    torch nor transformers (the callback class is made on first use)."""
    code = ("import sys, vramcalc.integrations\nfrom vramcalc import preflight\n"
            "heavy = {'torch', 'transformers', 'peft', 'bitsandbytes'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "from vramcalc.integrations import VramcalcCallback\n"
            "assert 'transformers' in sys.modules\n"
            "from transformers import TrainerCallback\n"
            "assert issubclass(VramcalcCallback, TrainerCallback)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_preflight_reads_the_objects_as_the_cli_options(tmp_path: Path) -> None:
    """TrainingArguments + LoraConfig + BitsAndBytesConfig give the plan `vramcalc plan`
    gives for the same settings, and `check`'s verdict on the same GPU."""
    from vramcalc import preflight

    args = _args(tmp_path, per_device_train_batch_size=4, activation_checkpointing=True,
                 optim="paged_adamw_32bit")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                           target_modules=["q_proj", "v_proj"])
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                          bnb_4bit_use_double_quant=False)
    res = preflight("llama-3.2-1b", args, lora, bnb, max_seq_len=1024,
                    gpus=["rtx-4090"], calibration=False)
    p = res.plan
    assert (p.method, p.quant, p.double_quant, p.rank, p.alpha, p.lora_dropout) == (
        "qlora", "fp4", False, 8, 16.0, 0.1)
    assert (p.targets, p.batch_size, p.seq_len, p.gradient_checkpointing, p.optimizer) == (
        "q_proj,v_proj", 4, 1024, True, "paged_adamw_32bit")
    # use_cpu with neither bf16 nor fp16: no autocast, the model computes in fp32
    assert p.compute_dtype == "fp32"
    assert res.settings["rank"] == "peft_config.r"
    assert res.settings["seq_len"] == "max_seq_len"
    want = api.check("llama-3.2-1b", gpus=["rtx-4090"], calibration=False,
                     **p.model_dump())
    assert res.estimate.required_device_bytes == want.estimate.required_device_bytes
    assert res.verdicts[0].certainty == want.verdicts[0].certainty
    assert res.verdicts[0].headroom_bytes == want.verdicts[0].headroom_bytes


def test_preflight_takes_an_sft_config(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from vramcalc import preflight

    cfg = trl.SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                        per_device_train_batch_size=2, max_length=768, bf16=False)
    res = preflight("qwen2.5-0.5b", cfg, peft.LoraConfig(r=32, target_modules="all-linear"),
                    gpus=[("a 16 GiB card", 16 * GiB)], calibration=False)
    assert (res.plan.method, res.plan.rank, res.plan.seq_len, res.plan.batch_size) == (
        "lora", 32, 768, 2)
    assert res.settings["seq_len"] == "training_args.max_length"
    assert res.verdicts[0].gpu == "a 16 GiB card" and res.fits
    # a model TRL loads by name: model_init_kwargs carries the quantization and the dtype
    torch = pytest.importorskip("torch")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                        max_length=512, bf16=False,
                        model_init_kwargs={"quantization_config": bnb, "dtype": torch.bfloat16})
    res = preflight("qwen2.5-0.5b", cfg, peft.LoraConfig(r=8, target_modules="all-linear"),
                    gpus=["t4"], calibration=False)
    # BitsAndBytesConfig's own default bnb_4bit_quant_type is fp4 (not the recipe's nf4)
    assert (res.plan.method, res.plan.quant, res.plan.double_quant) == ("qlora", "fp4", True)
    assert res.plan.batch_size == 8  # TrainingArguments' default per_device_train_batch_size


def test_preflight_errors_are_one_line(tmp_path: Path) -> None:
    from vramcalc import preflight
    from vramcalc.errors import PlanError, UnknownGpuError

    args = _args(tmp_path)
    with pytest.raises(PlanError, match="max_seq_len"):  # TrainingArguments has no length
        preflight("llama-3.2-1b", args, gpus=["t4"])
    with pytest.raises(PlanError, match="not modelled"):
        preflight("llama-3.2-1b", args, peft.IA3Config(), max_seq_len=128, gpus=["t4"])
    with pytest.raises(PlanError, match="a GPU is"):
        preflight("llama-3.2-1b", args, max_seq_len=128, gpus=[-5])
    with pytest.raises(UnknownGpuError):
        preflight("llama-3.2-1b", args, max_seq_len=128, gpus=["no-such-gpu"])


# ---- a real (tiny, CPU) Trainer run ------------------------------------------------------


def _tiny_trainer(tmp_path: Path, callback: Any) -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)  # random weights
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = [{"input_ids": [(i * 7 + j) % 128 for j in range(32)]} for i in range(8)]
    data = [{**r, "labels": r["input_ids"]} for r in rows]
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                 remove_unused_columns=False)
    return transformers.Trainer(model=model, args=args, train_dataset=data,
                                callbacks=[callback])


def test_callback_stops_a_run_that_does_not_fit(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from vramcalc.integrations import VramcalcCallback
    from vramcalc.preflight_check import DoesNotFitError

    cb = VramcalcCallback(max_seq_len=32, gpus=[("tiny", MiB)], strict=True)
    trainer = _tiny_trainer(tmp_path, cb)
    with pytest.raises(DoesNotFitError, match="does NOT fit on tiny"):
        trainer.train()
    assert trainer.state.global_step == 0  # stopped before the first step
    assert cb.result is not None and not cb.result.fits
    # what it read from the trainer's model: LoRA r=4 on q_proj,v_proj of the tiny llama
    p = cb.result.plan
    assert (p.method, p.rank, p.targets, p.batch_size, p.seq_len) == (
        "lora", 4, "q_proj,v_proj", 2, 32)
    assert cb.result.estimate.params == sum(
        t.numel() for n, t in trainer.model.named_parameters() if "lora_" not in n)
    assert "does NOT fit on tiny" in capsys.readouterr().err


def test_callback_lets_a_run_that_fits_go_on(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from vramcalc.integrations import VramcalcCallback

    cb = VramcalcCallback(max_seq_len=32, gpus=[("big", 80 * GiB)], strict=True)
    trainer = _tiny_trainer(tmp_path, cb)
    trainer.train()
    assert trainer.state.global_step == 2
    assert cb.result is not None and cb.result.fits
    assert "fits on big" in capsys.readouterr().err


def test_callback_not_strict_logs_and_goes_on(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from vramcalc.integrations import VramcalcCallback

    cb = VramcalcCallback(max_seq_len=32, gpus=[("tiny", MiB)])
    trainer = _tiny_trainer(tmp_path, cb)
    trainer.train()
    assert trainer.state.global_step == 2
    assert "does NOT fit on tiny" in capsys.readouterr().err


def test_callback_without_a_gpu_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """gpus=None asks NVML; with no GPU the check is skipped with a line, never an error."""
    import vramcalc.hardware.devices
    from vramcalc.errors import NoGpuError
    from vramcalc.integrations import VramcalcCallback

    def no_gpu(nvml: Any = None) -> Any:
        raise NoGpuError("no NVIDIA driver found")

    monkeypatch.setattr(vramcalc.hardware.devices, "query_devices", no_gpu)
    cb = VramcalcCallback(max_seq_len=32, strict=True)
    trainer = _tiny_trainer(tmp_path, cb)
    trainer.train()
    assert trainer.state.global_step == 2 and cb.result is None
    assert "skipped, no GPU" in capsys.readouterr().err
