"""Read the H200 matrix runs (calibration/h200/*.jsonl) back with their specs and plans.

Each record names its point id; the spec (catalog name or inline config) and the depth cut
come from the matrix file the run used (calibration/matrices/h200-*.json), so a record is
replayed against the same model it measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vramcalc.calibrate.matrix import matrix_points, point_spec  # noqa: E402
from vramcalc.models.spec import ModelSpec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402

RUNS = {  # run file -> the matrix it measured
    "run1-design.jsonl": "h200-design.json",
    "run2-holdout.jsonl": "h200-holdout.json",
    "run2-more.jsonl": "h200-more.json",
    "run3-infer.jsonl": "h200-infer2.json",
    "run4-holdout2.jsonl": "h200-holdout2.json",
    "run5-infer-holdout-snaps.jsonl": "h200-run5.json",
    "run6-holdout3.jsonl": "h200-run6.json",
    "run9-holdout4.jsonl": "h200-holdout4.json",
    "run11-holdout5.jsonl": "h200-holdout5.json",
    "run12-eager-snaps.jsonl": "h200-eager-snaps.json",
    "run13-eager-holdout.jsonl": "h200-eager-holdout.json",
    "run14-traces.jsonl": "h200-traces.json",
    "run15-holdout6.jsonl": "h200-holdout6.json",
    "run16-holdout7.jsonl": "h200-holdout7.json",
    "run17-holdout8.jsonl": "h200-holdout8.json",
    "run17-traces.jsonl": "h200-traces17.json",
    "run18-load-traces.jsonl": "h200-traces18.json",
    "run19-holdout9.jsonl": "h200-holdout9.json",
    "run20-holdout10.jsonl": "h200-holdout10.json",
    "run21-holdout11.jsonl": "h200-holdout11.json",
    "run22-holdout12.jsonl": "h200-holdout12.json",
    "run23-traces.jsonl": "h200-traces23.json",
    "run24-holdout13.jsonl": "h200-holdout13.json",
    "run25-traces.jsonl": "h200-traces25.json",
    "run26-holdout14.jsonl": "h200-holdout14.json",
    "run27-holdout15.jsonl": "h200-holdout15.json",
    "run28-holdout15.jsonl": "h200-holdout15.json",
    "run28-gemma2-trace.jsonl": "h100-gemma2-trace28.json",
    "run29-holdout16.jsonl": "h200-holdout16.json",
    "run29b-holdout16.jsonl": "h200-holdout16.json",
    "run30-pack1.jsonl": "h200-pack1.json",
    "run31-pack1.jsonl": "h200-pack1.json",
    "run31-loss1a.jsonl": "h200-loss1.json",
    "run31-loss1b.jsonl": "h200-loss1.json",
    "run32-pack1.jsonl": "h200-pack1.json",
    "run32-loss1.jsonl": "h200-loss1.json",
    "run32-trace32.jsonl": "h100-trace32.json",
    "run33-switch2.jsonl": "h100-switch2.json",
    "run33-switch2b.jsonl": "h100-switch2.json",
    "run34-trace.jsonl": "h100-trace34.json",
    "run35-trl2.jsonl": "h100-trl2.json",
    "run35b-trl2.jsonl": "h100-trl2.json",
    "run35-trlprep.jsonl": "h100-trlprep.json",
    "run36-trl3.jsonl": "h100-trl3.json",
    "run38-kbit3.jsonl": "h100-kbit3.json",
    "run40-unsloth.jsonl": "h100-unsloth.json",
    "run36-trace.jsonl": "h100-trace36.json",
}
# Runs measured on another card than the H200: the folder under calibration/ that holds
# them (runs 27 and 28 were given an H100 80GB HBM3: calibration/h100/run27-gpu.txt,
# run28-gpu.txt). Run 28 measured the 23 holdout-15 points that could not start in run 27.
RUN_DIRS = {
    "run27-holdout15.jsonl": "h100",
    "run28-holdout15.jsonl": "h100",
    "run28-gemma2-trace.jsonl": "h100",
    "run29-holdout16.jsonl": "h100",
    "run29b-holdout16.jsonl": "h100",
    "run30-pack1.jsonl": "h100",
    "run31-pack1.jsonl": "h100",
    "run31-loss1a.jsonl": "h100",
    "run31-loss1b.jsonl": "h100",
    "run32-pack1.jsonl": "h100",
    "run32-loss1.jsonl": "h100",
    "run32-trace32.jsonl": "h100",
    "run33-switch2.jsonl": "h100",
    "run33-switch2b.jsonl": "h100",
    "run34-trace.jsonl": "h100",
    "run35-trl2.jsonl": "h100",
    "run35b-trl2.jsonl": "h100",
    "run35-trlprep.jsonl": "h100",
    "run36-trl3.jsonl": "h100",
    "run38-kbit3.jsonl": "h100",
    "run40-unsloth.jsonl": "h100",
    "run36-trace.jsonl": "h100/run36",
}


# Runs 1-6 ran calibrate's plain loop before commit c5caccc, which freed the output after
# backward (`out.loss.backward(); del out`); their records say plain-outputs (relabelled in
# 074a522, which took them for the loop that keeps `out` into the next step; read as
# trainer-plain-outputs since issue 27's names, matrix_points). Read back as the loop they
# ran. Runs 7 on keep `out` until the next forward rebinds it.
DEL_OUT_RUNS = frozenset({
    "run1-design.jsonl", "run2-holdout.jsonl", "run2-more.jsonl", "run3-infer.jsonl",
    "run4-holdout2.jsonl", "run5-infer-holdout-snaps.jsonl", "run6-holdout3.jsonl",
})


def measured_plan(fname: str, plan: dict[str, Any]) -> TrainPlan:
    """The plan a record of run `fname` measured (see DEL_OUT_RUNS)."""
    if fname in DEL_OUT_RUNS and plan.get("loop") == "trainer-plain-outputs":
        plan = {**plan, "loop": "trainer-plain-outputs-del"}
    return TrainPlan.model_validate(plan)


def _matrix_points(name: str) -> dict[str, dict[str, Any]]:
    path = ROOT / "calibration" / "matrices" / name
    return {p["id"]: p for p in matrix_points(json.loads(path.read_text()))}


def spec_of(point: dict[str, Any]) -> ModelSpec:
    return point_spec(point)


def records(run: str | None = None) -> Iterator[tuple[dict[str, Any], ModelSpec, TrainPlan]]:
    """(record, spec, plan) of every training record of the H200 runs."""
    for fname, matrix in RUNS.items():
        if run is not None and fname != run:
            continue
        path = ROOT / "calibration" / RUN_DIRS.get(fname, "h200") / fname
        if not path.exists():
            continue
        points = _matrix_points(matrix)
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            point = points.get(rec["id"])
            if point is None or point.get("worker") or "plan" not in point:
                continue
            yield rec, spec_of(point), measured_plan(fname, point["plan"])
