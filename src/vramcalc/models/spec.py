"""Model-architecture specs: what the estimator needs to know about a decoder-only model.

A spec is data, checked by a schema. Its size keys are named as in the model's HF
`config.json`, so a spec diffs against its source. The module layout (separate or fused
q/k/v, gated / fused-gated / plain MLP, norms, biases) says which `nn.Linear` modules and
which small parameters a transformers model of that family builds; `num_params()` must
equal `sum(p.numel())` of that model built on the meta device (tested for every spec).

This module never imports torch, transformers, rich or typer.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from vramcalc.errors import SpecError, UnknownModelError
from vramcalc.models.catalog_index import FolderIndex, load_yaml, package_folder

AttentionLayout = Literal["separate", "fused_qkv"]
MlpLayout = Literal["gated", "fused_gated", "plain"]
NormKind = Literal["rmsnorm", "layernorm"]
# q_norm / k_norm weights: "head" is one weight of head_dim shared by every head (Qwen3,
# Gemma-3); "all_heads" covers the whole projection, num_heads * head_dim for q and
# num_key_value_heads * head_dim for k (OLMo-2, Cohere, StableLM's per-head LayerNorms).
QkNormWidth = Literal["head", "all_heads"]

# Activation functions of the MLP (transformers activations.py ACT2FN) and how many
# intermediate-wide tensors each keeps for backward (counted with saved_tensors_hooks on
# CPU: tests/memory/test_saved_activations.py). silu/gelu/relu and GELUTanh are single torch ops
# that keep their input (relu its output); NewGELUActivation and FastGELUActivation are
# Python formulas whose products and tanh keep several intermediates.
ACTIVATION_SAVED_TENSORS: dict[str, int] = {
    "silu": 1,
    "swish": 1,
    "gelu": 1,
    "gelu_pytorch_tanh": 1,
    "relu": 1,
    "gelu_new": 4,
    "gelu_fast": 5,
}
Activation = Literal["silu", "swish", "gelu", "gelu_pytorch_tanh", "relu", "gelu_new", "gelu_fast"]

# Canonical role -> default HF module name. A spec overrides names in `module_names`
# (phi-2 calls o_proj "dense"; falcon calls qkv "query_key_value").
DEFAULT_MODULE_NAMES: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "qkv": "qkv_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "gate_up": "gate_up_proj",
    "down": "down_proj",
    "fc1": "fc1",
    "fc2": "fc2",
}


class LinearShape(NamedTuple):
    """One `nn.Linear` of a decoder block, as transformers builds it."""

    name: str  # HF module name, e.g. "q_proj": what LoRA `target_modules` matches
    role: str  # canonical role (q, k, v, qkv, o, gate, up, gate_up, down, fc1, fc2)
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


MAX_VOCAB = 2**22  # 16 x Gemma 3's 262144
MAX_WIDTH = 2**20  # hidden, intermediate, head and expert sizes: 19 x Llama 3.1 405B's 53248
MAX_LAYERS = 2**12  # 32 x the deepest (126-128 layers)
MAX_HEADS = 2**12  # 32 x the most attention heads (128)
MAX_EXPERTS = 2**13  # 21 x the most routed experts (384)


# Families whose RMSNorm scales in fp32, then casts to the input dtype (transformers 5.17
# and 5.25 alike): modeling_gemma.py GemmaRMSNorm.forward `(self._norm(x.float()) * (1.0 +
# self.weight.float())).type_as(x)`, the same in modeling_gemma2.py and modeling_gemma3.py;
# modeling_olmo2.py Olmo2RMSNorm.forward `(self.weight * hidden_states).to(input_dtype)`.
# LlamaRMSNorm and its copies cast first: `self.weight * hidden_states.to(input_dtype)`.
FP32_SCALED_NORM_FAMILIES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "olmo2"})

# Families whose embedding module scales its output: transformers 5.17
# GemmaTextScaledWordEmbedding (and Gemma2's, Gemma3's) `super().forward(input_ids) *
# self.embed_scale`, the lookup freed once scaled (recorded, run 32 tr-il03: `+72 +72 -72`
# MiB at modeling_gemma2.py:349). Read by the training and the inference programs
# (memory/program/step.py, infer.py): defined here so that a training estimate does not
# import program.infer.
SCALED_EMBEDDING_FAMILIES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


class ModelSpec(BaseModel):
    """Architecture of one decoder-only causal LM (keys as in HF config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    source: str | None = None
    # What importing the model assumed that the user should know (e.g. a multimodal model's
    # vision tower not counted); commands print them, the Python API adds them to the result.
    notes: tuple[str, ...] = ()
    # HF `model_type`; with `extra_config` it rebuilds the transformers config (tests, calibrate).
    model_type: str = Field(min_length=1)

    # Upper bounds: 16 x (or more than) the largest of any released decoder-only LM, so that
    # a typo'd config (a 10**12 vocabulary) is an error, not a plan of "4096000 B params".
    # Largest known: vocab 262144 (Gemma 3), hidden 16384 and intermediate 53248
    # (Llama 3.1 405B, model_specs/llama-3.1-405b.yaml), 128 layers, 128 heads, 384 experts.
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    hidden_size: int = Field(gt=0, le=MAX_WIDTH)
    intermediate_size: int = Field(gt=0, le=MAX_WIDTH)
    num_hidden_layers: int = Field(gt=0, le=MAX_LAYERS)
    num_attention_heads: int = Field(gt=0, le=MAX_HEADS)
    num_key_value_heads: int | None = Field(default=None, gt=0, le=MAX_HEADS)  # None: MHA
    head_dim: int | None = Field(default=None, gt=0, le=MAX_WIDTH)  # None: hidden / heads
    tie_word_embeddings: bool = False

    attention_layout: AttentionLayout = "separate"
    mlp_layout: MlpLayout = "gated"
    qkv_bias: bool = False  # bias on q/k/v (Qwen2, phi-2)
    o_bias: bool = False  # bias on the attention output projection (phi-2)
    mlp_bias: bool = False  # bias on the MLP projections (phi-2)
    lm_head_bias: bool = False  # phi-2
    norm: NormKind = "rmsnorm"  # layernorm carries a bias as well as a weight
    norms_per_layer: int = Field(default=2, ge=1, le=4)  # 1 parallel blocks, 4 Gemma-2
    qk_norm: bool = False  # per-head q_norm / k_norm over head_dim (Qwen3)
    qk_norm_width: QkNormWidth = "head"  # "all_heads": q/k norms over the whole projection

    # Mixture of experts (transformers 5 stores experts as fused 3D parameters, not nn.Linear).
    num_local_experts: int = Field(default=0, ge=0, le=MAX_EXPERTS)
    num_experts_per_tok: int = Field(default=0, ge=0, le=MAX_EXPERTS)
    moe_intermediate_size: int | None = Field(default=None, gt=0, le=MAX_WIDTH)  # None: dense
    shared_expert_intermediate_size: int = Field(default=0, ge=0, le=MAX_WIDTH)

    # Memory-relevant features beyond the shapes, set by the config importer per family
    # (hf_config.py) from the keys each transformers family reads, with its defaults.
    hidden_act: Activation = "silu"
    resid_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # after attention and MLP
    embd_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # on the input embeddings
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # on the probabilities
    attn_logit_softcapping: float | None = None  # Gemma-2: tanh(scores / cap) * cap
    final_logit_softcapping: float | None = None  # Gemma-2: tanh(logits / cap) * cap
    max_position_embeddings: PositiveInt | None = None
    # False when the block Linears are a subclass of nn.Linear (FalconLinear): transformers
    # 5's bitsandbytes integration converts only `type(module) is nn.Linear`
    # (integrations/bitsandbytes.py `replace_with_bnb_linear`), so a "quantized" load leaves
    # them in 16 bit and prepare_model_for_kbit_training casts them to fp32.
    bnb_quantizes_linears: bool = True

    module_names: dict[str, str] = {}
    extra_config: dict[str, Any] = {}  # other HF config keys needed to rebuild the model
    expected_params: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        where = f"spec '{self.name}'"
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{where}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.kv_heads}"
            )
        if self.num_local_experts and not self.num_experts_per_tok:
            raise ValueError(f"{where}: num_local_experts set but num_experts_per_tok is 0")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"{where}: num_experts_per_tok {self.num_experts_per_tok} exceeds "
                f"num_local_experts {self.num_local_experts}"
            )
        unknown = set(self.module_names) - set(DEFAULT_MODULE_NAMES)
        if unknown:
            raise ValueError(
                f"{where}: module_names has unknown roles {sorted(unknown)}; "
                f"valid: {sorted(DEFAULT_MODULE_NAMES)}"
            )
        return self

    # ---- derived sizes -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def norm_scales_in_fp32(self) -> bool:
        """The RMSNorm multiplies by its weight in fp32 and casts afterwards (see
        FP32_SCALED_NORM_FAMILIES), so a trained weight keeps the fp32 normalized tensor."""
        return self.norm == "rmsnorm" and self.model_type in FP32_SCALED_NORM_FAMILIES

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def module_name(self, role: str) -> str:
        return self.module_names.get(role, DEFAULT_MODULE_NAMES[role])

    # ---- modules ---------------------------------------------------------------------
    def block_linears(self) -> list[LinearShape]:
        """The `nn.Linear` modules of one decoder block (what bitsandbytes quantizes).

        MoE experts are fused 3D parameters in transformers 5 and are not listed here;
        see `expert_params_per_layer`.
        """
        h, i = self.hidden_size, self.intermediate_size
        out: list[LinearShape] = []

        def add(role: str, n_in: int, n_out: int, bias: bool) -> None:
            out.append(LinearShape(self.module_name(role), role, n_in, n_out, bias))

        if self.attention_layout == "separate":
            add("q", h, self.q_size, self.qkv_bias)
            add("k", h, self.kv_size, self.qkv_bias)
            add("v", h, self.kv_size, self.qkv_bias)
        else:
            add("qkv", h, self.q_size + 2 * self.kv_size, self.qkv_bias)
        add("o", self.q_size, h, self.o_bias)
        if self.is_moe:
            if self.shared_expert_intermediate_size:
                s = self.shared_expert_intermediate_size
                add("gate", h, s, self.mlp_bias)
                add("up", h, s, self.mlp_bias)
                add("down", s, h, self.mlp_bias)
        elif self.mlp_layout == "gated":
            add("gate", h, i, self.mlp_bias)
            add("up", h, i, self.mlp_bias)
            add("down", i, h, self.mlp_bias)
        elif self.mlp_layout == "fused_gated":
            add("gate_up", h, 2 * i, self.mlp_bias)
            add("down", i, h, self.mlp_bias)
        else:
            add("fc1", h, i, self.mlp_bias)
            add("fc2", i, h, self.mlp_bias)
        return out

    def linear_names(self) -> list[str]:
        return [lin.name for lin in self.block_linears()]

    @property
    def expert_intermediate_size(self) -> int:
        """One MoE expert's MLP width (`moe_intermediate_size`, else `intermediate_size`)."""
        return self.moe_intermediate_size or self.intermediate_size

    def expert_params_per_layer(self) -> int:
        """Fused expert weights (gate_up + down for every expert) plus the router."""
        if not self.is_moe:
            return 0
        h = self.hidden_size
        e_i = self.expert_intermediate_size
        experts = self.num_local_experts * (2 * e_i * h + e_i * h)
        router = self.num_local_experts * h
        shared_gate = h if self.shared_expert_intermediate_size else 0  # Qwen2-MoE
        return experts + router + shared_gate

    def norm_numel(self) -> int:
        """Parameters of one norm over hidden_size (LayerNorm has weight and bias)."""
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def layer_small_params(self) -> int:
        """Per-layer parameters that are never quantized: norms, qk-norms, linear biases."""
        biases = sum(lin.out_features for lin in self.block_linears() if lin.bias)
        qk = 0
        if self.qk_norm:
            qk = 2 * self.head_size if self.qk_norm_width == "head" else self.q_size + self.kv_size
        return self.norms_per_layer * self.norm_numel() + qk + biases

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """The untied output projection (0 when tied to the embeddings), with its bias."""
        weight = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return weight + (self.vocab_size if self.lm_head_bias else 0)

    def quantizable_params(self) -> int:
        """Weights of the block Linears (bitsandbytes replaces exactly these)."""
        per_layer = sum(lin.weight_numel for lin in self.block_linears())
        return self.num_hidden_layers * per_layer

    def unquantized_params(self) -> int:
        """Everything that stays in the load dtype: embeddings, lm_head, norms, biases, experts."""
        per_layer = self.layer_small_params() + self.expert_params_per_layer()
        return (
            self.embedding_params()
            + self.lm_head_params()
            + self.norm_numel()  # final norm
            + self.num_hidden_layers * per_layer
        )

    def num_params(self) -> int:
        """Total parameter count, tied weights counted once (as `model.parameters()` does)."""
        return self.quantizable_params() + self.unquantized_params()

    def to_hf_config(self) -> dict[str, Any]:
        """A config dict that `transformers.AutoConfig.for_model(**d)` turns into this model."""
        cfg: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.head_dim is not None:
            cfg["head_dim"] = self.head_dim
        cfg.update(self.extra_config)
        return cfg


