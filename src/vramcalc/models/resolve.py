"""One door from `--model` (or the API's `model=`) to a ModelSpec: a catalog name or alias,
a spec YAML, a Hugging Face config.json or its folder, or a hub id outside the catalog.

Here rather than in spec.py so that the schema and the catalog (spec.py) import neither
hf_config nor hub, which both build on spec.py (no import circle).
"""

from __future__ import annotations

import stat
from pathlib import Path

from vramcalc.errors import SpecError, UnknownModelError
from vramcalc.models.spec import ModelSpec, get_spec, load_spec_file


def resolve_model(arg: str) -> ModelSpec:
    """A catalog name, an alias, a spec YAML, or a HF config.json (file or its folder)."""
    from vramcalc.user_files import probe

    path = Path(arg).expanduser()
    found = probe(path, arg, SpecError)  # a locked folder on the way: one line, not a trace
    if found is not None and stat.S_ISDIR(found.st_mode):
        path = path / "config.json"
        found = probe(path, str(path), SpecError)
        if found is None or not stat.S_ISREG(found.st_mode):
            raise SpecError(f"{arg}: folder has no config.json")
    if found is not None and not stat.S_ISDIR(found.st_mode):
        if path.suffix in {".yaml", ".yml"}:
            return load_spec_file(path)
        from vramcalc.models.hf_config import load_config_json

        return load_config_json(path)
    try:
        return get_spec(arg)
    except UnknownModelError:
        # A hub id also contains '/', so only a path-shaped miss is reported as a file.
        if path.suffix in {".json", ".yaml", ".yml"} or arg.startswith((".", "/", "~")):
            raise SpecError(f"{arg}: no such file") from None
        from vramcalc.models.hub import is_hub_id

        if not is_hub_id(arg):
            raise
    # Not in the catalog: fetch the hub model's config.json (huggingface_hub loads here).
    from vramcalc.models.hub import resolve_hub_model

    return resolve_hub_model(arg)
