"""Compare the requests of a recorded step (calibration/h200/run14-traces, run17-traces,
run23-traces)
with the ones `vramcalc.memory.program.step` generates for the same point: counts of
allocations by size, largest first, and the reserved bytes each sequence leaves.

    python calibration/trace_programs.py tr-d081-llama-3.1-8b [--min-mib 8] [--seq] [--diff]
"""

from __future__ import annotations

import argparse
import collections
import difflib
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from h200_points import records  # noqa: E402

from vramcalc.calibrate.run import MARK_STEP  # noqa: E402
from vramcalc.calibrate.trace import generated_step, recorded_step  # noqa: E402
from vramcalc.memory.allocator.replay import replay_requests, replay_trace  # noqa: E402
from vramcalc.memory.effective import effective_train_plan  # noqa: E402
from vramcalc.memory.program.step import step_requests  # noqa: E402
from vramcalc.units import MiB  # noqa: E402


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("point")
    ap.add_argument("--min-mib", type=float, default=8.0)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--seq", action="store_true", help="print both sequences")
    ap.add_argument("--diff", action="store_true",
                    help="print where the two sequences differ (difflib opcodes)")
    args = ap.parse_args(argv)
    # (records file, trace folder) by point id prefix; run 28's gemma-2 traces ran on an H100
    run, folder = {
        "t17-": ("run17-traces.jsonl", "h200/run17-traces"),
        "t23-": ("run23-traces.jsonl", "h200/run23-traces"),
        "t25-": ("run25-traces.jsonl", "h200/run25-traces"),
        "g004": ("run28-gemma2-trace.jsonl", "h100/traces28"),
        "g031": ("run28-gemma2-trace.jsonl", "h100/traces28"),
        "tr-k": ("run32-trace32.jsonl", "h100/run32"),
        "tr-p": ("run36-trace.jsonl", "h100/run36/traces"),
    }.get(args.point[:4], ("run14-traces.jsonl", "h200/run14-traces"))
    trace = json.loads(gzip.open(ROOT / "calibration" / folder / f"{args.point}.json.gz",
                                 "rt").read())
    found = [(s, p) for r, s, p in records(run) if r["id"] == args.point]
    if not found:
        raise SystemExit(f"{args.point}: not a traced point of run 14, 17 or 23")
    spec, plan = found[0]
    eff, _, _ = effective_train_plan(spec, plan)
    gen = step_requests(spec, eff)
    sim = replay_requests(gen.requests, expandable=eff.expandable_segments)
    real = replay_trace(trace)
    print(f"recorded: reserved {real.measured_reserved_end / 2**30:.2f}, peak allocated "
          f"{real.measured_peak_allocated / 2**30:.2f}, slack "
          f"{(real.measured_reserved_end - real.measured_peak_allocated) / 2**30:.2f} GiB; "
          "generated: "
          f"peak allocated {sim.peak_allocated / 2**30:.2f}, reserved "
          f"{sim.peak_reserved / 2**30:.2f}, slack "
          f"{(sim.peak_reserved - sim.peak_allocated) / 2**30:.2f} GiB")
    lim = args.min_mib * MiB
    r = [x for x in recorded_step(trace, args.step, MARK_STEP) if x[1] >= lim]
    g = [x for x in generated_step(gen.requests, gen.starts, args.step) if x[1] >= lim]
    rc = collections.Counter(round(s / MiB, 1) for a, s in r if a == "+")
    gc = collections.Counter(round(s / MiB, 1) for a, s in g if a == "+")
    print(f"{'MiB':>10s} {'recorded':>9s} {'generated':>9s}")
    for size in sorted(set(rc) | set(gc), reverse=True):
        print(f"{size:10.1f} {rc.get(size, 0):9d} {gc.get(size, 0):9d}")
    if args.diff:
        rt = [f"{a}{s / MiB:.0f}" for a, s in r]
        gt = [f"{a}{s / MiB:.0f}" for a, s in g]
        sm = difflib.SequenceMatcher(None, rt, gt, autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                print(f"= {i2 - i1} requests")
            else:
                print(f"{op} recorded[{i1}:{i2}] {' '.join(rt[i1:i2])} | generated[{j1}:{j2}] "
                      f"{' '.join(gt[j1:j2])}")
    if args.seq:
        print("recorded:  " + " ".join(f"{a}{s / MiB:.0f}" for a, s in r))
        print("generated: " + " ".join(f"{a}{s / MiB:.0f}" for a, s in g))


if __name__ == "__main__":
    main(sys.argv[1:])