# ---- loading ---------------------------------------------------------------------------


def _format_validation_error(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/memory-model.md for the spec keys)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    return f"{path}: key '{loc}': {msg}"


def spec_from_mapping(data: Any, origin: str) -> ModelSpec:
    """Validate a parsed YAML/JSON mapping; errors name `origin` and the key."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping of keys to values at the top level")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(origin, err)) from None


def _parse_yaml(text: str, origin: str) -> Any:
    """A spec file's YAML (a catalog file the index holds is not parsed: `_shipped_yaml`)."""
    import yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{origin}: malformed YAML{where}") from None


def load_spec_file(path: Path) -> ModelSpec:
    """Read one spec YAML file."""
    from vramcalc.user_files import read_text

    text = read_text(path, str(path), SpecError)
    return spec_from_mapping(_parse_yaml(text, str(path)), str(path))


def _catalog_root() -> Any:
    """The installed `vramcalc.model_specs` package, or the repo's folder in a source run."""
    try:
        return package_folder("vramcalc.model_specs")
    except ModuleNotFoundError:  # PYTHONPATH=src without an install (GPU machine runs)
        return Path(__file__).resolve().parents[3] / "model_specs"


@functools.cache
def _index() -> FolderIndex:
    """The catalog files parsed ahead (catalog_index.py: committed, rewritten in a wheel)."""
    return FolderIndex(_catalog_root())


