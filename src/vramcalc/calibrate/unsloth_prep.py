"""A point prepared by Unsloth itself (matrix point / worker job `"prep": "unsloth"`).

`vramcalc plan --trainer unsloth` (vramcalc/trainers.py) models Unsloth from unsloth /
unsloth-zoo source; the worker's other preps rebuild it from torch pieces (the
"unsloth-style" checkpoint offload of calibrate/offload.py, liger's loss). This one runs
Unsloth: read at unsloth 2026.10.9 / unsloth_zoo 2026.10.9 (PyPI wheels;
calibration/DEVICE.md "Unsloth" for the carried wheels),

1. `FastLanguageModel.from_pretrained(weights_dir, max_seq_length=seq_len,
   dtype=torch.bfloat16, load_in_4bit=True, use_exact_model_name=True,
   offload_embedding=False)`: models/loader.py
   dispatches by model_type to FastLlamaModel / FastMistralModel / FastQwen2Model /
   FastGemma2Model (models/llama.py `from_pretrained`: BitsAndBytesConfig nf4, double
   quant, compute dtype bf16, its own llm_int8_skip_modules);
2. `FastLanguageModel.get_peft_model(model, r, lora_alpha, lora_dropout, target_modules,
   bias="none", use_gradient_checkpointing="unsloth")` (models/llama.py get_peft_model;
   unsloth_zoo gradient_checkpointing.py: each decoder layer's input offloaded to host
   under its own checkpoint function);
3. steps under transformers' Trainer (calibrate/run.py measure_point) with Trainer's own
   checkpointing off (Unsloth's is on the layers already) and no liger: the loss is
   Unsloth's fused cross-entropy inside its CausalLM forward (models/llama.py
   CausalLM_fast_forward -> unsloth_zoo fused_losses unsloth_fused_ce_loss).

The weights cache holds random bf16 checkpoints without a tokenizer (weights.py); Unsloth
loads one beside the weights (llama.py `load_correct_tokenizer`), so `write_tokenizer`
saves a small word-level one there (its size does not change the model: the embedding
keeps the checkpoint's vocabulary).

Nothing may reach the network (the device has none): `offline_env` sets the hub and
Unsloth switches before `import unsloth` (unsloth models/_utils.py get_statistics honours
UNSLOTH_DISABLE_STATISTICS). Unsloth must be imported before transformers / peft / trl
for its patches (unsloth/_gpu_init.py warns otherwise): the worker imports it first
(calibrate/worker.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

# set before `import unsloth` (setdefault: a caller's own value wins)
OFFLINE_ENV = {
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}

# the plan the `unsloth` preset gives (trainers.TRAINERS["unsloth"]), field by field: a
# point prepared by Unsloth is measured against that plan's prediction
UNSLOTH_PLAN = {"method": "qlora", "quant": "nf4", "double_quant": True, "compute_dtype": "bf16",
                "loop": "trainer", "gradient_checkpointing": True, "layout": "padded",
                "offload_activations": "checkpoints", "loss_kernel": "liger", "use_dora": False}

TOKENIZER_WORDS = 512  # the small tokenizer's vocabulary (write_tokenizer)


def unsloth_error(plan: TrainPlan, gc_reentrant: bool | None) -> str | None:
    """Why `plan` cannot be prepared by Unsloth, or None."""
    if gc_reentrant is not None:
        return "gc_reentrant does not apply to prep unsloth (its own checkpoint function)"
    off = [f"{k} {getattr(plan, k)}" for k, v in UNSLOTH_PLAN.items() if getattr(plan, k) != v]
    if off:
        want = ", ".join(f"{k} {v}" for k, v in UNSLOTH_PLAN.items())
        return f"prep unsloth measures the --trainer unsloth plan ({want}); this plan: " + \
            ", ".join(off)
    if plan.targets == "all-linear":
        return "prep unsloth needs named target modules (Unsloth's get_peft_model)"
    return None


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def import_unsloth(compile_dir: str | None = None) -> Any:
    """`import unsloth` offline (its compiled-module cache in `compile_dir`, one per worker:
    unsloth_zoo compiler.py writes UNSLOTH_COMPILE_LOCATION, by default in the cwd)."""
    offline_env()
    if compile_dir is not None:
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", compile_dir)
    import unsloth

    return unsloth


def write_tokenizer(weights_dir: str, spec: ModelSpec) -> None:
    """A word-level tokenizer (TOKENIZER_WORDS entries, <unk>/<s>/</s>/<pad>) saved in
    `weights_dir` unless one is there; `model_max_length` the spec's context."""
    if (Path(weights_dir) / "tokenizer_config.json").exists():
        return
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(TOKENIZER_WORDS)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   model_max_length=spec.max_position_embeddings or 131072)
    # written beside, then moved in (tokenizer_config.json last): two workers of one cached
    # checkpoint may get here at once, and a reader must never see half a file
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=weights_dir))
    try:
        fast.save_pretrained(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "tokenizer_config.json"] + ["tokenizer_config.json"]:
            os.replace(tmp / name, Path(weights_dir) / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(spec: ModelSpec, plan: TrainPlan, weights_dir: str) -> Any:
    """The model as Unsloth loads it (module docstring, step 1)."""
    import torch
    from unsloth import FastLanguageModel

    write_tokenizer(weights_dir, spec)
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=weights_dir,
        max_seq_length=plan.seq_len,
        dtype=torch.bfloat16,
        load_in_4bit=True,
        use_exact_model_name=True,
        # its default "auto" moves embed_tokens to the host only when free VRAM asks for it
        # (models/vision.py _resolve_offload_embedding), never for these points on an
        # 80 GB card; fixed off so that parallel points cannot change it
        offload_embedding=False,
    )
    return model


def wrap(model: Any, plan: TrainPlan) -> Any:
    """The model as Unsloth's get_peft_model wraps it (module docstring, step 2)."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=plan.rank,
        lora_alpha=plan.alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=plan.target_list(),
        bias="none",
        use_gradient_checkpointing="unsloth",
        max_seq_length=plan.seq_len,
    )
