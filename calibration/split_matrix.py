"""Split a matrix's points into batches whose random weights fit a disk budget.

    python calibration/split_matrix.py MATRIX.json BUDGET_GIB

Prints one comma list of point ids per line; each batch's distinct depth-cut specs hold at
most BUDGET_GIB of bf16 safetensors. Run each with `python -m vramcalc.calibrate.matrix
MATRIX.json --only IDS --weights-cache DIR` and empty DIR between batches (the device disk
is 64 GiB; run 6 lost three points to a full disk).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramcalc.calibrate.matrix import point_spec  # noqa: E402


def batches(points: list[dict], budget_bytes: float) -> list[list[str]]:  # type: ignore[type-arg]
    by_spec: dict[str, list[str]] = {}
    size: dict[str, int] = {}
    for p in points:
        spec = point_spec(p)
        key = spec.name
        by_spec.setdefault(key, []).append(str(p["id"]))
        size[key] = 2 * spec.num_params()
    out: list[list[str]] = []
    used = budget_bytes + 1.0
    for key in sorted(size, key=lambda k: -size[k]):
        if used + size[key] > budget_bytes:
            out.append([])
            used = 0.0
        out[-1].extend(by_spec[key])
        used += size[key]
    return out


def main() -> None:
    points = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))["points"]
    for ids in batches(points, float(sys.argv[2]) * 2**30):
        print(",".join(ids))


if __name__ == "__main__":
    main()