def _shipped_yaml(name: str, text: str, origin: str) -> Any:
    """A catalog file's mapping: from the index where it holds this text, else parsed."""
    found, data = _index().parsed(name, text)
    return data if found else _parse_yaml(text, origin)


def _catalog_mappings() -> Iterator[tuple[str, Any]]:
    """(origin, parsed mapping) of every catalog file, sorted by file name."""
    root = _catalog_root()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            origin = f"model_specs/{entry.name}"
            yield origin, _shipped_yaml(entry.name, entry.read_text(encoding="utf-8"), origin)


def build_index(specs: list[tuple[str, ModelSpec]]) -> dict[str, ModelSpec]:
    """Case-insensitive index over names and aliases; a key used twice is an error."""
    index: dict[str, ModelSpec] = {}
    owner: dict[str, str] = {}
    for origin, spec in specs:
        for key in (spec.name, *spec.aliases):
            k = key.lower()
            if k in index:
                raise SpecError(
                    f"{origin}: key 'name/aliases': '{key}' is already used by {owner[k]}"
                )
            index[k] = spec
            owner[k] = origin
    return index


@functools.cache
def _catalog() -> tuple[tuple[ModelSpec, ...], dict[str, ModelSpec]]:
    loaded = [(origin, spec_from_mapping(data, origin)) for origin, data in _catalog_mappings()]
    return tuple(s for _, s in loaded), build_index(loaded)


