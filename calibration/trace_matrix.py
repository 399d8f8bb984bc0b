"""Matrix of allocator-trace points (run 14): measured points of earlier runs, run again
with the whole allocator trace written (`--trace-dir`), for `vramcalc.allocator_replay`.

    python calibration/trace_matrix.py > calibration/matrices/h200-traces.json

The points were picked for the spread of their reserved - allocated (bench/slack_by_point
in docs/memory-model.md): the largest under- and over-estimates of the linear slack rule,
both allocators, both loops, every method.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICK = [
    "z014-olmo2-7b", "d080-llama-2-7b", "y013-mixtral-8x7b", "x018-gemma-3-1b",
    "w009-gemma-2-9b", "v009-gemma-2-9b", "x011-tinyllama-1.1b", "v011-tinyllama-1.1b",
    "d081-llama-3.1-8b", "y028-llama-2-13b", "h001-starcoder2-7b", "d036-qwen2.5-0.5b",
    "y001-llama-3.1-8b", "d052-qwen2.5-0.5b", "d091-tinyllama-1.1b", "y035-qwen2.5-7b",
]


def main() -> None:
    found: dict[str, dict[str, object]] = {}
    for path in sorted((ROOT / "calibration" / "matrices").glob("h200-*.json")):
        if path.name == "h200-traces.json" or "predictions" in path.name:
            continue
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        for p in data.get("points", []):
            if isinstance(p, dict) and p.get("id") in PICK and p["id"] not in found:
                found[str(p["id"])] = {**p, "id": "tr-" + str(p["id"]), "snapshot": True,
                                       "steps": 3, "from": path.name}
    missing = [pid for pid in PICK if pid not in found]
    if missing:
        raise SystemExit(f"not in any matrix: {missing}")
    print(json.dumps({"note": __doc__.splitlines()[0],
                      "points": [found[pid] for pid in PICK]}, indent=1))


if __name__ == "__main__":
    main()
