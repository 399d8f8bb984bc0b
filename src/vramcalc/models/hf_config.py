"""Import a Hugging Face `config.json` as a ModelSpec.

Each supported `model_type` maps its config keys onto the spec's module layout (separate or
fused q/k/v, gated / fused / plain MLP, norms, biases, experts). An optional key that is
absent takes the default of the transformers config class, so the spec describes the model
that `AutoModelForCausalLM.from_config` would build. Every family here is tested: the
imported spec's `num_params()` equals `sum(p.numel())` of that model built on the meta
device (tests/models/test_hf_config.py). The size keys themselves (vocab, hidden, intermediate,
layers, heads) are required: a file without them is not a model's config.json.

Keys the spec does not model (rope, sliding window, MoE routing, falcon flags, ...) are
kept in `extra_config`, so `spec.to_hf_config()` rebuilds the same transformers model.

This module reads JSON only: it never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vramcalc.errors import SpecError
from vramcalc.models.spec import ModelSpec, parse_json_text, spec_from_mapping

# Keys that `ModelSpec.to_hf_config()` writes itself, and bookkeeping keys of saved configs.
_SPEC_KEYS = frozenset(
    {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
    }
)
_NOT_ARCHITECTURE = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "quantization_config",  # a pre-quantized checkpoint has the same architecture
    }
)

# model_types that are encoder-decoder (the error says so instead of "unsupported").
_ENCODER_DECODER = frozenset(
    {
        "bart",
        "bigbird_pegasus",
        "blenderbot",
        "encoder-decoder",
        "fsmt",
        "led",
        "longt5",
        "m2m_100",
        "marian",
        "mbart",
        "mt5",
        "pegasus",
        "plbart",
        "prophetnet",
        "switch_transformers",
        "t5",
        "t5gemma",
        "umt5",
        "whisper",
    }
)


class _Reader:
    """Typed access to one config mapping; every error names the file and the key."""

    def __init__(self, cfg: dict[str, Any], origin: str, prefix: str = "") -> None:
        self.cfg = cfg
        self.origin = origin
        self.prefix = prefix

    def error(self, key: str, what: str) -> SpecError:
        return SpecError(f"{self.origin}: key '{self.prefix}{key}': {what}")

    def _find(self, names: tuple[str, ...]) -> tuple[str, Any]:
        for name in names:
            if name in self.cfg:
                return name, self.cfg[name]
        return names[0], None

    def _check_int(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def require_int(self, *names: str) -> int:
        """A positive integer; `names` lists the accepted spellings, canonical first."""
        key, value = self._find(names)
        if value is None:
            spelled = " or ".join(f"'{self.prefix}{n}'" for n in names[1:])
            also = f" (also read as {spelled})" if spelled else ""
            what = "missing" if key not in self.cfg else "is null"
            raise self.error(
                key, f"required key {what}{also}; is this a model's config.json from the hub?"
            )
        return self._check_int(key, value, 1)

    def opt_int(self, name: str, default: int | None, minimum: int = 1) -> int | None:
        """An optional integer: `default` when absent, None when null."""
        if name not in self.cfg:
            return default
        value = self.cfg[name]
        return None if value is None else self._check_int(name, value, minimum)

    def opt_bool(self, name: str, default: bool) -> bool:
        value = self.cfg.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def opt_int_list(self, name: str) -> list[int]:
        value = self.cfg.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.error(name, f"expected a list of layer indices, got {value!r}")
        return value


def _sizes(
    r: _Reader,
    *,
    kv_default: int | None,
    tie_default: bool,
    head_dim_default: int | None = None,
    honours_head_dim: bool = True,
) -> dict[str, Any]:
    """The size keys every family shares.

    kv_default: what the config class uses when `num_key_value_heads` is absent (None: MHA;
    null always means MHA). head_dim_default: the class default when `head_dim` is absent
    (None: hidden_size // num_attention_heads). honours_head_dim=False for models that
    always use hidden_size // num_attention_heads (falcon, stablelm).
    """
    heads = r.require_int("num_attention_heads")
    out: dict[str, Any] = {
        "vocab_size": r.require_int("vocab_size"),
        "hidden_size": r.require_int("hidden_size"),
        "intermediate_size": r.require_int("intermediate_size"),
        "num_hidden_layers": r.require_int("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": r.opt_int("num_key_value_heads", kv_default) or heads,
        "tie_word_embeddings": r.opt_bool("tie_word_embeddings", tie_default),
    }
    if honours_head_dim:
        out["head_dim"] = r.opt_int("head_dim", head_dim_default) or head_dim_default
    return out


def _attention_bias(r: _Reader, key: str = "attention_bias") -> dict[str, Any]:
    bias = r.opt_bool(key, False)
    return {"qkv_bias": bias, "o_bias": bias}


def _llama(r: _Reader) -> dict[str, Any]:
    # llama and granite: LlamaAttention / LlamaMLP with optional biases.
    return {
        **_sizes(r, kv_default=None, tie_default=False),
        **_attention_bias(r),
        "mlp_bias": r.opt_bool("mlp_bias", False),
    }


def _mistral(r: _Reader) -> dict[str, Any]:
    return _sizes(r, kv_default=8, tie_default=False)


def _mixtral(r: _Reader) -> dict[str, Any]:
    return {
        **_sizes(r, kv_default=8, tie_default=False),
        "num_local_experts": _experts(r, ("num_local_experts", "num_experts"), 8),
        "num_experts_per_tok": r.opt_int("num_experts_per_tok", 2) or 2,
    }


def _qwen2(r: _Reader) -> dict[str, Any]:
    # Qwen2Attention: q/k/v always carry a bias, o_proj never.
    return {**_sizes(r, kv_default=32, tie_default=False), "qkv_bias": True}


def _qwen3(r: _Reader) -> dict[str, Any]:
    return {
        **_sizes(r, kv_default=32, tie_default=False, head_dim_default=128),
        **_attention_bias(r),
        "qk_norm": True,
    }


def _experts(r: _Reader, names: tuple[str, ...], default: int) -> int:
    key, value = r._find(names)
    if value is None:
        return default
    return r._check_int(key, value, 1)


def _all_layers_sparse(r: _Reader) -> None:
    """Qwen-MoE can keep some layers dense; a spec has one layout for every layer."""
    if r.opt_int_list("mlp_only_layers"):
        raise r.error(
            "mlp_only_layers",
            "dense layers mixed with MoE layers are not supported; write a spec YAML instead",
        )
    step = r.opt_int("decoder_sparse_step", 1) or 1
    if step != 1:
        raise r.error(
            "decoder_sparse_step",
            f"{step} mixes dense and MoE layers, which is not supported; only 1 is",
        )


def _qwen2_moe(r: _Reader) -> dict[str, Any]:
    _all_layers_sparse(r)
    return {
        **_sizes(r, kv_default=16, tie_default=False),
        "qkv_bias": r.opt_bool("qkv_bias", True),
        "num_local_experts": _experts(r, ("num_experts", "num_local_experts"), 60),
        "num_experts_per_tok": r.opt_int("num_experts_per_tok", 4) or 4,
        "moe_intermediate_size": r.opt_int("moe_intermediate_size", 1408) or 1408,
        "shared_expert_intermediate_size": r.opt_int("shared_expert_intermediate_size", 5632)
        or 5632,
    }


def _qwen3_moe(r: _Reader) -> dict[str, Any]:
    _all_layers_sparse(r)
    return {
        **_sizes(r, kv_default=4, tie_default=False),
        **_attention_bias(r),
        "qk_norm": True,
        "num_local_experts": _experts(r, ("num_experts", "num_local_experts"), 128),
        "num_experts_per_tok": r.opt_int("num_experts_per_tok", 8) or 8,
        "moe_intermediate_size": r.opt_int("moe_intermediate_size", 768) or 768,
    }


def _gemma(r: _Reader) -> dict[str, Any]:
    return {
        **_sizes(r, kv_default=16, tie_default=True, head_dim_default=256),
        **_attention_bias(r),
    }


def _gemma2(r: _Reader) -> dict[str, Any]:
    # input, post_attention, pre_feedforward and post_feedforward norms.
    return {
        **_sizes(r, kv_default=4, tie_default=True, head_dim_default=256),
        **_attention_bias(r),
        "norms_per_layer": 4,
    }


def _gemma3_text(r: _Reader) -> dict[str, Any]:
    return {**_gemma2(r), "qk_norm": True}


def _phi(r: _Reader) -> dict[str, Any]:
    if r.opt_bool("qk_layernorm", False):
        raise r.error(
            "qk_layernorm",
            "phi with q/k LayerNorms is not supported; write a spec YAML instead",
        )
    return {
        **_sizes(r, kv_default=None, tie_default=False),
        "mlp_layout": "plain",
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "lm_head_bias": True,
        "norm": "layernorm",
        "norms_per_layer": 1,  # attention and MLP read the same input_layernorm
        "module_names": {"o": "dense"},
    }


def _phi3(r: _Reader) -> dict[str, Any]:
    return {
        **_sizes(r, kv_default=None, tie_default=False),
        "attention_layout": "fused_qkv",
        "mlp_layout": "fused_gated",
    }


def _falcon(r: _Reader) -> dict[str, Any]:
    hidden = r.require_int("hidden_size", "n_embed")
    heads = r.require_int("num_attention_heads", "n_head")
    new_arch = r.opt_bool("new_decoder_architecture", False)
    if new_arch:
        kv = r.opt_int("num_kv_heads", None) or heads
    else:
        kv = 1 if r.opt_bool("multi_query", True) else heads
    if not r.opt_bool("parallel_attn", True):
        norms = 2  # input_layernorm and post_attention_layernorm
    else:
        n_ln = r.opt_int("num_ln_in_parallel_attn", 2 if new_arch else None)
        norms = 2 if n_ln == 2 else 1  # ln_attn + ln_mlp, or one shared input_layernorm
    bias = r.opt_bool("bias", False)
    names = {"qkv": "query_key_value", "o": "dense"}
    return {
        "vocab_size": r.require_int("vocab_size"),
        "hidden_size": hidden,
        # FalconConfig.ffn_hidden_size defaults to 4 * hidden_size (intermediate_size is ignored)
        "intermediate_size": r.opt_int("ffn_hidden_size", None) or 4 * hidden,
        "num_hidden_layers": r.require_int("num_hidden_layers", "n_layer"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "tie_word_embeddings": r.opt_bool("tie_word_embeddings", True),
        "attention_layout": "fused_qkv",
        "mlp_layout": "plain",
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bias,
        "norm": "layernorm",
        "norms_per_layer": norms,
        "module_names": {**names, "fc1": "dense_h_to_4h", "fc2": "dense_4h_to_h"},
    }


def _starcoder2(r: _Reader) -> dict[str, Any]:
    bias = r.opt_bool("use_bias", True)
    return {
        **_sizes(r, kv_default=2, tie_default=True),
        "mlp_layout": "plain",
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bias,
        "norm": "layernorm",
        "module_names": {"fc1": "c_fc", "fc2": "c_proj"},
    }


def _olmo2(r: _Reader) -> dict[str, Any]:
    # post_attention and post_feedforward norms only; q/k norms over the whole projection.
    return {
        **_sizes(r, kv_default=None, tie_default=False),
        **_attention_bias(r),
        "qk_norm": True,
        "qk_norm_width": "all_heads",
    }


def _stablelm(r: _Reader) -> dict[str, Any]:
    qk_norm = r.opt_bool("qk_layernorm", False)
    parallel = r.opt_bool("use_parallel_residual", False)
    return {
        **_sizes(r, kv_default=32, tie_default=False, honours_head_dim=False),
        "qkv_bias": r.opt_bool("use_qkv_bias", False),
        "norm": "layernorm",
        "norms_per_layer": 1 if parallel else 2,
        # one bias-free LayerNorm(head_dim) per head: num_heads * head_dim weights for q
        "qk_norm": qk_norm,
        "qk_norm_width": "all_heads",
    }


def _cohere(r: _Reader) -> dict[str, Any]:
    # CohereLayerNorm has a weight and no bias: it counts like an RMSNorm.
    return {
        **_sizes(r, kv_default=None, tie_default=True),
        **_attention_bias(r),
        "norms_per_layer": 1,  # attention and MLP run in parallel on one input_layernorm
        "qk_norm": r.opt_bool("use_qk_norm", False),
        "qk_norm_width": "all_heads",
    }


def _qwen2_vl_text(r: _Reader) -> dict[str, Any]:
    # Qwen2VLTextConfig: num_key_value_heads defaults to 8; q/k/v biased, o_proj not.
    return {**_sizes(r, kv_default=8, tie_default=False), "qkv_bias": True}


def _mllama_text(r: _Reader) -> dict[str, Any]:
    # MllamaTextConfig; the cross-attention layers are counted as self-attention layers.
    return _sizes(r, kv_default=8, tie_default=False)


def _mllama_note(data: dict[str, Any], fields: dict[str, Any]) -> str:
    """What a Llama-3.2-Vision language model has that the spec does not hold."""
    cross = data.get("cross_attention_layers") or []
    heads = fields["num_attention_heads"]
    head_dim = fields.get("head_dim") or fields["hidden_size"] // heads
    # 8 extra embedding rows (image tokens); per cross layer q_norm + k_norm over head_dim
    # and two scalar gates (MllamaTextModel, MllamaCrossAttentionDecoderLayer).
    missing = 8 * fields["hidden_size"] + len(cross) * (2 * head_dim + 2)
    return (
        f"mllama: the {len(cross)} cross-attention layers are counted as self-attention "
        f"layers ({missing:,} parameters of their norms, gates and image-token embeddings "
        "are left out; text-only batches skip those layers, so activations are over-counted)"
    )


# model_type -> reader. Each one is checked against transformers in tests/models/test_hf_config.py.
FAMILIES: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    "cohere": _cohere,
    "falcon": _falcon,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "granite": _llama,
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "olmo2": _olmo2,
    "phi": _phi,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "stablelm": _stablelm,
    "starcoder2": _starcoder2,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))
# Language models that exist only inside a multimodal wrapper (no ...ForCausalLM of their
# own); checked against the wrapper built on the meta device in tests/models/test_hub.py.
TEXT_ONLY_IN_WRAPPERS: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    "mllama_text_model": _mllama_text,
    "qwen2_5_vl_text": _qwen2_vl_text,
    "qwen2_vl_text": _qwen2_vl_text,
}

# Alias keys a family reads instead of the canonical name; dropped from extra_config.
_ALIASES: dict[str, frozenset[str]] = {"falcon": frozenset({"n_embed", "n_head", "n_layer"})}


# The activation key and default of each family (transformers configuration_*.py).
_ACT_KEY: dict[str, tuple[str, str]] = {
    "falcon": ("activation", "gelu"),
    "gemma": ("hidden_act", "gelu_pytorch_tanh"),
    "gemma2": ("hidden_activation", "gelu_pytorch_tanh"),
    "gemma3_text": ("hidden_activation", "gelu_pytorch_tanh"),
    "phi": ("hidden_act", "gelu_new"),
    "starcoder2": ("hidden_act", "gelu_pytorch_tanh"),
}
# Residual / embedding dropout keys (phi: resid_pdrop, embd_pdrop; starcoder2:
# residual_dropout, embedding_dropout; falcon: hidden_dropout via dropout_add).
_RESID_DROPOUT_KEYS = ("resid_pdrop", "residual_dropout", "hidden_dropout")
_EMBD_DROPOUT_KEYS = ("embd_pdrop", "embedding_dropout")
# Families whose block Linears subclass nn.Linear (modeling_falcon.py `FalconLinear`), which
# transformers 5's bitsandbytes integration does not convert (`type(module) is nn.Linear`).
_LINEAR_SUBCLASS_FAMILIES = frozenset({"falcon"})
# Gemma-2 softcapping defaults (Gemma2Config): 50.0 on scores, 30.0 on logits.
_SOFTCAP_DEFAULTS: dict[str, tuple[float | None, float | None]] = {
    "gemma2": (50.0, 30.0),
}


def _features(model_type: str, data: dict[str, Any], r: _Reader) -> dict[str, Any]:
    """The memory-relevant features of a family: activation, dropouts, softcapping."""
    key, default = _ACT_KEY.get(model_type, ("hidden_act", "silu"))
    act = data.get(key) or data.get("hidden_act") or default
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # GemmaConfig turns the legacy "gelu" into the tanh form

    def prob(keys: tuple[str, ...]) -> float:
        for k in keys:
            v = data.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not 0.0 <= float(v) < 1.0:
                    raise r.error(k, f"must be a probability in [0, 1), got {v}")
                return float(v)
        return 0.0

    attn_cap, final_cap = _SOFTCAP_DEFAULTS.get(model_type, (None, None))
    if "attn_logit_softcapping" in data:
        attn_cap = data["attn_logit_softcapping"]
    if "final_logit_softcapping" in data:
        final_cap = data["final_logit_softcapping"]
    max_pos = data.get("max_position_embeddings")
    return {
        "hidden_act": act,
        "resid_dropout": prob(_RESID_DROPOUT_KEYS),
        "embd_dropout": prob(_EMBD_DROPOUT_KEYS),
        "attention_dropout": prob(("attention_dropout",)),
        "attn_logit_softcapping": attn_cap,
        "final_logit_softcapping": final_cap,
        "max_position_embeddings": max_pos if isinstance(max_pos, int) and max_pos > 0 else None,
        "bnb_quantizes_linears": model_type not in _LINEAR_SUBCLASS_FAMILIES,
    }


# Multimodal wrappers: the language model is planned from `text_config`; the vision tower
# and the projector are not counted (a note on the spec says so). Values: the defaults of the
# wrapper's text config class for the size keys a saved `text_config` may omit (hub configs
# written with `to_diff_dict` leave them out), and the wrapper's `tie_word_embeddings`
# default (transformers 5 ties the lm_head from the top-level key). From transformers 5.x:
# Gemma3TextConfig, Mistral3Config.sub_configs_defaults, MllamaTextConfig, Qwen2VLTextConfig.
_MULTIMODAL: dict[str, tuple[dict[str, Any], bool]] = {
    "gemma3": (
        {"model_type": "gemma3_text", "vocab_size": 262_208, "hidden_size": 2304,
         "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 256},
        True,
    ),
    "mistral3": (
        {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
         "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128},
        True,
    ),
    "mllama": (
        {"model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096,
         "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
         "num_key_value_heads": 8},
        False,
    ),
    "qwen2_vl": ({"model_type": "qwen2_vl_text"}, False),
    "qwen2_5_vl": ({"model_type": "qwen2_5_vl_text"}, False),
}
# Qwen2-VL / Qwen2.5-VL hub configs are flat: the text keys sit at the top level next to
# `vision_config` (Qwen2VLConfig.__post_init__ moves them into text_config).
_FLAT_MULTIMODAL = frozenset({"qwen2_vl", "qwen2_5_vl"})
# Top-level keys of a flat multimodal config that belong to the vision side.
_VISION_KEYS = frozenset(
    {"vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
     "vision_end_token_id", "vision_token_id", "text_config"}
)


def vision_note(model_type: str) -> str:
    return (
        f"'{model_type}' is multimodal: the language model (text_config) is planned; its "
        "vision tower and projector are NOT counted (add their weights if your training "
        "loads them, e.g. an ...ForConditionalGeneration model)"
    )


def _text_part(
    cfg: dict[str, Any], r: _Reader
) -> tuple[dict[str, Any], _Reader, str | None]:
    """Use a nested `text_config` when the top level is only a wrapper around it.

    Returns the text mapping, its reader, and a note when a vision/audio tower is left out.
    """
    model_type = cfg.get("model_type")
    text = cfg.get("text_config")
    tower = next((k for k in ("vision_config", "audio_config") if cfg.get(k) is not None), None)
    if model_type in _FLAT_MULTIMODAL and not isinstance(text, dict):
        defaults, tie = _MULTIMODAL[model_type]
        flat = {k: v for k, v in cfg.items() if k not in _VISION_KEYS}
        flat = {**defaults, **flat, "model_type": defaults["model_type"]}
        flat.setdefault("tie_word_embeddings", tie)
        return flat, r, vision_note(model_type) if tower else None
    if model_type in FAMILIES or not isinstance(text, dict):
        return cfg, r, None
    note = None
    if tower is not None:
        if tower == "audio_config" or not isinstance(model_type, str):
            raise r.error(
                tower,
                f"model_type '{model_type}' has an audio tower; vramcalc counts text models "
                "only (save its text_config as a config.json to estimate the language model "
                "alone)",
            )
        note = vision_note(model_type)
    known: tuple[dict[str, Any], bool | None] = _MULTIMODAL.get(str(model_type), ({}, None))
    text_defaults, text_tie = known
    merged = {**text_defaults, **text}
    if "tie_word_embeddings" in cfg:  # transformers 5 reads the top-level key
        merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    elif text_tie is not None and "tie_word_embeddings" not in text:
        merged["tie_word_embeddings"] = text_tie
    return merged, _Reader(merged, r.origin, prefix="text_config."), note


def spec_from_hf_config(cfg: dict[str, Any], origin: str, *, name: str | None = None) -> ModelSpec:
    """Turn a parsed config.json into a ModelSpec; errors name `origin` and the key.

    The spec's name is `name`, else the config's `_name_or_path`, else `origin`.
    """
    if not isinstance(cfg, dict):
        raise SpecError(f"{origin}: expected a JSON object at the top level")
    top = _Reader(cfg, origin)
    data, r, note = _text_part(cfg, top)
    model_type = data.get("model_type")
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if not isinstance(model_type, str) or not model_type:
        raise r.error(
            "model_type",
            f"missing; is this a model's config.json from the hub? (supported: {supported})",
        )
    if model_type in _ENCODER_DECODER or cfg.get("is_encoder_decoder") is True:
        raise r.error(
            "model_type",
            f"'{model_type}' is an encoder-decoder model; vramcalc estimates decoder-only "
            f"causal LMs (supported model_types: {supported})",
        )
    family = FAMILIES.get(model_type)
    if family is None and data is not cfg:
        family = TEXT_ONLY_IN_WRAPPERS.get(model_type)
    if family is None:
        raise r.error(
            "model_type",
            f"'{model_type}' is not supported (supported: {supported}); "
            "write a spec YAML for it and pass its path (see README 'Adding a model')",
        )
    fields = family(r)
    fields.update(_features(model_type, data, r))
    notes = [note] if note else []
    if model_type == "mllama_text_model":
        notes.append(_mllama_note(data, fields))
    drop = _SPEC_KEYS | _NOT_ARCHITECTURE | _ALIASES.get(model_type, frozenset())
    extra = {k: v for k, v in data.items() if k not in drop}
    if "head_dim" not in fields:
        fields["head_dim"] = None
    spec_name = name or cfg.get("_name_or_path") or data.get("_name_or_path") or origin
    mapping = {
        "name": str(spec_name),
        "source": origin,
        "model_type": model_type,
        **fields,
        "extra_config": extra,
    }
    if notes:
        mapping["notes"] = tuple(notes)
    return spec_from_mapping(mapping, origin)


def load_config_json(path: Path) -> ModelSpec:
    """Read a HF config.json; the spec is named by `_name_or_path`, else the folder's name."""
    from vramcalc.user_files import read_text

    text = read_text(path, str(path), SpecError)
    cfg = parse_json_text(text, str(path))
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object at the top level")
    name = cfg.get("_name_or_path") or path.resolve().parent.name or path.stem
    return spec_from_hf_config(cfg, str(path), name=str(name))
