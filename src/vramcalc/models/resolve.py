"""One door from `--model` (or the API's `model=`) to a ModelSpec: a catalog name or alias,
a spec YAML, a Hugging Face config.json or its folder, or a hub id outside the catalog.

`resolve` is the one door: the CLI (commands/common.py resolve_model_arg, for every
command and so for the page, which runs them), the Python API (api.py) and the calibration
tools all come through it, and get the same spec and the same notes (`Resolved.lines`: which
of a catalog name and a folder here was used, and what importing the model assumed: a hub
fetch, a vision tower left out).

Here rather than in spec.py so that the schema and the catalog (spec.py) import neither
hf_config nor hub, which both build on spec.py (no import circle).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import NamedTuple

from vramcalc.errors import PlanError, SpecError, UnknownModelError
from vramcalc.models.spec import ModelSpec, get_spec, load_spec_file


class Resolved(NamedTuple):
    """A model as `resolve` found it, with the lines a command prints on stderr."""

    spec: ModelSpec
    warnings: tuple[str, ...] = ()  # which of a catalog model and a folder here was used

    def lines(self) -> list[str]:
        """The warnings, then the spec's notes (what importing the model assumed)."""
        return [*self.warnings, *(f"note: {note}" for note in self.spec.notes)]


def resolve(model: str | ModelSpec) -> Resolved:
    """--model (or the API's `model=`) as the user meant it: a ModelSpec as is, a catalog
    name, alias, spec YAML, config.json or its folder, or a hub id.

    A bare name that is both a catalog entry and a folder here goes to the catalog, unless
    the folder holds a config.json; either way a warning says which was used. `./name` is
    always the folder.
    """
    if isinstance(model, ModelSpec):
        return Resolved(model)
    arg = model
    if not arg.strip():
        raise PlanError("--model is empty; give a catalog name (see 'vramcalc models'), "
                        "a config.json or its folder, or a spec YAML")
    from vramcalc.user_files import probe

    path = Path(arg).expanduser()
    path_like = arg.startswith((".", "/", "~")) or path.suffix in {".json", ".yaml", ".yml"}
    found = probe(path, arg, SpecError)  # a locked folder on the way: one line
    warnings: tuple[str, ...] = ()
    if not path_like and found is not None and stat.S_ISDIR(found.st_mode):
        try:
            spec = get_spec(arg)
        except UnknownModelError:
            pass
        else:
            config = probe(path / "config.json", f"{arg}/config.json", SpecError)
            if config is None or not stat.S_ISREG(config.st_mode):
                return Resolved(spec, (
                    f"warning: '{arg}' is a catalog model and a folder here without "
                    f"config.json; using the catalog model (write ./{arg} for the folder)",))
            warnings = (f"warning: '{arg}' is a catalog model and a folder here with a "
                        "config.json; using the folder's config.json (use an alias from "
                        "'vramcalc models --json' for the catalog model)",)
    if found is not None and not (stat.S_ISDIR(found.st_mode) or stat.S_ISREG(found.st_mode)):
        raise SpecError(f"{arg}: not a file or folder; give a config.json, its folder or a "
                        "spec YAML")
    return Resolved(_load(arg), warnings)


def resolve_model(model: str | ModelSpec) -> ModelSpec:
    """`resolve(model).spec`: for callers that show no notes (calibration, tests)."""
    return resolve(model).spec


def _load(arg: str) -> ModelSpec:
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
