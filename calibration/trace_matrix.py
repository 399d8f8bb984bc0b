"""Matrix of allocator-trace points: measured points of earlier runs, run again with the
whole allocator trace written (`--trace-dir`), for `vramcalc.memory.allocator.replay` and the step
programs of `vramcalc.memory.program.step`.

    python calibration/trace_matrix.py > calibration/matrices/h200-traces.json          # run 14
    python calibration/trace_matrix.py run17 > calibration/matrices/h200-traces17.json  # run 17
    python calibration/trace_matrix.py run18 > calibration/matrices/h200-traces18.json  # run 18
    python calibration/trace_matrix.py run23 > calibration/matrices/h200-traces23.json  # run 23
    python calibration/trace_matrix.py run25 > calibration/matrices/h200-traces25.json  # run 25

The points were picked for the spread of their reserved - allocated (bench/slack_by_point
in docs/memory-model.md): the largest under- and over-estimates of the linear slack rule,
both allocators, both loops, every method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICK = [
    "z014-olmo2-7b", "d080-llama-2-7b", "y013-mixtral-8x7b", "x018-gemma-3-1b",
    "w009-gemma-2-9b", "v009-gemma-2-9b", "x011-tinyllama-1.1b", "v011-tinyllama-1.1b",
    "d081-llama-3.1-8b", "y028-llama-2-13b", "h001-starcoder2-7b", "d036-qwen2.5-0.5b",
    "y001-llama-3.1-8b", "d052-qwen2.5-0.5b", "d091-tinyllama-1.1b", "y035-qwen2.5-7b",
]
# Run 17: the regimes whose programs were not traced (int8, MoE experts, full fine-tuning
# with fp32 masters, eager with checkpointing), each the point of its regime with the
# largest peak-device error of the replay (bench/accuracy_h200.py rows, 2026-12-01),
# leaving out the old outputs-keeping loop.
PICK17 = [
    "w029-qwen2.5-0.5b", "y004-qwen2.5-0.5b", "y012-llama-3.2-1b", "x013-mixtral-8x7b",
    "x014-qwen3-moe", "q014-qwen3-moe", "y013-mixtral-8x7b", "r015-smollm2-1.7b",
    "q029-qwen3-14b", "w009-gemma-2-9b", "y036-qwen2.5-0.5b", "r022-qwen2.5-1.5b",
    "q032-qwen2.5-14b", "y008-gemma-2-2b",
]

# Run 18: traces that start before the model is loaded (the load and prepare phases leave
# 0-7 GiB free in the cache: `marks.before_train` reserved - allocated), the points with
# the largest such gap in each regime, and small ones for contrast.
PICK18 = [
    "r035-llama-3.1-70b", "r033-qwen2.5-32b", "q032-qwen2.5-14b", "r029-qwen3-14b",
    "y028-llama-2-13b", "z014-olmo2-7b", "d091-tinyllama-1.1b", "w029-qwen2.5-0.5b",
    "d093-mixtral-8x7b", "v035-mixtral-8x7b", "v013-mixtral-8x7b", "w014-qwen3-moe",
    "y014-qwen3-moe", "y020-qwen2-moe", "r010-falcon-7b", "x013-mixtral-8x7b",
]
# Run 23: the largest allocated and device errors left after holdout 12 (bench/
# accuracy_h200.py --all, 2026-12-02): mistral-7b int8 with checkpointing under at 512
# tokens and over at 8192, falcon-7b and mixtral full fp32, starcoder2 and phi-2 int8, the
# llama-2-7b QLoRA eager device outlier, and llama-2-7b int8 (same widths, exact) for contrast.
PICK23 = [
    "d066-mistral-7b", "j002-mistral-7b", "n010-falcon-7b", "q013-mixtral-8x7b",
    "m017-starcoder2-7b", "k017-phi-2", "k015-llama-2-7b", "v000-llama-2-7b",
]
# Run 25: the largest peak-device errors of holdout 13 (run 24; all reserved - allocated,
# the allocated peaks within 0.3 %): gemma-2-9b int8 past its window (slack 12.6 GiB
# measured, 5.2 replayed), qwen2-moe int8 with expandable segments, llama-2-7b int8 eager,
# llama-3-8b QLoRA eager (under), llama-2-7b QLoRA and qwen3-14b int8 (over).
PICK25 = [
    "e009-gemma-2-9b", "g020-qwen2-moe", "e000-llama-2-7b", "g036-llama-3-8b",
    "g000-llama-2-7b", "g029-qwen3-14b",
]
SETS = {"run14": (PICK, "tr-"), "run17": (PICK17, "t17-"), "run18": (PICK18, "l18-"),
        "run23": (PICK23, "t23-"), "run25": (PICK25, "t25-")}


def main(which: str = "run14") -> None:
    pick, prefix = SETS[which]
    found: dict[str, dict[str, object]] = {}
    for path in sorted((ROOT / "calibration" / "matrices").glob("h200-*.json")):
        if "traces" in path.name or "predictions" in path.name:
            continue
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        for p in data.get("points", []):
            if isinstance(p, dict) and p.get("id") in pick and p["id"] not in found:
                found[str(p["id"])] = {**p, "id": prefix + str(p["id"]), "snapshot": True,
                                       "steps": 3, "from": path.name}
    missing = [pid for pid in pick if pid not in found]
    if missing:
        raise SystemExit(f"not in any matrix: {missing}")
    print(json.dumps({"note": __doc__.splitlines()[0],
                      "points": [found[pid] for pid in pick]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run14")