def catalog() -> tuple[ModelSpec, ...]:
    """Every built-in spec, sorted by file name."""
    return _catalog()[0]


# A catalog file's stem as `get_spec` may try it directly (no separators, no leading dot).
_FILE_STEM = re.compile(r"[a-z0-9][a-z0-9._-]*")


@functools.cache
def _named_file_spec(key: str) -> ModelSpec | None:
    """The spec in model_specs/KEY.yaml when that file's `name` is KEY: one file read
    instead of the whole catalog (a cold `vramcalc plan -m llama-7b`). None when no file
    has that stem or it names another model; the full index then decides. Names and
    aliases are unique across the catalog (tests/models/test_specs.py), so both ways agree."""
    if not _FILE_STEM.fullmatch(key):
        return None
    name = f"{key}.yaml"
    entry = _catalog_root() / name
    if not entry.is_file():
        return None
    origin = f"model_specs/{name}"
    data = _shipped_yaml(name, entry.read_text(encoding="utf-8"), origin)
    spec = spec_from_mapping(data, origin)
    return spec if spec.name.lower() == key else None


def get_spec(name: str) -> ModelSpec:
    """Look a catalog name or alias up, case-insensitively; suggest close names on a miss."""
    if _catalog.cache_info().currsize == 0:  # catalog not loaded yet: try KEY.yaml alone
        direct = _named_file_spec(name.lower())
        if direct is not None:
            return direct
    specs, index = _catalog()
    found = index.get(name.lower())
    if found is not None:
        return found
    close = difflib.get_close_matches(name.lower(), list(index), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'{hint} (see 'vramcalc models', or pass a path to a config.json)"
    )


