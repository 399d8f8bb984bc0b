"""What a user's calibration does to step time: the host factor fitted on some timed steps
of one machine (timing/host_calibration.py fit_host_factor, as `plan` fits it on
DATA/runs), scored on other steps of the same machine.

    python bench/host_calibration.py [RESULTS.jsonl]

RESULTS (default: calibration/h100/run33-time5.jsonl, time holdout 5 on the slowest H100
host seen) is a matrix driver's output, read as bench/time_accuracy.py reads it (its
timing-grade points; predictions by the current model, h100-sxm for an H100 run). Splits:

- halves: the points in file order, even ones vs odd ones (each model in both halves: a
  user who timed a few plans of the models they train), fitted on one, scored on the
  other, both ways;
- leave one model out: fitted on the other models' points, scored on that model's.

Seen data of one host: the factor is fitted on this run's points, and the scored points
are other points of the same run. |error| = |pred / measured - 1|.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT = ROOT / "calibration" / "h100" / "run33-time5.jsonl"


def main(argv: list[str]) -> int:
    from time_accuracy import gpu_of, p90, timed_points

    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.resolve import resolve_model
    from vramcalc.models.spec import depth_cut
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.host_calibration import fit_host_factor
    from vramcalc.timing.step_time import step_at_host, train_work

    path = Path(argv[0]) if argv else DEFAULT
    lines = path.read_text(encoding="utf-8").splitlines()
    points, _ = timed_points(lines)
    gpu = gpu_of(lines)
    speed = gpu_speed(resolve_gpu(gpu))
    assert speed is not None
    rows = []  # (model, seconds at host factor h, measured)
    for p in points:
        spec = resolve_model(str(p["spec"]).split("@")[0])
        spec = depth_cut(spec, p["layers"]) if p["layers"] else spec
        at = step_at_host(train_work(spec, TrainPlan.model_validate(p["plan"])), speed)
        rows.append((str(p["spec"]), at, p["step_seconds"]))

    def score(part: list[int], h: float) -> tuple[float, float]:
        errs = [100 * abs(rows[i][1](h).step_seconds / rows[i][2] - 1) for i in part]
        return statistics.median(errs), p90(errs)

    def fit(part: list[int]) -> float:
        return fit_host_factor([((lambda h, f=rows[i][1]: f(h).step_seconds), rows[i][2])
                                for i in part])

    print(f"{path.name}: {len(rows)} timing-grade points on {gpu} (seen data of one host)")
    print(f"{'fitted on':34} {'n':>3} {'h':>6} {'scored on':28} {'n':>3} "
          f"{'median h=1':>10} {'p90 h=1':>8} {'median h':>9} {'p90 h':>7}")
    everything = list(range(len(rows)))
    even, odd = everything[0::2], everything[1::2]
    splits = [("even points", even, "odd points", odd), ("odd points", odd, "even points", even)]
    for model in dict.fromkeys(r[0] for r in rows):
        mine = [i for i in everything if rows[i][0] == model]
        others = [i for i in everything if rows[i][0] != model]
        splits.append((f"all but {model}", others, model, mine))
    for fit_name, fit_part, score_name, score_part in splits:
        h = fit(fit_part)
        m0, q0 = score(score_part, 1.0)
        m1, q1 = score(score_part, h)
        print(f"{fit_name:34} {len(fit_part):3d} {h:6.3f} {score_name:28} {len(score_part):3d} "
              f"{m0:9.1f}% {q0:7.1f}% {m1:8.1f}% {q1:6.1f}%")
    h = fit(everything)
    m0, q0 = score(everything, 1.0)
    m1, q1 = score(everything, h)
    print(f"{'all (seen: fitted and scored)':34} {len(rows):3d} {h:6.3f} {'all':28} "
          f"{len(rows):3d} {m0:9.1f}% {q0:7.1f}% {m1:8.1f}% {q1:6.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
