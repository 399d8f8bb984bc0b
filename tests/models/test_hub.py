"""A hub id outside the catalog: its config.json from a Hugging Face cache, offline.

tests/fixtures/hub/ORG/NAME/ holds each repository's files; `hub_cache` lays them out as
huggingface_hub lays out HF_HUB_CACHE (models--ORG--NAME/refs/main holding the commit,
snapshots/<commit>/FILE linking to blobs/<sha256>). HF_HUB_OFFLINE=1 throughout
(conftest.py): nothing touches the network. Parameter counts are never typed in: each
import is compared with the transformers model built from the same dict on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.errors import SpecError, UnknownModelError
from vramcalc.models.hub import INDEX, is_hub_id, resolve_hub_model
from vramcalc.models.resolve import resolve_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hub"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT_ONLY = [
    "mistralai/Mistral-Small-24B-Base-2501",
    "Qwen/Qwen2.5-Coder-7B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "microsoft/phi-4",
    "google/gemma-3-1b-it",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "01-ai/Yi-34B",
    "codellama/CodeLlama-13b-hf",
]
MULTIMODAL = [
    "google/gemma-3-4b-it",
    "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
]


def add_repo(cache: Path, repo_id: str, files: dict[str, str]) -> None:
    """One repository in huggingface_hub's cache layout (file_download.py)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, text in files.items():
        blob = repo / "blobs" / hashlib.sha256(text.encode()).hexdigest()
        blob.write_text(text)
        os.symlink(os.path.relpath(blob, snap), snap / name)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    for cfg in FIXTURES.glob("*/*/config.json"):
        repo_id = f"{cfg.parent.parent.name}/{cfg.parent.name}"
        add_repo(cache, repo_id, {p.name: p.read_text() for p in cfg.parent.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def fixture_config(repo_id: str) -> dict[str, Any]:
    return json.loads((FIXTURES / repo_id / "config.json").read_text())


def meta_count(cfg: dict[str, Any], *, multimodal: bool) -> tuple[int, int]:
    """(language-model params, vision-side params) of the model built on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = dict(cfg)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    auto = (transformers.AutoModelForImageTextToText if multimodal
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(config)
    vision_words = ("vision", "visual", "multi_modal_projector")
    text = vision = 0
    for name, p in model.named_parameters():
        if any(w in name for w in vision_words):
            vision += p.numel()
        else:
            text += p.numel()
    return text, vision


@pytest.mark.parametrize("repo_id", TEXT_ONLY)
def test_text_model_from_cache_matches_transformers(hub_cache: Path, repo_id: str) -> None:
    spec = resolve_hub_model(repo_id)
    assert spec.name == repo_id
    assert spec.source == f"https://huggingface.co/{repo_id}/blob/main/config.json"
    assert spec.notes[0].startswith(f"'{repo_id}' is not in the catalog")
    text, _ = meta_count(fixture_config(repo_id), multimodal=False)
    assert spec.num_params() == text


@pytest.mark.parametrize("repo_id", MULTIMODAL)
def test_multimodal_plans_the_language_model(hub_cache: Path, repo_id: str) -> None:
    spec = resolve_hub_model(repo_id)
    assert any("vision tower and projector are NOT counted" in n for n in spec.notes)
    text, vision = meta_count(fixture_config(repo_id), multimodal=True)
    assert vision > 0
    if spec.model_type == "mllama_text_model":
        # cross-attention q/k norms and gates, 8 image-token rows: named in the note
        missing = text - spec.num_params()
        assert f"{missing:,} parameters" in " ".join(spec.notes)
        assert 0 < missing < 1e-5 * text
    else:
        assert spec.num_params() == text


def test_catalog_miss_resolves_through_the_hub(hub_cache: Path) -> None:
    spec = resolve_model("01-ai/Yi-34B")
    assert spec.name == "01-ai/Yi-34B" and spec.model_type == "llama"


def test_index_total_size_checks_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           hub_cache: Path) -> None:
    cfg = fixture_config("Qwen/Qwen2.5-Coder-7B")
    params = resolve_hub_model("Qwen/Qwen2.5-Coder-7B").num_params()
    # synthetic indexes: bf16, 2 bytes per parameter of the imported spec
    good = json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": {}})
    bad = json.dumps({"metadata": {"total_size": 2 * params * 11 // 10}, "weight_map": {}})
    add_repo(hub_cache, "acme/good", {"config.json": json.dumps(cfg), INDEX: good})
    add_repo(hub_cache, "acme/bad", {"config.json": json.dumps(cfg), INDEX: bad})
    assert len(resolve_hub_model("acme/good").notes) == 1  # only "not in the catalog"
    note = resolve_hub_model("acme/bad").notes[-1]
    assert note.startswith(f"the imported spec has {params:,} parameters")


def test_multimodal_index_names_the_vision_side(hub_cache: Path) -> None:
    cfg = fixture_config("google/gemma-3-4b-it")
    params = resolve_hub_model("google/gemma-3-4b-it").num_params()
    index = json.dumps({"metadata": {"total_size": 2 * (params + 400_000_000)}})
    add_repo(hub_cache, "acme/mm", {"config.json": json.dumps(cfg), INDEX: index})
    assert resolve_hub_model("acme/mm").notes[-1].startswith(
        "the checkpoint holds about 0.40 B parameters more than the language model")


def test_not_cached_offline_says_what_to_do() -> None:
    with pytest.raises(SpecError) as err:
        resolve_hub_model("acme/not-cached")
    assert str(err.value) == (
        "acme/not-cached: config.json is not in the Hugging Face cache and HF_HUB_OFFLINE is "
        "set; unset HF_HUB_OFFLINE to download it, or download "
        "https://huggingface.co/acme/not-cached/blob/main/config.json and pass its path "
        "with --model"
    )


@pytest.mark.parametrize(
    ("exc_name", "kind", "start"),
    [
        ("GatedRepoError", SpecError,
         "meta-llama/X is gated: accept its license at https://huggingface.co/meta-llama/X "
         "and set HF_TOKEN"),
        ("RepositoryNotFoundError", UnknownModelError,
         "unknown model 'meta-llama/X': not in the catalog and not on the Hugging Face Hub"),
        ("RemoteEntryNotFoundError", SpecError, "meta-llama/X has no config.json"),
    ],
)
def test_hub_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, exc_name: str,
                                 kind: type[Exception], start: str) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    exc_type = getattr(errors, exc_name)

    def fake_download(*args: Any, **kwargs: Any) -> str:
        raise exc_type.__new__(exc_type)  # their __init__ wants an HTTP response

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(kind) as err:
        resolve_hub_model("meta-llama/X")
    assert str(err.value).startswith(start)
    assert "\n" not in str(err.value)


def test_network_error_without_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def fake_download(*args: Any, **kwargs: Any) -> str:
        raise errors.LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(SpecError, match="cannot reach the Hugging Face Hub to fetch config.json"):
        resolve_hub_model("acme/x")


def test_cli_plan_with_hub_id_and_vision_note(hub_cache: Path) -> None:
    r = CliRunner().invoke(app, ["plan", "-m", "google/gemma-3-4b-it", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "google/gemma-3-4b-it"
    assert "note: 'gemma3' is multimodal" in r.stderr


def test_cli_unknown_hub_id_offline_is_one_line() -> None:
    r = CliRunner().invoke(app, ["plan", "-m", "acme/nothing"])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: acme/nothing: config.json is not in the Hugging Face")
    assert r.stderr.count("\n") == 1


def test_is_hub_id() -> None:
    assert is_hub_id("Qwen/Qwen2.5-7B")
    assert not is_hub_id("llama-7b")
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("a--b/c")


def test_catalog_names_do_not_import_huggingface_hub() -> None:
    code = ("import sys\nfrom vramcalc.models.resolve import resolve_model\n"
            "resolve_model('llama-7b')\nassert 'huggingface_hub' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
