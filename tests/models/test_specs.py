"""The model catalog and the spec schema.

Every YAML in model_specs/ loads, and its `num_params()` equals `expected_params` and the
parameter count of the transformers model built from `to_hf_config()` on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meta_params import meta_param_count

from vramcalc.errors import SpecError, UnknownModelError
from vramcalc.models.resolve import resolve_model
from vramcalc.models.spec import (
    ModelSpec,
    build_index,
    catalog,
    get_spec,
    load_spec_file,
    spec_from_mapping,
)

SPEC_DIR = Path(__file__).resolve().parents[2] / "model_specs"
SPEC_FILES = sorted(SPEC_DIR.glob("*.yaml"))

# Published parameter counts (model cards / safetensors metadata), as a check on the
# config values copied into the YAML files.
PUBLISHED = {
    "llama-2-7b": 6738415616,
    "llama-3.1-8b": 8030261248,
    "mistral-7b": 7241732096,
    "phi-2": 2779683840,
    "gemma-7b": 8537680896,
    "falcon-7b": 6921720704,
    "qwen2.5-7b": 7615616512,
    "mixtral-8x7b": 46702792704,
}


def tiny(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "tiny",
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    data.update(overrides)
    return data


# ---- the catalog ---------------------------------------------------------------------


def test_catalog_size_and_required_models() -> None:
    names = {s.name for s in catalog()}
    required = {
        "llama-7b",
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3-8b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "mistral-7b",
        "mistral-7b-v0.3",
        "mixtral-8x7b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-7b",
        "qwen2.5-14b",
        "qwen2.5-32b",
        "qwen2.5-72b",
        "gemma-2b",
        "gemma-7b",
        "gemma-2-2b",
        "gemma-2-9b",
        "gemma-2-27b",
        "phi-2",
        "phi-3-mini",
        "phi-3-medium",
        "falcon-7b",
    }
    assert required <= names, required - names
    assert len(names) >= 32
    assert len(catalog()) == len(SPEC_FILES)


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.name == path.stem
    assert spec.source and spec.source.startswith("https://huggingface.co/")
    assert spec.source.endswith("/config.json")
    assert spec.aliases, "aliases: the hub ids of the base and instruct models"
    assert spec.expected_params is not None
    assert spec.num_params() == spec.expected_params
    assert spec.quantizable_params() + spec.unquantized_params() == spec.num_params()
    assert meta_param_count(json.dumps(spec.to_hf_config())) == spec.expected_params


@pytest.mark.parametrize("name, published", sorted(PUBLISHED.items()))
def test_published_sizes(name: str, published: int) -> None:
    assert get_spec(name).num_params() == published


def test_names_and_aliases_are_unique() -> None:
    keys = [k.lower() for s in catalog() for k in (s.name, *s.aliases)]
    assert len(keys) == len(set(keys))


def test_lookup_is_case_insensitive() -> None:
    assert get_spec("LLaMA-3.1-8B").name == "llama-3.1-8b"
    assert get_spec("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert get_spec("META-LLAMA/LLAMA-3.1-8B-INSTRUCT").name == "llama-3.1-8b"
    assert get_spec("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert resolve_model("mistralai/Mistral-7B-v0.1").name == "mistral-7b"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_spec("llama-3.1-7b")
    msg = str(info.value)
    assert "unknown model 'llama-3.1-7b'" in msg
    assert "did you mean" in msg and "'llama-3.1-8b'" in msg


def test_tied_llama_3_2() -> None:
    assert get_spec("llama-3.2-1b").tie_word_embeddings
    assert get_spec("llama-3.2-3b").tie_word_embeddings
    assert get_spec("llama-3.2-1b").lm_head_params() == 0


def test_module_names_follow_transformers() -> None:
    phi3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert get_spec("phi-3-mini").linear_names() == phi3
    assert get_spec("phi-2").linear_names() == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert get_spec("falcon-7b").linear_names() == [
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
    ]
    # transformers 5 keeps Mixtral experts as fused 3D parameters, not nn.Linear
    assert get_spec("mixtral-8x7b").linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_mixtral_experts_and_router() -> None:
    spec = get_spec("mixtral-8x7b")
    h, i, e = 4096, 14336, 8
    assert spec.expert_params_per_layer() == e * 3 * h * i + e * h  # gate_up + down + router


def test_qk_norm_width() -> None:
    head = ModelSpec.model_validate(tiny(num_key_value_heads=2, qk_norm=True))
    full = ModelSpec.model_validate(
        tiny(num_key_value_heads=2, qk_norm=True, qk_norm_width="all_heads")
    )
    assert head.layer_small_params() - 2 * 64 == 2 * 16
    assert full.layer_small_params() - 2 * 64 == 64 + 32


# ---- bad specs ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    return msg


GOOD_YAML = """\
name: tiny
model_type: llama
vocab_size: 100
hidden_size: 64
intermediate_size: 128
num_hidden_layers: 2
num_attention_heads: 4
"""


def test_good_yaml_loads(tmp_path: Path) -> None:
    spec = load_spec_file(write(tmp_path, GOOD_YAML))
    assert spec.name == "tiny" and spec.kv_heads == 4 and spec.head_size == 16


def test_malformed_yaml(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, GOOD_YAML + "aliases: [a, b\n"))
    assert "malformed YAML (line" in msg


def test_missing_key(tmp_path: Path) -> None:
    text = GOOD_YAML.replace("hidden_size: 64\n", "")
    msg = load_error(write(tmp_path, text))
    assert "key 'hidden_size': required key is missing" in msg


@pytest.mark.parametrize("value", ["0", "-4096"])
def test_size_must_be_positive(tmp_path: Path, value: str) -> None:
    msg = load_error(write(tmp_path, GOOD_YAML.replace("hidden_size: 64", f"hidden_size: {value}")))
    assert "key 'hidden_size'" in msg and "greater than 0" in msg


def test_heads_must_divide_hidden(tmp_path: Path) -> None:
    text = GOOD_YAML.replace("num_attention_heads: 4", "num_attention_heads: 5")
    msg = load_error(write(tmp_path, text))
    assert "not divisible by num_attention_heads 5" in msg and "head_dim" in msg
    # an explicit head_dim makes it valid (Gemma, Mistral-Nemo)
    assert load_spec_file(write(tmp_path, text + "head_dim: 16\n", "ok.yaml")).q_size == 80


def test_kv_heads_must_divide_heads(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, GOOD_YAML + "num_key_value_heads: 3\n"))
    assert "not a multiple of num_key_value_heads 3" in msg


def test_unknown_key(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, GOOD_YAML + "num_layers: 2\n"))
    assert "key 'num_layers': unknown key" in msg


def test_unknown_module_role(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, GOOD_YAML + "module_names: {attn_out: dense}\n"))
    assert "module_names has unknown roles ['attn_out']" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping" in msg


def test_duplicate_names_across_specs() -> None:
    a = spec_from_mapping(tiny(name="a", aliases=["org/Model"]), "a.yaml")
    b = spec_from_mapping(tiny(name="b", aliases=["ORG/model"]), "b.yaml")
    with pytest.raises(SpecError) as info:
        build_index([("a.yaml", a), ("b.yaml", b)])
    assert str(info.value) == "b.yaml: key 'name/aliases': 'ORG/model' is already used by a.yaml"


def test_resolve_spec_yaml_path(tmp_path: Path) -> None:
    assert resolve_model(str(write(tmp_path, GOOD_YAML, "tiny.yaml"))).name == "tiny"
    with pytest.raises(SpecError, match="no such file"):
        resolve_model(str(tmp_path / "missing.yaml"))


# ---- `vramcalc models` -----------------------------------------------------------------


def run_models(*args: str) -> tuple[int, str, str]:
    """Run the command through a one-command typer app (independent of cli.py)."""
    import typer
    from typer.testing import CliRunner

    from vramcalc.commands.models import models

    app = typer.Typer()
    app.command()(models)
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})
    return result.exit_code, result.stdout, result.stderr


def test_models_json() -> None:
    code, out, _ = run_models("--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == len(catalog())
    by_name = {r["name"]: r for r in rows}
    llama = by_name["llama-3.1-8b"]
    assert llama["params"] == 8030261248
    assert "meta-llama/Llama-3.1-8B-Instruct" in llama["aliases"]
    assert llama["num_hidden_layers"] == 32 and llama["hidden_size"] == 4096
    assert llama["vocab_size"] == 128256
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (32, 8)
    assert llama["tie_word_embeddings"] is False
    assert by_name["mixtral-8x7b"]["num_local_experts"] == 8
    # natural order: 7b before 13b
    names = [r["name"] for r in rows]
    assert names.index("llama-2-7b") < names.index("llama-2-13b")


def test_models_table() -> None:
    code, out, err = run_models()
    assert code == 0
    assert "llama-3.1-8b" in out and "8.03 B" in out
    assert "qwen2.5-0.5b" in out and "494 M" in out
    assert "32 / 8" in out
    assert f"{len(catalog())} models" in err


@pytest.mark.parametrize("spec", catalog(), ids=lambda s: s.name)
def test_typed_features_match_what_the_importer_derives(spec: ModelSpec) -> None:
    """hidden_act, dropouts, softcapping and max positions of every catalog spec are what
    the config importer reads from the same config (a falcon spec that said gelu_new, or a
    phi-2 spec without its residual dropout, fails here)."""
    from vramcalc.models.hf_config import spec_from_hf_config

    imported = spec_from_hf_config(spec.to_hf_config(), spec.name, name=spec.name)
    for field in ("hidden_act", "resid_dropout", "embd_dropout", "attention_dropout",
                  "attn_logit_softcapping", "final_logit_softcapping",
                  "max_position_embeddings"):
        assert getattr(imported, field) == getattr(spec, field), field


def test_named_file_lookup_agrees_with_the_index() -> None:
    """get_spec reads model_specs/NAME.yaml alone before the catalog loads (cold start);
    every catalog name must give the same spec either way."""
    from vramcalc.models import spec as specs

    for spec in specs.catalog():
        direct = specs._named_file_spec(spec.name.lower())
        if direct is not None:
            assert direct == spec, spec.name
    assert specs._named_file_spec("../pyproject") is None
    assert specs._named_file_spec("no-such-model") is None


def test_the_committed_indexes_are_current() -> None:
    """model_specs/_index.json and src/vramcalc/data/_index.json are what
    `python -m vramcalc.models.catalog_index` writes from the YAML files now."""
    from vramcalc.models.catalog_index import INDEX_NAME, index_text, repo_folders

    for folder in repo_folders():
        committed = (folder / INDEX_NAME).read_text(encoding="utf-8")
        assert committed == index_text(folder), (
            f"{folder / INDEX_NAME} is stale: run python -m vramcalc.models.catalog_index")


def test_the_index_gives_what_yaml_gives(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every shipped YAML file: its index entry is PyYAML's parse (dates included), and a
    reader takes it from the index without parsing (load_yaml never called)."""
    import datetime

    from vramcalc.models import catalog_index

    dates = 0
    for folder in catalog_index.repo_folders():
        index = catalog_index.FolderIndex(folder)
        for path in sorted(folder.glob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            found, data = index.parsed(path.name, text)
            assert found, path
            assert data == catalog_index.load_yaml(text), path
            dates += str(data).count("datetime.date(")
    assert dates > 0  # prices.yaml: dates come back as dates
    assert catalog_index.decode('{"$date": "2026-03-10"}') == datetime.date(2026, 3, 10)


def test_a_stale_index_entry_is_not_used(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A YAML file edited after its index was written is parsed from its text."""
    from vramcalc.models.catalog_index import FolderIndex, write_index

    (tmp_path / "a.yaml").write_text("x: 1\n", encoding="utf-8")
    write_index(tmp_path, tmp_path)
    assert FolderIndex(tmp_path).parsed("a.yaml", "x: 1\n") == (True, {"x": 1})
    assert FolderIndex(tmp_path).parsed("a.yaml", "x: 2\n") == (False, None)
    assert FolderIndex(tmp_path).parsed("b.yaml", "x: 1\n") == (False, None)
    assert FolderIndex(tmp_path / "none").parsed("a.yaml", "x: 1\n") == (False, None)


def test_the_catalog_reads_no_yaml_where_the_index_is_current(
        tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The catalog from the index (no YAML parsed) and from the YAML files (index removed)
    are the same specs; an edited file is read from its new text."""
    import shutil
    from pathlib import Path

    import vramcalc.models.spec as specs_mod
    from vramcalc.models import catalog_index

    src = Path(specs_mod.__file__).resolve().parents[3] / "model_specs"
    shipped = tmp_path / "model_specs"
    shutil.copytree(src, shipped, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(specs_mod, "_catalog_root", lambda: shipped)
    cached = (specs_mod._index, specs_mod._catalog, specs_mod._named_file_spec)

    def fresh() -> tuple[object, ...]:
        for c in cached:
            c.cache_clear()
        return specs_mod.catalog()

    try:
        (shipped / catalog_index.INDEX_NAME).unlink()
        from_yaml = fresh()
        catalog_index.write_index(shipped, shipped)

        def no_yaml(text: str) -> None:
            raise AssertionError("parsed a YAML file the index holds")

        with monkeypatch.context() as m:
            m.setattr(specs_mod, "load_yaml", no_yaml)
            assert fresh() == from_yaml
            assert specs_mod.get_spec("llama-7b") == specs_mod.get_spec("huggyllama/llama-7b")
        edited = shipped / "llama-7b.yaml"
        edited.write_text(edited.read_text(encoding="utf-8").replace(
            "name: llama-7b", "name: llama-7b-edited"), encoding="utf-8")
        assert "llama-7b-edited" in {s.name for s in fresh()}
    finally:
        for c in cached:
            c.cache_clear()
