"""The shipped YAML files, parsed once: a JSON index next to them, used where it is current.

The YAML files are the source: model_specs/*.yaml (the model catalog) and
vramcalc/data/*.yaml (GPUs, their throughput, prices). `write_index` parses a folder's
YAML files and writes `_index.json` next to them: each file's parsed mapping with the
fingerprint (length and CRC-32 of the UTF-8 text) of the text it came from. A reader reads
a YAML file's text as before and takes the parsed mapping from the index when the
fingerprint matches (`FolderIndex.parsed`), so a cold `vramcalc plan` or `check` imports no
PyYAML (~10 ms of a cold command, ~15 ms with gpus.yaml, gpu_speed.yaml and prices.yaml
parsed; bench/cold_start.py); a file edited since the index was written is parsed by
PyYAML, as without an index. The repo commits both indexes (`python -m
vramcalc.models.catalog_index` rewrites them; tests/models/test_specs.py fails on a stale
one) and setup.py's build step rewrites them in the wheel.

YAML dates (prices.yaml `date: 2026-03-10`) are stored as {"$date": "2026-03-10"} and read
back as datetime.date; `build_index` refuses any other value that JSON would not give back
equal. This module imports nothing of vramcalc, so setup.py can load it by path.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

INDEX_NAME = "_index.json"
INDEX_VERSION = 2
_DATE = "$date"


def load_yaml(text: str) -> Any:
    """Parse YAML safely, with libyaml's C loader where PyYAML has it (it parses the 40
    catalog files ~10x faster than the pure-Python one). PyYAML is imported here, on first
    use: a file the index holds is never parsed."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def fingerprint(text: str) -> list[int]:
    """[characters, CRC-32 of the UTF-8 bytes] of a file's text: what its index entry was
    parsed from."""
    return [len(text), zlib.crc32(text.encode("utf-8"))]


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if type(value) is datetime.date:
        return {_DATE: value.isoformat()}
    return value


def _decode_object(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _DATE in obj:
        return datetime.date.fromisoformat(obj[_DATE])
    return obj


def decode(text: str) -> Any:
    """An index file's JSON text -> its content, dates restored."""
    return json.loads(text, object_hook=_decode_object)


def build_index(folder: Path) -> dict[str, Any]:
    """{"version": 2, "files": {file name: {"fingerprint": [n, crc], "data": parsed}}} for
    every YAML file of `folder`; a value JSON cannot give back equal is an error."""
    files = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.endswith((".yaml", ".yml")):
            text = path.read_text(encoding="utf-8")
            data = load_yaml(text)
            encoded = _encode(data)
            if decode(json.dumps(encoded)) != data:
                raise ValueError(f"{path}: holds a value JSON cannot keep (only dates are "
                                 "converted)")
            files[path.name] = {"fingerprint": fingerprint(text), "data": encoded}
    return {"version": INDEX_VERSION, "files": files}


def index_text(folder: Path) -> str:
    return json.dumps(build_index(folder), sort_keys=True, separators=(",", ":")) + "\n"


def write_index(folder: Path, out_dir: Path) -> Path:
    """Write the index of `folder`'s YAML files into `out_dir` (temp file, then rename)."""
    out = out_dir / INDEX_NAME
    tmp = out.with_suffix(".tmp")
    tmp.write_text(index_text(folder), encoding="utf-8")
    tmp.replace(out)
    return out


class FolderIndex:
    """The index of one folder (anything with `/` and `read_text`: a Path or an
    importlib.resources Traversable), read on first use; an absent, unreadable or other
    version's index is empty."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self._files: dict[str, Any] | None = None

    def files(self) -> dict[str, Any]:
        if self._files is None:
            self._files = {}
            try:
                data = decode((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return self._files
            if isinstance(data, dict) and data.get("version") == INDEX_VERSION and isinstance(
                    data.get("files"), dict):
                self._files = data["files"]
        return self._files

    def parsed(self, name: str, text: str) -> tuple[bool, Any]:
        """(True, parsed mapping) when the index holds file `name` parsed from `text`,
        else (False, None): the caller parses `text` itself."""
        entry = self.files().get(name)
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint(text):
            return True, entry.get("data")
        return False, None


def package_folder(package: str) -> Any:
    """The folder of an importable package's files: a Path where the package is a folder
    on disk (a pip install, a source tree), read without importing importlib.resources
    (~4 ms of a cold command with the zipfile, tempfile and readers it loads), else
    importlib.resources.files(package) (a package imported from a zip)."""
    module = importlib.import_module(package)
    for entry in getattr(module, "__path__", ()):
        if os.path.isdir(entry):
            return Path(entry)
    from importlib import resources

    return resources.files(package)


def repo_folders() -> list[Path]:
    """The folders whose indexes the repo commits: model_specs/ and src/vramcalc/data/."""
    root = Path(__file__).resolve().parents[3]
    return [root / "model_specs", root / "src" / "vramcalc" / "data"]


if __name__ == "__main__":  # rewrite the committed indexes after editing a YAML file
    for folder in repo_folders():
        print(write_index(folder, folder))
