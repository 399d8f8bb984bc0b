"""Corrections for the H200 (issue 11): fit on the design run, judge on the holdout.

    python bench/h200_corrections.py [--write]

`vramcalc calibrate fit` fits k_act, k_slack and the CUDA context per GPU family and
stack; here the same `corrections.fit_one` runs on the H200 design run
(calibration/h200/run1-design.jsonl) and the corrected estimate is compared with the raw
one on the 36 holdout points of run 2, which the fit never sees. NVML was read per
process there, which leaves out bitsandbytes' paged (managed) memory, so the measured
device peak is taken with the predicted paged bytes added back. With --write the H200
entry (with its verdict: `helps`) is added to src/vramcalc/data/corrections.json, which
plan and check apply only when it helps.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_h200 import HOLDOUTS  # noqa: E402
from h200_points import ROOT, records  # noqa: E402

from vramcalc.corrections import factors as corr  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402

GPU = "NVIDIA H200"
STACK = corr.stack_key("2.11.0+cu130", "5.17.0")


def points(run: str) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for rec, spec, plan in records(run):
        m = rec.get("measurement") or {}
        if rec["status"] != "ok" or m.get("memory_limit_bytes") or m.get("num_alloc_retries"):
            continue
        out.append((estimate(spec, plan), m, spec.name))
    return out


def obs(est: Any, m: dict[str, Any], name: str) -> corr.Observation:
    dev = m.get("peak_device_bytes")
    if dev and m.get("nvml_process_source") == "process":
        dev += est.paged_bytes
    return corr.observation(est, model=name, gpu=GPU, stack=STACK,
                            meas_alloc=m["peak_allocated_bytes"],
                            meas_reserved=m["peak_reserved_bytes"], meas_device=dev)


def errors(pairs: list[tuple[Any, dict[str, Any], str]], c: corr.Corrections | None
           ) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"allocated": [], "reserved": [], "device": []}
    for est, m, _ in pairs:
        e = corr.corrected(est, c) if c is not None else est
        dev = m.get("peak_device_bytes")
        if dev and m.get("nvml_process_source") == "process":
            dev += est.paged_bytes
        for key, pred, meas in (("allocated", e.peak_allocated_bytes, m["peak_allocated_bytes"]),
                                ("reserved", e.peak_reserved_bytes, m["peak_reserved_bytes"]),
                                ("device", e.peak_device_bytes, dev)):
            if meas:
                out[key].append(abs(pred - meas) / meas)
    return out


def main(argv: list[str]) -> None:
    design = points("run1-design.jsonl")
    holdout = points("run2-holdout.jsonl")
    fitted = corr.fit_one([obs(*p) for p in design], corr.gpu_family(GPU), STACK)
    raw, cor = errors(holdout, None), errors(holdout, fitted)
    helps, validation = corr.validation_of(raw, cor)
    fitted = fitted.model_copy(update={"helps": helps, "validation": validation})
    print(f"fitted on {len(design)} design points: k_act {fitted.k_act:.4f}, k_slack "
          f"{fitted.k_slack:.3f}, context {fitted.context_bytes / 2**20:.0f} MiB")
    print(f"held-out H200 points (run 2 holdout, n={len(holdout)}): median |error|")
    for key in raw:
        print(f"  {key:9s} raw {100 * statistics.median(raw[key]):5.2f} %   corrected "
              f"{100 * statistics.median(cor[key]):5.2f} %")
    print(f"helps: {helps}")
    runs = [run for run, _, _ in HOLDOUTS]
    for run in runs[runs.index("run15-holdout6.jsonl"):]:  # the holdouts since the replay
        later = points(run)
        raw6, cor6 = errors(later, None), errors(later, fitted)
        print(f"later holdout ({run}, n={len(later)}): median |error|")
        for key in raw6:
            print(f"  {key:9s} raw {100 * statistics.median(raw6[key]):5.2f} %   corrected "
                  f"{100 * statistics.median(cor6[key]):5.2f} %")
    if "--write" in argv:
        path = ROOT / "src" / "vramcalc" / "data" / "corrections.json"
        entries = [e for e in corr.load(path) if e.key != fitted.key] + [fitted]
        corr.save(path, entries)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
