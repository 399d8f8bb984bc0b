"""Importing a Hugging Face config.json: exact parameter counts and one-line errors.

The configs below are of models outside the catalog, written from their hub config.json
(sizes only, plus the keys that change the module layout). Each import must give exactly
the parameter count of the transformers model built from the same dict on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from meta_params import meta_param_count

from vramcalc.errors import SpecError
from vramcalc.models.hf_config import SUPPORTED_MODEL_TYPES, load_config_json, spec_from_hf_config
from vramcalc.models.resolve import resolve_model
from vramcalc.models.spec import catalog


def count(cfg: dict[str, Any]) -> int:
    return meta_param_count(json.dumps(cfg, sort_keys=True))


# hub id -> config.json (the keys that matter for the parameter count)
CONFIGS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000,
    },
    "Qwen/Qwen3-32B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "google/gemma-3-1b-it": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
    },
    "allenai/OLMo-2-1124-7B": {
        "model_type": "olmo2",
        "vocab_size": 100352,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-06,
    },
    "bigcode/starcoder2-3b": {
        "model_type": "starcoder2",
        "vocab_size": 49152,
        "hidden_size": 3072,
        "intermediate_size": 12288,
        "num_hidden_layers": 30,
        "num_attention_heads": 24,
        "num_key_value_heads": 2,
        "use_bias": True,
    },
    "ibm-granite/granite-3.1-2b-base": {
        "model_type": "granite",
        "vocab_size": 49155,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
        "logits_scaling": 8.0,
    },
    "stabilityai/stablelm-2-1_6b": {
        "model_type": "stablelm",
        "vocab_size": 100352,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "use_qkv_bias": True,
        "qk_layernorm": False,
        "use_parallel_residual": False,
        "partial_rotary_factor": 0.25,
        "tie_word_embeddings": False,
    },
    "stabilityai/stablelm-2-12b": {
        "model_type": "stablelm",
        "vocab_size": 100352,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "use_qkv_bias": False,
        "qk_layernorm": True,
        "use_parallel_residual": True,
        "partial_rotary_factor": 0.25,
        "tie_word_embeddings": False,
    },
    "CohereForAI/c4ai-command-r-v01": {
        "model_type": "cohere",
        "vocab_size": 256000,
        "hidden_size": 8192,
        "intermediate_size": 22528,
        "num_hidden_layers": 40,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "use_qk_norm": False,
        "logit_scale": 0.0625,
    },
    "CohereForAI/c4ai-command-r-plus": {
        "model_type": "cohere",
        "vocab_size": 256000,
        "hidden_size": 12288,
        "intermediate_size": 33792,
        "num_hidden_layers": 64,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "use_qk_norm": True,
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
    },
    "tiiuae/falcon-40b": {
        "model_type": "falcon",
        "vocab_size": 65024,
        "hidden_size": 8192,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_kv_heads": 8,
        "new_decoder_architecture": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
    },
    "tiiuae/falcon-rw-1b": {
        "model_type": "falcon",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "alibi": True,
        "multi_query": False,
        "parallel_attn": False,
        "bias": True,
        "new_decoder_architecture": False,
    },
    "microsoft/phi-1_5": {
        "model_type": "phi",
        "vocab_size": 51200,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "partial_rotary_factor": 0.5,
        "hidden_act": "gelu_new",
    },
    "microsoft/phi-4": {
        "model_type": "phi3",
        "vocab_size": 100352,
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "pad_token_id": 100349,
        "tie_word_embeddings": False,
    },
    "mistralai/Mixtral-8x22B-Instruct-v0.1": {
        "model_type": "mixtral",
        "vocab_size": 32768,
        "hidden_size": 6144,
        "intermediate_size": 16384,
        "num_hidden_layers": 56,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "mistralai/Mistral-Small-24B-Base-2501": {
        "model_type": "mistral",
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "google/codegemma-7b": {
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu",
    },
    "google/gemma-2-2b-jpn-it": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
    },
    "Qwen/Qwen2-1.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "llama-with-biases (synthetic)": {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "attention_bias": True,
        "mlp_bias": True,
    },
}


@pytest.mark.parametrize("hub_id", sorted(CONFIGS))
def test_import_matches_transformers(hub_id: str) -> None:
    cfg = CONFIGS[hub_id]
    spec = spec_from_hf_config(cfg, "config.json", name=hub_id)
    assert spec.model_type == cfg["model_type"]
    assert spec.num_params() == count(cfg)
    # extra_config keeps what the spec does not model, so the spec rebuilds the same model
    assert count(spec.to_hf_config()) == spec.num_params()


def test_every_supported_type_is_tested() -> None:
    tested = {cfg["model_type"] for cfg in CONFIGS.values()}
    assert tested == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_defaults_match_transformers(model_type: str) -> None:
    """Only the required keys: kv heads, head_dim, tying and experts take class defaults."""
    cfg = {
        "model_type": model_type,
        "vocab_size": 32064,  # above phi3's default pad_token_id
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
    }
    assert spec_from_hf_config(cfg, "config.json").num_params() == count(cfg)


@pytest.mark.parametrize("spec", catalog(), ids=lambda s: s.name)
def test_catalog_round_trip(spec: Any) -> None:
    imported = spec_from_hf_config(spec.to_hf_config(), f"{spec.name}.json")
    assert imported.num_params() == spec.num_params()
    assert imported.block_linears() == spec.block_linears()
    assert imported.unquantized_params() == spec.unquantized_params()
    # the memory-relevant features the importer sets per family match the catalog's
    assert imported.bnb_quantizes_linears == spec.bnb_quantizes_linears
    assert imported.hidden_act == spec.hidden_act


def test_falcon_legacy_key_names() -> None:
    canonical = CONFIGS["tiiuae/falcon-rw-1b"]
    legacy = dict(canonical)
    legacy["n_embed"] = legacy.pop("hidden_size")
    legacy["n_head"] = legacy.pop("num_attention_heads")
    legacy["n_layer"] = legacy.pop("num_hidden_layers")
    spec = spec_from_hf_config(legacy, "config.json")
    assert spec.num_params() == count(canonical)
    assert not {"n_embed", "n_head", "n_layer"} & set(spec.extra_config)


def test_nested_text_config() -> None:
    wrapper = {"model_type": "some_wrapper", "text_config": CONFIGS["Qwen/Qwen2-1.5B"]}
    spec = spec_from_hf_config(wrapper, "config.json")
    assert spec.model_type == "qwen2"
    assert spec.num_params() == count(CONFIGS["Qwen/Qwen2-1.5B"])


def test_pre_quantized_config_imports() -> None:
    cfg = {**CONFIGS["Qwen/Qwen2-1.5B"], "quantization_config": {"load_in_4bit": True}}
    spec = spec_from_hf_config(cfg, "config.json")
    assert "quantization_config" not in spec.extra_config
    assert spec.num_params() == count(CONFIGS["Qwen/Qwen2-1.5B"])


# ---- files and names -------------------------------------------------------------------


def write_config(folder: Path, cfg: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


def test_name_from_name_or_path(tmp_path: Path) -> None:
    cfg = {"_name_or_path": "HuggingFaceTB/SmolLM2-135M", **CONFIGS["HuggingFaceTB/SmolLM2-135M"]}
    spec = load_config_json(write_config(tmp_path / "smol", cfg))
    assert spec.name == "HuggingFaceTB/SmolLM2-135M"
    assert spec.source == str(tmp_path / "smol" / "config.json")
    assert "_name_or_path" not in spec.extra_config


def test_name_from_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "my-finetune", CONFIGS["HuggingFaceTB/SmolLM2-135M"])
    assert load_config_json(path).name == "my-finetune"
    # resolve_model takes the file or its folder
    assert resolve_model(str(path)).name == "my-finetune"
    assert resolve_model(str(path.parent)).num_params() == 134515008


# ---- errors: one line, "<file>: key '<key>': ..." ---------------------------------------


def import_error(tmp_path: Path, cfg: Any) -> str:
    path = write_config(tmp_path / "m", cfg)
    with pytest.raises(SpecError) as info:
        load_config_json(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    return msg.removeprefix(f"{path}: ")


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n', encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_config_json(path)
    assert str(info.value).startswith(f"{path}: malformed JSON (line 3")


def test_top_level_not_an_object(tmp_path: Path) -> None:
    assert "expected a JSON object" in import_error(tmp_path, [1, 2])


def test_missing_key(tmp_path: Path) -> None:
    cfg = dict(CONFIGS["HuggingFaceTB/SmolLM2-135M"])
    del cfg["hidden_size"]
    msg = import_error(tmp_path, cfg)
    assert msg.startswith("key 'hidden_size': required key missing")


def test_missing_key_names_legacy_spelling(tmp_path: Path) -> None:
    cfg = dict(CONFIGS["tiiuae/falcon-rw-1b"])
    del cfg["num_attention_heads"]
    msg = import_error(tmp_path, cfg)
    assert msg.startswith("key 'num_attention_heads': required key missing (also read as 'n_head')")


def test_missing_model_type(tmp_path: Path) -> None:
    msg = import_error(tmp_path, {"r": 16, "lora_alpha": 32})
    assert msg.startswith("key 'model_type': missing")
    assert "llama" in msg


def test_unsupported_model_type(tmp_path: Path) -> None:
    msg = import_error(tmp_path, {**CONFIGS["HuggingFaceTB/SmolLM2-135M"], "model_type": "gpt2"})
    assert msg.startswith("key 'model_type': 'gpt2' is not supported (supported: cohere, falcon,")
    assert "spec YAML" in msg


def test_encoder_decoder(tmp_path: Path) -> None:
    cfg = {"model_type": "t5", "d_model": 512, "is_encoder_decoder": True}
    msg = import_error(tmp_path, cfg)
    assert msg.startswith("key 'model_type': 't5' is an encoder-decoder model")
    assert "supported model_types: cohere" in msg


@pytest.mark.parametrize("value", ["4096", 4096.0, True, -1, 0])
def test_bad_size_value(tmp_path: Path, value: Any) -> None:
    msg = import_error(tmp_path, {**CONFIGS["HuggingFaceTB/SmolLM2-135M"], "hidden_size": value})
    assert msg.startswith("key 'hidden_size': ")
    assert "integer" in msg or "at least 1" in msg


def test_bad_bool_value(tmp_path: Path) -> None:
    cfg = {**CONFIGS["HuggingFaceTB/SmolLM2-135M"], "tie_word_embeddings": "yes"}
    msg = import_error(tmp_path, cfg)
    assert msg.startswith("key 'tie_word_embeddings': expected true or false")


def test_inconsistent_heads(tmp_path: Path) -> None:
    cfg = {**CONFIGS["HuggingFaceTB/SmolLM2-135M"], "num_key_value_heads": 4}
    assert "is not a multiple of num_key_value_heads 4" in import_error(tmp_path, cfg)


def test_moe_with_dense_layers(tmp_path: Path) -> None:
    cfg = {**CONFIGS["Qwen/Qwen1.5-MoE-A2.7B"], "mlp_only_layers": [0, 1]}
    assert import_error(tmp_path, cfg).startswith("key 'mlp_only_layers': dense layers mixed")
    cfg = {**CONFIGS["Qwen/Qwen1.5-MoE-A2.7B"], "decoder_sparse_step": 2}
    assert import_error(tmp_path, cfg).startswith("key 'decoder_sparse_step': 2 mixes dense")


def test_phi_qk_layernorm(tmp_path: Path) -> None:
    cfg = {**CONFIGS["microsoft/phi-1_5"], "qk_layernorm": True}
    assert import_error(tmp_path, cfg).startswith("key 'qk_layernorm': phi with q/k LayerNorms")


def test_multimodal_wrapper_plans_the_text_model(tmp_path: Path) -> None:
    # The language model from text_config (absent keys: Gemma3TextConfig's defaults); the
    # vision tower is not counted and a note says so (counts: tests/models/test_hub.py).
    cfg = {
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560},
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    spec = spec_from_hf_config(cfg, "x")
    assert (spec.model_type, spec.hidden_size, spec.vocab_size) == ("gemma3_text", 2560, 262208)
    assert spec.notes == ("'gemma3' is multimodal: the language model (text_config) is "
                          "planned; its vision tower and projector are NOT counted (add their "
                          "weights if your training loads them, e.g. an "
                          "...ForConditionalGeneration model)",)


def test_audio_wrapper_is_refused(tmp_path: Path) -> None:
    cfg = {"model_type": "some_audio", "text_config": CONFIGS["Qwen/Qwen2-1.5B"],
           "audio_config": {"model_type": "whisper"}}
    msg = import_error(tmp_path, cfg)
    assert msg.startswith("key 'audio_config': model_type 'some_audio' has an audio tower")


def test_nested_error_names_nested_key(tmp_path: Path) -> None:
    text = dict(CONFIGS["Qwen/Qwen2-1.5B"])
    del text["vocab_size"]
    msg = import_error(tmp_path, {"model_type": "some_wrapper", "text_config": text})
    assert msg.startswith("key 'text_config.vocab_size': required key missing")
