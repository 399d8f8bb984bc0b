"""The worker's `prep` "unsloth" (calibrate/unsloth_prep.py): which plans it measures (the
--trainer unsloth preset's, as the pre-registered matrix has them), the fail-fast result of
a worker whose `import unsloth` fails, the offline switches, and the tokenizer written
beside a random-weight checkpoint. Unsloth itself is a device-only wheel
(calibration/DEVICE.md "Run 40"): the end-to-end worker test runs only where `unsloth`
imports (in a subprocess, so its patches never reach this process), else it is skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramcalc.calibrate.run import prep_error
from vramcalc.calibrate.unsloth_prep import (
    OFFLINE_ENV,
    TOKENIZER_WORDS,
    UNSLOTH_PLAN,
    offline_env,
    unsloth_error,
)
from vramcalc.plans import TrainPlan

ROOT = Path(__file__).resolve().parents[2]
SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PLAN = {**UNSLOTH_PLAN, "rank": 16, "alpha": 16.0, "lora_dropout": 0.0, "targets": SEVEN,
        "seq_len": 32, "batch_size": 1}
TINY = {"name": "tiny-llama", "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def test_the_preregistered_points_are_measurable() -> None:
    """Every h100-unsloth point (plans read from `vramcalc plan --trainer unsloth`) passes."""
    data = json.loads((ROOT / "calibration/matrices/h100-unsloth.json").read_text())
    assert len(data["points"]) >= 4
    for point in data["points"]:
        assert point["prep"] == "unsloth"
        assert prep_error(TrainPlan.model_validate(point["plan"]), "unsloth", None) is None


@pytest.mark.parametrize(("field", "value"), [
    ("method", "lora"), ("quant", "fp4"), ("double_quant", False), ("compute_dtype", "fp16"),
    ("loop", "trainer-plain"), ("gradient_checkpointing", False),
    ("offload_activations", "none"), ("loss_kernel", "torch"), ("use_dora", True),
])
def test_other_plans_are_refused_naming_the_field(field: str, value: Any) -> None:
    fields = {**PLAN, field: value}
    if field == "method":
        fields["quant"] = "none"
    if field == "gradient_checkpointing":
        fields["offload_activations"] = "none"  # (TrainPlan: the offload needs checkpointing)
    why = prep_error(TrainPlan.model_validate(fields), "unsloth", None)
    assert why is not None and f"this plan: {field} {value}" in why


def test_reentrant_and_all_linear_refused() -> None:
    plan = TrainPlan.model_validate(PLAN)
    assert unsloth_error(plan, None) is None
    assert "gc_reentrant" in str(unsloth_error(plan, False))
    assert "named target modules" in str(
        unsloth_error(TrainPlan.model_validate({**PLAN, "targets": "all-linear"}), None))


def test_offline_env_keeps_a_callers_value(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    offline_env()
    assert os.environ["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "0"


def _worker(job: dict[str, Any], pythonpath: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT / "src")])}
    out = subprocess.run([sys.executable, "-m", "vramcalc.calibrate.worker", json.dumps(job)],
                         capture_output=True, text=True, timeout=timeout, env=env, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_failed_import_is_one_line_cannot_start(tmp_path: Path) -> None:
    """An `unsloth` that raises on import (as it does on a host without an accelerator it
    supports) makes the point's result, before torch or the weights are touched."""
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise NotImplementedError('Unsloth cannot find any torch accelerator?\\n"
        "You need a GPU.')\n")
    job = {"spec": TINY, "plan": PLAN, "weights_dir": "/nonexistent", "steps": 1,
           "device": "cpu", "prep": "unsloth"}
    r = _worker(job, [str(tmp_path / "site")], timeout=120)
    assert r["cannot_start"] is True and r["error_phase"] == "import"
    assert r["error"] == ("import unsloth failed: NotImplementedError: Unsloth cannot find "
                          "any torch accelerator? You need a GPU.")


def test_tokenizer_beside_the_weights(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from vramcalc.calibrate.unsloth_prep import write_tokenizer
    from vramcalc.models.spec import ModelSpec

    spec = ModelSpec.model_validate(TINY)
    write_tokenizer(str(tmp_path), spec)
    first = (tmp_path / "tokenizer_config.json").stat().st_mtime_ns
    write_tokenizer(str(tmp_path), spec)  # already there: left as is
    assert (tmp_path / "tokenizer_config.json").stat().st_mtime_ns == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tokenizer-")]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == TOKENIZER_WORDS + 4
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "</s>", "<s>")
    assert tok("w0 w7")["input_ids"] == [4, 11]


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None
                    and not os.environ.get("VRAMCALC_UNSLOTH_SITE"),
                    reason="unsloth is not installed (a device-only wheel; set "
                           "VRAMCALC_UNSLOTH_SITE to a folder holding it)")
def test_worker_steps_a_point_prepared_by_unsloth() -> None:
    """Unsloth loads the tiny checkpoint in 4 bits, wraps it with its get_peft_model and the
    Trainer steps it (on CPU: Unsloth's CPU backend; on the device its GPU path)."""
    site = os.environ.get("VRAMCALC_UNSLOTH_SITE")
    job = {"spec": TINY, "plan": PLAN, "weights_dir": None, "steps": 2, "device": "cpu",
           "prep": "unsloth"}
    r = _worker(job, [site] if site else [], timeout=600)
    assert "error" not in r, r.get("error")
    assert r["prep"] == "unsloth" and "gc_reentrant" not in r
    assert r["versions"]["unsloth"] != "missing"
    # r 16 on 7 projections of 2 layers: (in + out) x 16 each
    per_layer = 16 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 256) * 2 + (256 + 128))
    assert r["trainable_params"] == 2 * per_layer
    assert len(r["step_seconds_each"]) == 2