def parse_json_text(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{origin}: malformed JSON (line {err.lineno}: {err.msg})") from None


def depth_cut(spec: ModelSpec, layers: int) -> ModelSpec:
    """`spec` with its first `layers` decoder layers only: every shape the same.

    The name gets a suffix (`llama-3.1-8b@4L`) and no aliases, so a cut never shadows the
    full model. Per-layer lists in `extra_config` of length num_hidden_layers (e.g.
    `layer_types`) are cut too. `expected_params` is recomputed when the full spec's
    formula matched it exactly, else dropped (None): it stays a measured number.
    """
    if layers < 1:
        raise SpecError(f"spec '{spec.name}': a depth cut needs at least 1 layer, got {layers}")
    if layers == spec.num_hidden_layers:
        return spec
    if layers > spec.num_hidden_layers:
        raise SpecError(
            f"spec '{spec.name}': cannot cut {spec.num_hidden_layers} layers to {layers}"
        )
    full = spec.num_hidden_layers
    extra = {
        k: (v[:layers] if isinstance(v, list) and len(v) == full else v)
        for k, v in spec.extra_config.items()
    }
    if "num_hidden_layers" in extra:
        extra["num_hidden_layers"] = layers
    data = spec.model_dump()
    data.update(
        name=f"{spec.name}@{layers}L",
        aliases=(),
        num_hidden_layers=layers,
        extra_config=extra,
        expected_params=None,
    )
    cut = ModelSpec.model_validate(data)
    if spec.expected_params is not None and spec.expected_params == spec.num_params():
        cut = cut.model_copy(update={"expected_params": cut.num_params()})
    return cut


def layer_windows(spec: ModelSpec) -> list[int | None]:
    """The sliding window of each layer's cache, None for full attention.

    transformers cache_utils.get_layer_types_and_kwargs: `layer_types` of the config, else
    every layer with a `sliding_window` is "sliding_attention". Gemma-2's config
    (configuration_gemma2.py) sets layer_types: even layers sliding, odd layers full.
    """
    window = spec.extra_config.get("sliding_window")
    if spec.extra_config.get("use_sliding_window") is False:  # Qwen2: the window is unused
        window = None
    layers = spec.num_hidden_layers
    types = spec.extra_config.get("layer_types")
    if types is None and spec.model_type == "gemma2":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if types is not None:
        return [int(window) if t == "sliding_attention" and window else None
                for t in list(types)[:layers]]
    return [int(window) if window else None] * layers


def sliding_past_window(spec: ModelSpec, kv_length: int) -> list[bool]:
    """For each layer, whether it gets a materialised sliding-window mask under sdpa at
    `kv_length` keys. masking_utils `_ignore_causal_mask_sdpa` lets sdpa use `is_causal`
    instead of a mask, except for a sliding window when kv_length >= the window: then
    `create_sliding_window_causal_mask` builds one (batch, 1, queries, keys) bool mask,
    shared by every sliding layer."""
    windows = layer_windows(spec)
    return [k < len(windows) and windows[k] is not None and kv_length >= (windows[k] or 0)
            for k in range(spec.num_hidden_layers)]


def sdpa_window_masks(spec: ModelSpec, kv_length: int) -> int:
    """How many layers get a materialised sliding-window mask under sdpa at `kv_length`
    keys (`sliding_past_window`); 0 when no layer slides that far."""
    return sum(sliding_past_window(spec, kv_length))
