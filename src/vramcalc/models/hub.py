"""A model that is not in the catalog, by its Hugging Face hub id: fetch its config.json.

Only `config.json` is downloaded (a few KB), plus, when the repository has one, the
safetensors index `model.safetensors.index.json`, whose `metadata.total_size` (bytes of
every tensor) checks the imported parameter count. Both go through
`huggingface_hub.hf_hub_download`, so the usual cache and settings apply: HF_HOME,
HF_HUB_CACHE, HF_TOKEN (gated and private models) and HF_HUB_OFFLINE (a cached config
works offline). huggingface_hub is imported only here, inside the functions, and only when
a hub id misses the catalog.

Every failure is one VramcalcError line that says what to do (accept a license, set
HF_TOKEN, download config.json and pass its path).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.errors import SpecError, UnknownModelError
from vramcalc.models.spec import ModelSpec

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
HUB_URL = "https://huggingface.co"

# huggingface_hub's repo id rule (utils/_validators.py): ORG/NAME of letters, digits,
# '-', '_', '.'; no '--' or '..'; max 96 characters.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")

# bytes per element of a checkpoint's dtype (config.json `torch_dtype` / `dtype`)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# A checkpoint within this share of the spec's size is a match (norms kept in fp32 by some
# exporters, rotary buffers saved by old ones); more is reported, never an error.
INDEX_TOLERANCE = 0.01


def is_hub_id(arg: str) -> bool:
    """ORG/NAME as the hub spells repository ids."""
    return bool(_REPO_ID.match(arg)) and "--" not in arg and ".." not in arg


@dataclass(frozen=True)
class HubFiles:
    config: Path
    index: Path | None  # model.safetensors.index.json when the repository has one


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported; read it per call instead.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub; None lets huggingface_hub use its default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def _page(repo_id: str) -> str:
    return f"{HUB_URL}/{repo_id}"


def _error(repo_id: str, err: Exception) -> Exception:
    """One line for each way fetching config.json fails, saying what to do."""
    from huggingface_hub import errors

    page = _page(repo_id)
    by_hand = f"or download {page}/blob/main/{CONFIG} and pass its path with --model"
    if isinstance(err, errors.GatedRepoError):
        return SpecError(
            f"{repo_id} is gated: accept its license at {page} and set HF_TOKEN to a token "
            f"of that account (or run 'hf auth login'), {by_hand}"
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return UnknownModelError(
            f"unknown model '{repo_id}': not in the catalog and not on the Hugging Face Hub "
            "(check the spelling; a private model needs HF_TOKEN); see 'vramcalc models'"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return SpecError(f"{repo_id}: the hub has no such revision; check {page}")
    if isinstance(err, errors.LocalEntryNotFoundError):
        # Not cached, and offline (HF_HUB_OFFLINE) or the hub is unreachable.
        if _offline():
            return SpecError(
                f"{repo_id}: {CONFIG} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                f"set; unset HF_HUB_OFFLINE to download it, {by_hand}"
            )
        return SpecError(
            f"{repo_id}: cannot reach the Hugging Face Hub to fetch {CONFIG} and it is not "
            f"cached; connect (or set HF_ENDPOINT to a mirror), {by_hand}"
        )
    if isinstance(err, errors.EntryNotFoundError):
        return SpecError(
            f"{repo_id} has no {CONFIG} (an adapter, GGUF or non-transformers repository?); "
            "pass the base model's hub id, or a config.json path with --model"
        )
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        return SpecError(
            f"{repo_id}: the Hugging Face Hub answered HTTP {status or '?'} for {CONFIG}; "
            f"try again later, {by_hand}"
        )
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return SpecError(
            f"{repo_id}: fetching {CONFIG} failed ({type(err).__name__}); {by_hand}"
        )
    raise err


def fetch_files(repo_id: str, *, revision: str | None = None) -> HubFiles:
    """config.json (required) and the safetensors index (optional) of `repo_id`."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # a broken install: huggingface_hub is a dependency
        raise SpecError(
            f"{repo_id}: fetching a hub model needs huggingface_hub; pip install huggingface_hub"
        ) from None

    kwargs: dict[str, Any] = {
        "revision": revision,
        "cache_dir": _cache_dir(),
        "local_files_only": _offline(),
    }
    try:
        config = Path(hf_hub_download(repo_id, CONFIG, **kwargs))
    except Exception as err:  # mapped to one line, or re-raised when it is not a hub error
        raise _error(repo_id, err) from None
    try:
        index: Path | None = Path(hf_hub_download(repo_id, INDEX, **kwargs))
    except Exception:  # optional: single-file checkpoints have none; offline, not cached
        index = None
    return HubFiles(config, index)


def _index_total_params(index: Path, config: dict[str, Any]) -> int | None:
    """Parameters in the checkpoint according to its index, or None when unknown."""
    try:
        meta = json.loads(index.read_text(encoding="utf-8")).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(meta.get("total_parameters"), int):  # written by newer transformers
        return int(meta["total_parameters"])
    size = meta.get("total_size")
    raw_text = config.get("text_config")
    text: dict[str, Any] = raw_text if isinstance(raw_text, dict) else {}
    dtype = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
    if not isinstance(size, int) or dtype not in _DTYPE_BYTES:
        return None
    return size // _DTYPE_BYTES[dtype]


def index_note(spec: ModelSpec, index: Path | None, config: dict[str, Any]) -> str | None:
    """Compare the spec's parameter count with the checkpoint's; a note when they differ."""
    if index is None or config.get("quantization_config"):  # packed weights: not comparable
        return None
    ckpt = _index_total_params(index, config)
    if ckpt is None:
        return None
    ours = spec.num_params()  # save_pretrained writes a tied lm_head once, as counted here
    diff = ckpt - ours
    if abs(diff) <= INDEX_TOLERANCE * ours:
        return None
    if config.get("vision_config") is not None and diff > 0:  # the rest: the vision side
        return (
            f"the checkpoint holds about {diff / 1e9:.2f} B parameters more than the "
            "language model (the vision tower and projector, not counted)"
        )
    return (
        f"the imported spec has {ours:,} parameters but the checkpoint's {INDEX} implies "
        f"about {ckpt:,}; the estimate may be off by that much (check the config)"
    )


def resolve_hub_model(repo_id: str, *, revision: str | None = None) -> ModelSpec:
    """The spec of a hub model outside the catalog, from its config.json."""
    from vramcalc.models.hf_config import spec_from_hf_config
    from vramcalc.models.spec import parse_json_text
    from vramcalc.user_files import read_text

    files = fetch_files(repo_id, revision=revision)
    text = read_text(files.config, f"{repo_id}: the cached {CONFIG} {files.config}", SpecError)
    config = parse_json_text(text, f"{repo_id}/{CONFIG}")
    if not isinstance(config, dict):
        raise SpecError(f"{repo_id}/{CONFIG}: expected a JSON object at the top level")
    spec = spec_from_hf_config(config, f"{repo_id}/{CONFIG}", name=repo_id)
    note = index_note(spec, files.index, config)
    return spec.model_copy(
        update={
            "source": f"{_page(repo_id)}/blob/main/{CONFIG}",
            "notes": (
                f"'{repo_id}' is not in the catalog: planned from its {CONFIG} on the hub",
                *spec.notes,
                *([note] if note else []),
            ),
        }
    )
