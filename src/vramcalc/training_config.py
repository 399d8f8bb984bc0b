"""The training config you already have -> plan options: axolotl, TRL, LLaMA-Factory.

`read_training_config(path)` parses an axolotl YAML, a TRL `SFTConfig` / transformers
`TrainingArguments` JSON or YAML (as `to_json_string()` writes it, optionally with TRL's
`ModelConfig` keys as `trl sft --config` reads them), or a LLaMA-Factory YAML, detects the
format by its keys, and returns the model id, the plan options (keys of
`commands.options.PLAN_OPTIONS`, i.e. `build_plan` keyword arguments), what each came from,
and every key that changes memory but is not modelled (shown on stderr, never dropped).

Sources of the key names and defaults:
  axolotl        https://docs.axolotl.ai/docs/config-reference.html
  TRL            https://huggingface.co/docs/trl/sft_trainer (SFTConfig),
                 https://huggingface.co/docs/trl/script_utils (ModelConfig),
                 https://huggingface.co/docs/transformers/main_classes/trainer (TrainingArguments)
  LLaMA-Factory  https://llamafactory.readthedocs.io/en/latest/advanced/arguments.html,
                 examples/train_qlora/llama3_lora_sft_otfq.yaml in hiyouga/LLaMA-Factory

Pure: reads one file, imports no CLI library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from vramcalc.errors import PlanError
from vramcalc.trainers import AXOLOTL_KBIT

Format = Literal["axolotl", "trl", "llama-factory"]

# HF / axolotl / LLaMA-Factory optimizer names -> vramcalc's (plans.OPTIMIZERS)
_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "sgd": "sgd",
}
_ATTN = {"flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16",
           "fp16": "fp16", "fp32": "fp32"}
MULTI_GPU = ("the DeepSpeed / sharding config is not read: plan several GPUs with --gpus N "
             "--strategy ddp|fsdp|zero2|zero3")
FSDP = "fsdp"  # mapped to --strategy fsdp (commands/from_config.py apply_training_config)
TORCH_COMPILE = "torch.compile changes activation memory; not modelled"
MODULES_TO_SAVE = "fully trained modules (embeddings, lm_head) are not modelled"


class TrainingConfig(BaseModel):
    """What a training config file says about memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    format: Format
    model: str | None
    options: dict[str, Any]  # build_plan keyword -> value
    used: dict[str, str]  # build_plan keyword -> the file key it came from
    unmodelled: tuple[str, ...]  # "key: why", keys that change memory but are not modelled
    notes: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # top-level keys never read (no memory effect, or unknown)


