"""The built-in model specs as one JSON index, written into the wheel at build time.

setup.py's build step calls `build_index` on the repo's model_specs/*.yaml and writes
`vramcalc/model_specs/_catalog.json` next to them, so a cold `vramcalc plan` reads one JSON
file instead of importing PyYAML (about 11 ms of a ~180 ms start, bench/cold_start.py). The
YAML files stay the source; a source tree without the index (an editable install, a GPU run
with PYTHONPATH=src) reads them directly, and tests/models/test_specs.py checks that both give the
same specs. This module imports nothing of vramcalc, so setup.py can load it by path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INDEX_NAME = "_catalog.json"
INDEX_VERSION = 1


def load_yaml(text: str) -> Any:
    """Parse YAML safely, with libyaml's C loader where PyYAML has it (it parses the 40
    catalog files ~10x faster than the pure-Python one). PyYAML is imported here, on first
    use: a wheel's plan reads the JSON index and never calls this."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def build_index(spec_dir: Path) -> dict[str, Any]:
    """{"version": 1, "specs": {file name: parsed YAML mapping}} for every catalog file."""
    specs = {}
    for path in sorted(spec_dir.iterdir(), key=lambda p: p.name):
        if path.name.endswith((".yaml", ".yml")):
            specs[path.name] = load_yaml(path.read_text(encoding="utf-8"))
    return {"version": INDEX_VERSION, "specs": specs}


def write_index(spec_dir: Path, out_dir: Path) -> Path:
    """Write the index into `out_dir` (temp file, then rename)."""
    out = out_dir / INDEX_NAME
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(build_index(spec_dir), sort_keys=True), encoding="utf-8")
    tmp.replace(out)
    return out
