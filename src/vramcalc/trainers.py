"""Trainer presets (`--trainer`): the defaults each trainer applies, as plan options.

Pure data and one function; no torch. Each preset gives `build_plan` keyword arguments
(commands/options.py PLAN_OPTIONS names) for the options the user did not give (on the
command line or through --from-config), the loss kernel the trainer applies (data only:
see TODO below), and what the trainer does that no plan option models (printed as notes).

Sources (read at the commits named):
  hf       transformers 5.25.0 training_args.py TrainingArguments: per_device_train_batch_size
           8, optim adamw_torch_fused (torch >= 2.8, else adamw_torch), bf16 / fp16 False (no
           autocast: fp32 compute), gradient_checkpointing off.
  trl      huggingface/trl f2cd577 (2026-07-24) trl/trainer/sft_config.py SFTConfig and
           base_config.py: max_length 1024, packing False (packing_strategy "bfd", which
           forces padding_free: sft_trainer.py `self.padding_free = args.padding_free or
           (args.packing and args.packing_strategy in {"bfd", "bfd_split"})`),
           padding_free False, gradient_checkpointing True, bf16 True unless fp16,
           loss_type "chunked_nll" unless use_liger_kernel ("nll"; sft_config.py
           __post_init__; SFTTrainer.__init__ patches the model's forward with
           _patch_chunked_ce_lm_head: --loss-kernel trl-chunked, TRL 1.4-1.14; from
           trl 1.15.0 (read at 1.16.0) SFTTrainer.__init__ always calls
           trainer/utils.py add_fused_lm_head(outputs=("log_probs", "entropy",
           "is_top1")) and compute_loss calls the model with fused_lm_head=True, and
           "chunked_nll" is a deprecated alias of "nll": --loss-kernel trl-fused, the
           preset's), activation_offloading
           False; TrainingArguments' batch 8 and optim. SFTTrainer.__init__ (trl 1.16.0
           sft_trainer.py) calls get_peft_model and no prepare_model_for_kbit_training
           (--no-kbit-prep), then, for a model `is_loaded_in_4bit` / `_8bit`, casts every
           trainable parameter but lora_magnitude_vector to bf16 (--adapter-dtype bf16);
           both for a quantized base only. compute_loss sets use_cache False.
  unsloth  unslothai/unsloth 015bdef (2026-08-22) models/loader.py FastLanguageModel.
           from_pretrained (load_in_4bit True, max_seq_length 2048; nf4 with double quant,
           models/llama.py) and models/llama.py get_peft_model (r 16, lora_alpha 16,
           lora_dropout 0, q/k/v/o/gate/up/down, use_gradient_checkpointing "unsloth":
           unsloth-zoo ce232d6 gradient_checkpointing.py, the checkpointed layer inputs
           offloaded to pinned host buffers); trained with TRL's SFTTrainer (its defaults).
  axolotl  axolotl-ai-cloud/axolotl 067b021 (2026-07-24) src/axolotl/utils/schemas:
           micro_batch_size 1, sequence_len 512, optimizer adamw_torch_fused,
           gradient_checkpointing False, sample_packing None (off), bf16 "auto" (bf16 where
           the card has it). A quantized base (load_in_4bit / load_in_8bit, adapter lora or
           qlora): src/axolotl/loaders/model.py ModelLoader._configure_embedding_dtypes
           calls _prepare_model_for_quantization (peft prepare_model_for_kbit_training,
           every non-quantized parameter to fp32; skipped under qlora + FSDP and ZeRO-3),
           then, for any LoRA adapter (needs_fa2_dtype) but qlora + FSDP,
           _convert_embedding_modules_dtype(dist_dtype=cfg.torch_dtype) casts every module
           with "norm" in its name and embed_tokens / lm_head back to the load dtype: the
           trained state is kbit_prep False's (--no-kbit-prep). load_lora calls
           get_peft_model (peft autocast_adapter_dtype True unless
           peft_autocast_adapter_dtype is set; on a 4/8-bit base the adapters are made fp32
           either way): --adapter-dtype fp32. Both for a quantized base only.
  plain    the tutorial loop (`--loop plain`): vramcalc's own defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vramcalc.errors import PlanError

TRAINER_NAMES = ("trl", "hf", "unsloth", "axolotl", "plain")


@dataclass(frozen=True)
class TrainerPreset:
    name: str
    options: dict[str, Any]  # build_plan keyword -> the trainer's default
    # The loss the trainer applies by default, in its own words (the plan field it maps to
    # is options["loss_kernel"]): "none" (transformers' loss_utils ForCausalLMLoss on full
    # logits), "fused_lm_head" (TRL >= 1.15; "chunked_nll" in TRL 1.4-1.14),
    # "unsloth_fused_ce" (Unsloth).
    loss_kernel: str = "none"
    unmodelled: tuple[str, ...] = field(default=())
    # what the trainer does to a quantized base that kbit_prep / adapter_dtype do not say
    # (shown only when the plan's base is quantized)
    kbit_unmodelled: tuple[str, ...] = field(default=())


_TRL_ARGS = {"batch": 8, "optimizer": "adamw_torch_fused"}  # TrainingArguments'
_TRL = {**_TRL_ARGS, "seq_len": 1024, "gradient_checkpointing": True,
        "compute_dtype": "bf16", "batch_layout": "padded", "offload_activations": "none",
        "loss_kernel": "trl-fused"}
# a quantized base only (TrainPlan.kbit_prep, adapter_dtype; apply_trainer skips them else)
_KBIT = ("kbit_prep", "adapter_dtype")
_TRL_KBIT = {"kbit_prep": False, "adapter_dtype": "bf16"}
# axolotl 067b021 loaders/model.py: prepare_model_for_kbit_training, then the norms,
# embeddings and lm_head cast back to the load dtype; adapters fp32 (module docstring);
# the preset's and an axolotl config's (training_config._axolotl_kbit)
AXOLOTL_KBIT = {"kbit_prep": False, "adapter_dtype": "fp32"}

TRAINERS: dict[str, TrainerPreset] = {
    "hf": TrainerPreset("hf", {"loop": "trainer", "batch": 8,
                               "optimizer": "adamw_torch_fused",
                               "gradient_checkpointing": False, "compute_dtype": "fp32"}),
    "trl": TrainerPreset("trl", {"loop": "trainer", **_TRL, **_TRL_KBIT},
                         loss_kernel="fused_lm_head"),
    "unsloth": TrainerPreset(
        "unsloth",
        {"loop": "trainer", **_TRL, "seq_len": 2048, "method": "qlora", "quant": "nf4",
         "double_quant": True, "rank": 16, "alpha": 16.0, "lora_dropout": 0.0,
         "targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
         "offload_activations": "checkpoints",
         # unsloth 015bdef models/llama.py CausalLM_fast_forward: in training with labels
         # (UNSLOTH_RETURN_LOGITS unset) unsloth_zoo ce232d6 fused_losses/
         # cross_entropy_loss.py unsloth_fused_ce_loss: grad_inputs (and the head's
         # gradient where it trains) made in forward, the fp32 logits one chunk of rows at
         # a time, no logits returned -- liger's fused linear cross-entropy's mechanism;
         # its RMSNorm / RoPE / SwiGLU kernels stand for Unsloth's own
         "loss_kernel": "liger"},
        loss_kernel="unsloth_fused_ce",
        unmodelled=("Unsloth's fused cross-entropy planned as liger-kernel's (--loss-kernel "
                    "liger): Unsloth sizes its chunks from the free GPU memory "
                    "(get_chunk_size, target_gb) where liger takes rows from the vocabulary "
                    "and hidden size, and its RMSNorm / RoPE / SwiGLU / LoRA MLP kernels "
                    "are not liger's; not measured",),
    ),
    "axolotl": TrainerPreset("axolotl", {"loop": "trainer", "batch": 1, "seq_len": 512,
                                         "optimizer": "adamw_torch_fused",
                                         "gradient_checkpointing": False,
                                         "compute_dtype": "bf16", "batch_layout": "padded",
                                         **AXOLOTL_KBIT},
                               kbit_unmodelled=(
                                   "axolotl's prepare_model_for_kbit_training, then the "
                                   "norms, embeddings and lm_head cast back to the load "
                                   "dtype, is planned as --no-kbit-prep: the biases of "
                                   "quantized layers and MoE router gates that stay fp32, "
                                   "and the fp32 embeddings / lm_head while the model "
                                   "loads; not measured on a GPU",)),
    "plain": TrainerPreset("plain", {"loop": "plain"}),
}


def trainer_preset(name: str) -> TrainerPreset:
    if name not in TRAINERS:
        raise PlanError(f"unknown trainer '{name}'; valid: {', '.join(TRAINER_NAMES)}")
    return TRAINERS[name]


def check_loop(trainer: str, loop: str) -> None:
    """`--trainer plain` is the tutorial loop (`--loop plain`); every other trainer builds
    the model and optimizer itself (`--loop trainer`, or `trainer-plain*` for your own steps
    on the Trainer's model and optimizer). One PlanError line on a contradiction."""
    if trainer == "plain" and loop != "plain":
        raise PlanError(f"--loop {loop} contradicts --trainer plain (the tutorial loop: "
                        "--loop plain)")
    if trainer != "plain" and not loop.startswith("trainer"):
        raise PlanError(f"--loop {loop} contradicts --trainer {trainer} (the trainer builds "
                        "the model and optimizer: --loop trainer or trainer-plain*)")


def apply_trainer(options: dict[str, Any], trainer: str, keep: frozenset[str] | set[str]
                  ) -> tuple[dict[str, Any], list[str]]:
    """`options` with the trainer's defaults for every option not in `keep` (given on the
    command line or read from a config), and the notes that say what was set and what is
    not modelled. The loop is checked against the trainer either way."""
    preset = trainer_preset(trainer)
    out = dict(options)
    set_: list[str] = []
    for name, value in preset.options.items():
        if name in keep or name not in out:
            continue
        if name == "quant" and out.get("method") not in (None, "qlora"):
            continue  # --method lora/full given: their quant follows (none)
        if name == "method" and "quant" in keep:
            continue  # --quant given: the method follows it
        if name == "offload_activations" and out.get("gradient_checkpointing") is False:
            continue  # Unsloth's offloading is its checkpointing's: off with it
        if name in _KBIT and not _quantized(out):
            continue  # the trainers' kbit preparation and adapter casts: a quantized base only
        if name == "adapter_dtype" and out.get("dora"):
            continue  # DoRA's magnitude stays fp32 under TRL: not modelled, fp32 planned
        out[name] = value
        set_.append(f"--{name.replace('_', '-')} {value}")
    check_loop(trainer, out.get("loop", "trainer"))
    notes = [f"trainer {trainer}: " + (", ".join(set_) or "nothing beyond the given options")]
    if preset.loss_kernel != "none" and "loss_kernel" in keep:
        notes.append(f"trainer {trainer} applies the loss '{preset.loss_kernel}' by default; "
                     f"planned with --loss-kernel {out.get('loss_kernel')} as given")
    notes += [f"not modelled: {u}" for u in preset.unmodelled]
    if _quantized(out):
        notes += [f"not modelled: {u}" for u in preset.kbit_unmodelled]
    return out, notes


def _quantized(options: dict[str, Any]) -> bool:
    """The options plan a quantized base (method qlora, or a quant other than none)."""
    return options.get("method") in (None, "qlora") and options.get("quant") != "none"


def runnable_loss(options: dict[str, Any], trainer: str, model: str | None,
                  build: Callable[..., Any]) -> tuple[dict[str, Any], str | None]:
    """`options` (apply_trainer's, the loss kernel set by the preset, not given) with the
    preset's kernel where vramcalc plans it for `model` (estimate.check_loss_kernel), else
    the full-logits head (torch, an upper bound of the trainer's loss) and a note why.
    `build`: commands/options.py build_plan. A model or options that do not resolve are
    left to the command, which says what is wrong."""
    kernel = options.get("loss_kernel", "torch")
    if kernel == "torch" or model is None:
        return options, None
    from vramcalc.errors import VramcalcError
    from vramcalc.memory.estimate import check_loss_kernel
    from vramcalc.models.resolve import resolve_model

    try:
        spec = resolve_model(model)
        # the kernel's rules do not depend on the step's tokens (--lengths is read later)
        plan = build(**{**options, "lengths": None, "tokens_per_step": None})
    except VramcalcError:
        return options, None
    try:
        check_loss_kernel(spec, plan)
    except VramcalcError as err:
        preset = trainer_preset(trainer)
        return {**options, "loss_kernel": "torch"}, (
            f"trainer {trainer} applies the loss '{preset.loss_kernel}', which vramcalc "
            f"cannot plan here ({str(err).split(': ', 1)[-1]}); planned with the full "
            "logits (--loss-kernel torch, an upper bound)")
    return options, None