class _ReadKeys(dict[str, Any]):
    """A config's top-level mapping that remembers which keys the mapper looked at."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


class _Mapper:
    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = _ReadKeys(data)
        self.path = path
        self.options: dict[str, Any] = {}
        self.used: dict[str, str] = {}
        self.unmodelled: list[str] = []
        self.notes: list[str] = []

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def set(self, option: str, value: Any, key: str) -> None:
        self.options[option] = value
        self.used[option] = key

    def int_(self, key: str, option: str) -> None:
        value = self.data.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"{self.path}: key '{key}': expected a positive integer, got "
                            f"{value!r}")
        self.set(option, value, key)

    def num(self, key: str, option: str) -> None:
        value = self.data.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{self.path}: key '{key}': expected a number, got {value!r}")
        self.set(option, float(value), key)

    def bool_(self, key: str, option: str, *, invert: bool = False) -> None:
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, bool):
            raise PlanError(f"{self.path}: key '{key}': expected true or false, got {value!r}")
        self.set(option, value != invert, key)

    def optimizer(self, key: str) -> None:
        value = self.data.get(key)
        if value is None:
            return
        name = str(value).lower()
        if name in _OPTIMIZERS:
            self.set("optimizer", _OPTIMIZERS[name], key)
        else:
            self.unmodelled.append(f"{key}: {value} (optimizer not modelled; pass --optimizer "
                                   "with the closest of adamw_torch, adamw_8bit, "
                                   "paged_adamw_8bit, ...)")

    def targets(self, key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, str):
            names = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            names = value
        else:
            raise PlanError(f"{self.path}: key '{key}': expected module names, got {value!r}")
        if names in (["all"], ["all-linear"], ["all_linear"]):
            self.set("targets", "all-linear", key)
        elif names:
            self.set("targets", ",".join(names), key)

    def precision(self, bf16: str = "bf16", fp16: str = "fp16") -> None:
        b, f = self.data.get(bf16), self.data.get(fp16)
        if b is True or b == "auto":
            self.set("compute_dtype", "bf16", bf16)
        elif f is True:
            self.set("compute_dtype", "fp16", fp16)
        elif b is False and f is False and "compute_dtype" not in self.options:
            # no autocast: the model computes in the dtype it is loaded in
            dtype = self.options.get("weights_dtype", "fp32")
            self.set("compute_dtype", dtype, f"{bf16}/{fp16}")

    def unmodelled_keys(self, keys: dict[str, str]) -> None:
        for key, why in keys.items():
            value = self.data.get(key)
            if value not in (None, False, "", [], {}):
                self.unmodelled.append(f"{key}: {why}")

    def result(self, fmt: Format, model: Any) -> TrainingConfig:
        return TrainingConfig(path=self.path, format=fmt,
                              model=None if model is None else str(model),
                              options=self.options, used=self.used,
                              unmodelled=tuple(self.unmodelled), notes=tuple(self.notes),
                              ignored=tuple(str(k) for k in self.data
                                            if str(k) not in self.data.read))


# liger-kernel 0.8.5 apply_liger_kernel_to_* defaults, which `--loss-kernel liger` models:
# rope, rms_norm, swiglu (geglu for Gemma) and fused_linear_cross_entropy on,
# cross_entropy off
_LIGER_DEFAULTS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True,
                   "fused_linear_cross_entropy": True, "cross_entropy": False}


def _liger(m: _Mapper, key: str, kernels: dict[str, Any], keys: dict[str, str]) -> None:
    """Liger turned on by `key`: --loss-kernel liger where every kernel is as
    apply_liger_kernel_to_* leaves it by default; a partial set is listed as not
    modelled (the estimate needs them all). `keys`: the kernel -> the config key that
    named it, for the message."""
    off = [keys.get(k, k) + f": {v}" for k, v in kernels.items()
           if k in _LIGER_DEFAULTS and v is not None and bool(v) != _LIGER_DEFAULTS[k]]
    if off:
        m.unmodelled.append(f"{key}: Liger with {', '.join(off)} is not modelled (only "
                            "its default kernels: --loss-kernel liger)")
        return
    m.set("loss_kernel", "liger", key)


def _fsdp(m: _Mapper) -> None:
    """`fsdp:` (and `fsdp_config:`) -> --strategy fsdp; the number of GPUs is the launcher's,
    so --gpus N gives it (commands/from_config.py)."""
    m.data.get("fsdp_config")
    if m.data.get("fsdp") not in (None, False, "", [], {}):
        m.set("strategy", FSDP, "fsdp")


def _packing_note(m: _Mapper, key: str, option_key: str) -> None:
    if key in m.data and m.data.get(key) is not True and "seq_len" in m.options:
        m.notes.append(f"{key} off: sequences are at most {option_key} tokens; the plan "
                       "assumes the longest reaches it (an upper bound; --lengths FILE "
                       "plans the worst step of your data)")


def _layout(m: _Mapper, key: str, layout: str, why: str) -> None:
    """`key: true` -> --batch-layout `layout`, with a note on the mechanism."""
    value = m.data.get(key)
    if value is None:
        return
    if not isinstance(value, bool):
        raise PlanError(f"{m.path}: key '{key}': expected true or false, got {value!r}")
    if value:
        m.set("batch_layout", layout, key)
        m.notes.append(f"{key}: {why}")


def _offload(m: _Mapper, key: str, value: Any, mode: str | None, why: str) -> None:
    """An offloading key -> --offload-activations `mode` (None: not modelled)."""
    if mode is None:
        m.unmodelled.append(f"{key}: {value} ({why})")
    else:
        m.set("offload_activations", mode, key)
        m.notes.append(f"{key}: {value}: {why}")


_TRL_OFFLOAD = "every saved activation outside the lm_head to pinned host memory (TRL " \
    "OffloadActivations)"


def _axolotl(m: _Mapper) -> TrainingConfig:
    d = m.data
    adapter = d.get("adapter")
    if d.get("load_in_4bit"):
        m.set("quant", "nf4", "load_in_4bit")
    elif d.get("load_in_8bit"):
        m.set("quant", "int8", "load_in_8bit")
    if adapter in ("lora", "qlora"):
        method = "qlora" if adapter == "qlora" or "quant" in m.options else "lora"
        m.set("method", method, "adapter")
        if method == "qlora" and "quant" not in m.options:
            m.set("quant", "nf4", "adapter")
    elif adapter is None:
        m.set("method", "full", "adapter")
    else:
        m.unmodelled.append(f"adapter: {adapter} (only lora and qlora are modelled)")
    bnb = d.get("bnb_config_kwargs") or {}
    if isinstance(bnb, dict):
        if bnb.get("bnb_4bit_quant_type") in ("nf4", "fp4") and m.options.get("quant") != "int8":
            m.set("quant", bnb["bnb_4bit_quant_type"], "bnb_config_kwargs.bnb_4bit_quant_type")
        if isinstance(bnb.get("bnb_4bit_use_double_quant"), bool):
            m.set("double_quant", bnb["bnb_4bit_use_double_quant"],
                  "bnb_config_kwargs.bnb_4bit_use_double_quant")
    m.int_("lora_r", "rank")
    m.num("lora_alpha", "alpha")
    m.num("lora_dropout", "lora_dropout")
    m.bool_("peft_use_dora", "dora")
    if d.get("lora_target_linear") is True:
        m.set("targets", "all-linear", "lora_target_linear")
    else:
        m.targets("lora_target_modules", d.get("lora_target_modules"))
    m.int_("micro_batch_size", "batch")
    m.int_("sequence_len", "seq_len")
    # multipack: micro_batch_size rows of sequence_len, several samples each with their
    # own position_ids (padded to sequence_len: pad_to_sequence_len defaults to true with
    # sample_packing)
    _layout(m, "sample_packing", "packed", "micro_batch_size rows of sequence_len tokens, "
            "several sequences each (planned full)")
    if d.get("pad_to_sequence_len") is True and d.get("sample_packing") is not True:
        m.notes.append("pad_to_sequence_len: every row padded to sequence_len, as planned")
    elif d.get("sample_packing") is not True and "seq_len" in m.options:
        m.notes.append("sample_packing off: sequences are at most sequence_len tokens; the "
                       "plan assumes the longest reaches it (give --lengths FILE for the "
                       "worst step of your data)")
    gc = d.get("gradient_checkpointing")
    if isinstance(gc, bool):
        m.set("gradient_checkpointing", gc, "gradient_checkpointing")
    elif gc is not None:
        m.set("gradient_checkpointing", True, "gradient_checkpointing")
        # axolotl schemas/validation.py check_gradient_checkpointing_w_offload: "offload"
        # is `activation_offloading: true`, "offload_disk" is `activation_offloading: disk`
        if gc == "offload":
            _offload(m, "gradient_checkpointing", gc, "all", _TRL_OFFLOAD)
        else:
            _offload(m, "gradient_checkpointing", gc, None, "offloading to disk is not "
                     "modelled; planned as plain checkpointing")
    ao = d.get("activation_offloading")
    if ao in (True, "legacy"):
        _offload(m, "activation_offloading", ao, "all", _TRL_OFFLOAD)
    elif ao == "hidden_states":
        _offload(m, "activation_offloading", ao, "checkpoints", "the checkpointed layer "
                 "inputs to host memory")
    elif ao not in (None, False):
        _offload(m, "activation_offloading", ao, None, "offloading to disk is not modelled")
    m.optimizer("optimizer")
    m.precision()
    if d.get("flash_attention"):
        m.set("attn", "flash_attention_2", "flash_attention")
    elif d.get("sdp_attention"):
        m.set("attn", "sdpa", "sdp_attention")
    elif d.get("eager_attention"):
        m.set("attn", "eager", "eager_attention")
    _fsdp(m)
    _axolotl_kbit(m)
    plugins = d.get("plugins") or []
    plugins = [str(p) for p in plugins] if isinstance(plugins, list) else [str(plugins)]
    liger_plugin = any(p.endswith("LigerPlugin") for p in plugins)
    cce_plugin = any(p.endswith("CutCrossEntropyPlugin") for p in plugins)
    if d.get("cut_cross_entropy") and cce_plugin:
        # axolotl integrations/cut_cross_entropy: CutCrossEntropyPlugin patches the model
        # with cut_cross_entropy.transformers cce_patch when `cut_cross_entropy: true`
        m.set("loss_kernel", "cce", "cut_cross_entropy")
    elif d.get("cut_cross_entropy"):
        m.unmodelled.append("cut_cross_entropy: without the CutCrossEntropyPlugin in "
                            "`plugins` axolotl does not apply it; planned without")
    if d.get("liger_fused_linear_cross_entropy") and liger_plugin:
        if "loss_kernel" in m.options:
            m.unmodelled.append("liger_fused_linear_cross_entropy: with cut_cross_entropy "
                                "as well; planned as cut-cross-entropy")
        else:
            # axolotl integrations/liger LigerPlugin: apply_liger_kernel_to_* with
            # rope=liger_rope, rms_norm=liger_rms_norm, swiglu=liger_glu_activation,
            # fused_linear_cross_entropy=liger_fused_linear_cross_entropy
            names = {"rope": "liger_rope", "rms_norm": "liger_rms_norm",
                     "swiglu": "liger_glu_activation", "cross_entropy": "liger_cross_entropy"}
            _liger(m, "liger_fused_linear_cross_entropy",
                   {k: bool(d.get(v)) for k, v in names.items()}, names)
    elif d.get("liger_fused_linear_cross_entropy"):
        m.unmodelled.append("liger_fused_linear_cross_entropy: without the LigerPlugin in "
                            "`plugins` axolotl does not apply it; planned without")
    elif liger_plugin and any(d.get(k) for k in ("liger_rope", "liger_rms_norm",
                                                 "liger_glu_activation")):
        m.unmodelled.append("liger_rope / liger_rms_norm / liger_glu_activation without "
                            "liger_fused_linear_cross_entropy are not modelled")
    m.unmodelled_keys({
        "deepspeed": MULTI_GPU,
        "xformers_attention": "xformers attention is not modelled",
        "s2_attention": "shifted-sparse attention is not modelled",
        "lora_modules_to_save": MODULES_TO_SAVE,
        "unfrozen_parameters": "partially unfrozen parameters are not modelled",
        "unsloth_lora_mlp": "unsloth kernels are not modelled",
        "lora_mlp_kernel": "axolotl's LoRA kernels are not modelled",
        "torch_compile": TORCH_COMPILE,
        "rl": "preference training (reference model, pairs) is not modelled",
        "relora_steps": "ReLoRA is not modelled",
        "gptq": "GPTQ weights are not modelled",
        "fp32_norms": "fp32 norm weights (utils/fp32_norms.py) are not modelled",
        "embeddings_skip_upcast": "skips the embeddings' fp32 pass while the model loads "
                                  "(not modelled: the trained state is the same)",
    })
    return m.result("axolotl", d.get("base_model"))


def _axolotl_kbit(m: _Mapper) -> None:
    """axolotl's preparation of a 4/8-bit base, as `--trainer axolotl` plans it
    (trainers.AXOLOTL_KBIT; trainers.py's docstring has the source: axolotl 067b021
    loaders/model.py, kbit_prep False's trained state, fp32 adapters). loaders/adapter.py
    load_lora: get_peft_model(autocast_adapter_dtype=peft_autocast_adapter_dtype if set,
    else peft's True); peft 0.21 tuners_utils.py _move_adapter_to_device_of_base_layer
    never casts the adapters to an integer base's dtype, so on a 4/8-bit base they are
    fp32 either way."""
    d = m.data
    method = m.options.get("method")
    autocast = d.get("peft_autocast_adapter_dtype")
    if method == "qlora":
        why = {"kbit_prep": "adapter (norms, embeddings, lm_head back to the load dtype)",
               "adapter_dtype": "adapter (peft's fp32 adapters)"}
        for name, value in AXOLOTL_KBIT.items():
            m.set(name, value, why[name])
        m.notes.append("axolotl on a quantized base: prepare_model_for_kbit_training, then "
                       "the norms, embeddings and lm_head back to the load dtype (planned "
                       "--no-kbit-prep --adapter-dtype fp32); MoE router gates stay fp32 "
                       "and the biases of quantized layers are fp32 until bitsandbytes "
                       "casts them in the first forward (not modelled); not measured on a "
                       "GPU")
        if autocast is False:
            m.notes.append("peft_autocast_adapter_dtype: false does not change a quantized "
                           "base's adapters (peft makes them fp32)")
    elif method == "lora" and autocast is False:
        # peft 0.21 _move_adapter_to_device_of_base_layer: the adapters in the base
        # layer's float dtype (axolotl loads it in cfg.torch_dtype: bf16 "auto" default)
        dtype = m.options.get("compute_dtype", "bf16")
        if m.options.get("dora"):
            m.unmodelled.append("peft_autocast_adapter_dtype: false with DoRA (adapters in "
                                f"{dtype}) is not modelled; planned fp32")
        elif dtype in ("bf16", "fp16"):
            m.set("adapter_dtype", dtype, "peft_autocast_adapter_dtype (adapters in the "
                  "load dtype)")


def _trl(m: _Mapper) -> TrainingConfig:
    d = m.data
    raw_init = d.get("model_init_kwargs")
    init: dict[str, Any] = raw_init if isinstance(raw_init, dict) else {}
    dtype = d.get("torch_dtype") or d.get("dtype") or init.get("torch_dtype") or init.get("dtype")
    if dtype in _DTYPES:
        m.set("weights_dtype", _DTYPES[dtype], "torch_dtype")
    if d.get("load_in_4bit"):
        m.set("quant", d.get("bnb_4bit_quant_type") or "nf4", "load_in_4bit")
        if isinstance(d.get("use_bnb_nested_quant"), bool):
            m.set("double_quant", d["use_bnb_nested_quant"], "use_bnb_nested_quant")
    elif d.get("load_in_8bit"):
        m.set("quant", "int8", "load_in_8bit")
    if d.get("use_peft"):
        m.set("method", "qlora" if "quant" in m.options else "lora", "use_peft")
    elif "use_peft" in d or "model_name_or_path" in d:
        m.set("method", "full", "use_peft")
    if m.options.get("method") == "qlora":
        m.options.pop("weights_dtype", None)  # the quantized base: dtype is the compute's
        m.used.pop("weights_dtype", None)
    m.int_("lora_r", "rank")
    m.num("lora_alpha", "alpha")
    m.num("lora_dropout", "lora_dropout")
    m.bool_("use_dora", "dora")
    if m.options.get("method") == "qlora":
        # trl 1.16 sft_trainer.py SFTTrainer.__init__ on a quantized model: get_peft_model
        # without prepare_model_for_kbit_training, then every trainable parameter but
        # lora_magnitude_vector cast to bf16 (DoRA's magnitude stays fp32: not modelled)
        m.set("kbit_prep", False, "use_peft (SFTTrainer: no prepare_model_for_kbit_training)")
        if not m.options.get("dora"):
            m.set("adapter_dtype", "bf16", "use_peft (SFTTrainer casts the adapters to bf16)")
    m.targets("lora_target_modules", d.get("lora_target_modules"))
    # TrainingArguments' default per_device_train_batch_size is 8
    if "per_device_train_batch_size" in d:
        m.int_("per_device_train_batch_size", "batch")
    else:
        m.set("batch", 8, "per_device_train_batch_size (TrainingArguments default)")
    key = "max_length" if "max_length" in d else "max_seq_length"
    m.int_(key, "seq_len")
    if key in d and d[key] is None:
        m.unmodelled.append(f"{key}: null (no truncation: pass --seq-len with your longest "
                            "sequence)")
    # sft_trainer.py: padding_free = args.padding_free or (args.packing and
    # args.packing_strategy in {"bfd", "bfd_split"}); "wrapped" packing fills rows of
    # max_length without position_ids: padded rows, every one full
    strategy = d.get("packing_strategy", "bfd")
    if d.get("packing") is True and strategy == "wrapped":
        m.notes.append("packing (wrapped): rows of max_length tokens, planned full")
    else:
        _layout(m, "packing", "padding-free", f"packing_strategy {strategy} makes the "
                "batch padding-free: the packed rows flattened into one of batch x "
                "max_length tokens (planned full)")
    if d.get("padding_free") is not True:
        _packing_note(m, "packing", key)
    _layout(m, "padding_free", "padding-free", "the batch's sequences flattened into one "
            "row (give --tokens-per-step or --lengths for the real tokens; planned full)")
    if d.get("activation_offloading") is True:
        _offload(m, "activation_offloading", True, "all", _TRL_OFFLOAD)
    # transformers 5.25 modeling_utils `_activation_checkpointing_enable(offload=True)`
    # (Trainer pops `offload` from these kwargs): each checkpoint runs under
    # `save_on_cpu(pin_memory=True)`, its inputs in pinned host memory
    for kw in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        ck = d.get(kw)
        if isinstance(ck, dict) and ck.get("offload") is True and \
                "offload_activations" not in m.options:
            _offload(m, f"{kw}.offload", True, "checkpoints", "the checkpointed layer inputs "
                     "to pinned host memory (save_on_cpu: every layer's, each brought back "
                     "as a new tensor; planned as Unsloth's, within one layer input)")
    m.bool_("gradient_checkpointing", "gradient_checkpointing")
    m.bool_("activation_checkpointing", "gradient_checkpointing")  # transformers 5.2x name
    # TrainingArguments.use_cache: what Trainer.__init__ sets model.config.use_cache to
    m.bool_("use_cache", "use_cache")
    m.optimizer("optim")
    attn = d.get("attn_implementation") or init.get("attn_implementation")
    if attn in _ATTN:
        m.set("attn", _ATTN[attn], "attn_implementation")
    elif attn is not None:
        m.unmodelled.append(f"attn_implementation: {attn} (not modelled)")
    m.precision()
    _fsdp(m)
    if d.get("use_liger_kernel") is True:
        # transformers Trainer: _apply_liger_kernel_to_instance(model, **liger_kernel_config)
        raw = d.get("liger_kernel_config")
        config: dict[str, Any] = raw if isinstance(raw, dict) else {}
        _liger(m, "use_liger_kernel", config,
               {k: f"liger_kernel_config.{k}" for k in config})
    # trl 1.16.0 sft_config.py loss_type: "nll" (default), "dft", "chunked_nll" (a
    # deprecated alias of "nll", __post_init__); whatever it is, SFTTrainer.__init__ adds
    # the fused LM head (trainer/utils.py add_fused_lm_head) and compute_loss takes
    # -log_probs from it (dft weights them by their exp: a few [B, S] fp32 tensors more,
    # not modelled): --loss-kernel trl-fused. TRL 1.4-1.14 read "chunked_nll" (their
    # default) as its _patch_chunked_ce_lm_head (--loss-kernel trl-chunked) and "nll" as
    # the model's own loss (--loss-kernel torch): give --loss-kernel for those versions.
    # use_liger_kernel: TRL >= 1.15 refuses Liger's fused linear cross-entropy and keeps
    # its fused head with Liger's layer kernels, a mix not modelled (planned as liger's).
    loss_type = d.get("loss_type")
    if d.get("use_liger_kernel") is True:
        m.unmodelled.append("use_liger_kernel with TRL >= 1.15: Liger's layer kernels with "
                            "TRL's fused LM head (TRL refuses Liger's fused linear "
                            "cross-entropy); planned as --loss-kernel liger")
    elif loss_type in ("nll", "chunked_nll", "dft"):
        m.set("loss_kernel", "trl-fused", "loss_type")
        if loss_type == "dft":
            m.unmodelled.append("loss_type: dft (TRL's fused LM head; its per-token weights, "
                                "log_probs.exp(), not modelled)")
    elif loss_type is not None:
        m.unmodelled.append(f"loss_type: {loss_type} (not modelled; planned as "
                            "loss_type nll)")
    m.unmodelled_keys({
        "deepspeed": MULTI_GPU,
        "torch_compile": TORCH_COMPILE,
        "lora_modules_to_save": MODULES_TO_SAVE,
        "modules_to_save": MODULES_TO_SAVE,
        "neftune_noise_alpha": "NEFTune noise is not modelled",
    })
    return m.result("trl", d.get("model_name_or_path"))


def _llama_factory(m: _Mapper) -> TrainingConfig:
    d = m.data
    ft = d.get("finetuning_type", "lora")  # LLaMA-Factory's default
    bits = d.get("quantization_bit")
    if bits is not None and d.get("quantization_method", "bnb") != "bnb":
        m.unmodelled.append(f"quantization_method: {d['quantization_method']} (only bnb is "
                            "modelled)")
    elif bits == 4:
        m.set("quant", d.get("quantization_type", "nf4"), "quantization_bit")
        if isinstance(d.get("double_quantization"), bool):
            m.set("double_quant", d["double_quantization"], "double_quantization")
    elif bits == 8:
        m.set("quant", "int8", "quantization_bit")
    elif bits is not None:
        m.unmodelled.append(f"quantization_bit: {bits} (only 4 and 8 are modelled)")
    if ft == "lora":
        m.set("method", "qlora" if "quant" in m.options else "lora", "finetuning_type")
    elif ft == "full":
        m.set("method", "full", "finetuning_type")
    else:
        m.unmodelled.append(f"finetuning_type: {ft} (only lora and full are modelled)")
    m.int_("lora_rank", "rank")
    if "lora_alpha" in d:
        m.num("lora_alpha", "alpha")
    elif "rank" in m.options:
        m.set("alpha", 2.0 * m.options["rank"], "lora_alpha (default: 2 x lora_rank)")
    m.num("lora_dropout", "lora_dropout")
    m.bool_("use_dora", "dora")
    m.targets("lora_target", d.get("lora_target"))
    m.int_("per_device_train_batch_size", "batch")
    if "cutoff_len" in d:
        m.int_("cutoff_len", "seq_len")
    else:
        m.set("seq_len", 2048, "cutoff_len (LLaMA-Factory default)")
    # LLaMA-Factory data/processor/supervised.py PackedSupervisedDatasetProcessor: packing
    # fills rows of cutoff_len (attention across the packed sequences: planned as padded
    # full rows); neat_packing gives each sequence its own index in the attention mask,
    # made block-diagonal (model/model_utils/packing.py): packed rows
    if d.get("neat_packing") is True:
        _layout(m, "neat_packing", "packed", "per_device_train_batch_size rows of "
                "cutoff_len tokens, several sequences each, no attention across them")
    elif d.get("packing") is True:
        m.notes.append("packing: rows of cutoff_len tokens, planned full")
    else:
        _packing_note(m, "packing", "cutoff_len")
    m.bool_("disable_gradient_checkpointing", "gradient_checkpointing", invert=True)
    if d.get("use_unsloth_gc") is True:
        _offload(m, "use_unsloth_gc", True, "checkpoints", "Unsloth's gradient "
                 "checkpointing: the checkpointed layer inputs to pinned host memory")
    m.optimizer("optim")
    fa = d.get("flash_attn")
    fa_map = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager"}
    if fa in fa_map:
        m.set("attn", fa_map[fa], "flash_attn")
    if d.get("pure_bf16"):
        m.set("weights_dtype", "bf16", "pure_bf16")
    m.precision()
    stage = d.get("stage", "sft")
    if stage not in ("sft", "pt"):
        m.unmodelled.append(f"stage: {stage} (reward / preference / PPO training is not "
                            "modelled: reference and value models)")
    if d.get("enable_liger_kernel") is True and stage in ("sft", "pt"):
        # llamafactory model/loader.py: apply_liger_kernel(..., require_logits=(stage not in
        # ["pt", "sft"])): the fused loss only for pt and sft, with Liger's other defaults
        m.set("loss_kernel", "liger", "enable_liger_kernel")
    elif d.get("enable_liger_kernel") is True:
        m.unmodelled.append(f"enable_liger_kernel: Liger without its fused loss (stage "
                            f"{stage} keeps the logits) is not modelled")
    _fsdp(m)
    if m.options.get("method") == "qlora":
        # LLaMA-Factory ff6d4d1 (2026-08-18): src/llamafactory/model never calls peft
        # prepare_model_for_kbit_training (patcher.py patch_model ->
        # model_utils/checkpointing.py prepare_model_for_training: fp32 layernorms only
        # with upcast_layernorm); adapter.py init_adapter casts every trainable parameter
        # to fp32 (cast_trainable_params_to_fp32) unless pure_bf16 / use_badam, and then
        # peft get_peft_model (autocast_adapter_dtype True) has made a quantized base's
        # adapters fp32 anyway
        m.set("kbit_prep", False, "quantization_bit (no prepare_model_for_kbit_training)")
        m.set("adapter_dtype", "fp32", "quantization_bit (trainable params fp32)")
        m.notes.append("LLaMA-Factory on a quantized base: no prepare_model_for_kbit_training, "
                       "adapters fp32 (planned --no-kbit-prep --adapter-dtype fp32); not "
                       "measured on a GPU")
    if d.get("pure_bf16") and m.options.get("method") in ("lora", "qlora"):
        m.notes.append("pure_bf16: the LoRA adapters stay fp32 (peft get_peft_model "
                       "autocast_adapter_dtype True), as planned")
    m.unmodelled_keys({
        "deepspeed": MULTI_GPU,
        "use_unsloth": "unsloth kernels are not modelled",
        "use_galore": "GaLore optimizer states are not modelled",
        "use_badam": "BAdam is not modelled",
        "use_apollo": "APOLLO is not modelled",
        "additional_target": "fully trained modules are not modelled",
        "upcast_layernorm": "fp32 layernorm weights (model_utils/checkpointing.py "
                            "prepare_model_for_training) are not modelled; planned in the "
                            "load dtype",
        "upcast_lmhead_output": "the lm_head output cast to fp32 by a forward hook "
                                "(prepare_model_for_training) is not modelled",
        "mixture_of_depths": "mixture of depths is not modelled",
    })
    return m.result("llama-factory", d.get("model_name_or_path"))


def detect_format(data: dict[str, Any]) -> Format | None:
    """Which project wrote the file, by its keys."""
    if "base_model" in data and any(
        k in data for k in ("micro_batch_size", "sequence_len", "adapter", "datasets", "lora_r")
    ):
        return "axolotl"
    if any(k in data for k in ("finetuning_type", "cutoff_len", "quantization_bit", "stage",
                               "lora_target", "template")):
        return "llama-factory"
    if any(k in data for k in ("per_device_train_batch_size", "optim", "output_dir",
                               "max_seq_length", "packing", "use_peft", "model_name_or_path")):
        return "trl"
    return None


def read_training_config(path: Path) -> TrainingConfig:
    """Parse one training config file; every problem is one PlanError line."""
    from vramcalc.user_files import read_text

    text = read_text(path, f"--from-config {path}", PlanError)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise PlanError(f"--from-config {path}: malformed {kind}") from None
    if not isinstance(data, dict):
        raise PlanError(f"--from-config {path}: expected a mapping of keys at the top level")
    fmt = detect_format(data)
    if fmt is None:
        raise PlanError(
            f"--from-config {path}: not an axolotl, TRL/TrainingArguments or LLaMA-Factory "
            "config (none of base_model, per_device_train_batch_size, finetuning_type, "
            "cutoff_len found)"
        )
    m = _Mapper(data, str(path))
    return {"axolotl": _axolotl, "trl": _trl, "llama-factory": _llama_factory}[fmt](m)


def map_training_config(data: dict[str, Any], source: str, fmt: Format) -> TrainingConfig:
    """The plan options of a config already parsed into `data` (keys as the file of `fmt`
    writes them); `source` names it in messages. `vramcalc.preflight` maps the objects of
    a training script (TrainingArguments.to_dict(), LoraConfig fields) through here."""
    m = _Mapper(data, source)
    return {"axolotl": _axolotl, "trl": _trl, "llama-factory": _llama_factory}[fmt](m)
