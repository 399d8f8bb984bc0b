"""The estimate's error on every committed training record, saved, and two saves compared.

    python bench/record_errors.py --save FILE          # this checkout's estimator
    python bench/record_errors.py --compare BEFORE AFTER

`--save` writes, for every measured training record of bench/h200_points.py RUNS, the
measured and estimated peak allocated, reserved and device (the device estimate less the
resident paged bytes, NVML per process, as bench/accuracy_h200.py compares them; reserved
and device left out where the allocator retried or a smaller card was emulated).
`--compare` prints |error| median / p90 / worst per matrix, for gemma-2, eager attention and
QLoRA, then every record whose error moved by more than 0.5 points. For a before / after,
save once from another checkout (its bench/ puts its own src/ first on the path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from h200_points import RUNS, records  # noqa: E402

from vramcalc.errors import VramcalcError  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402

KEYS = ("alloc", "res", "dev")


def save(path: str) -> None:
    out: list[dict[str, Any]] = []
    for run in RUNS:
        for rec, spec, plan in records(run):
            m = rec.get("measurement") or {}
            if rec.get("status") != "ok" or not m.get("peak_allocated_bytes"):
                continue
            try:
                e = estimate(spec, plan)
            except VramcalcError as err:
                out.append({"run": run, "id": rec["id"], "error": str(err)})
                continue
            clean = not (m.get("num_alloc_retries") or m.get("memory_limit_bytes"))
            dev = (m.get("peak_device_bytes") if m.get("nvml_process_source") == "process"
                   else None)
            out.append({"run": run, "id": rec["id"], "model": spec.name, "attn": plan.attn,
                        "method": plan.method, "clean": clean,
                        "m_alloc": m["peak_allocated_bytes"],
                        "m_res": m.get("peak_reserved_bytes"), "m_dev": dev,
                        "e_alloc": e.peak_allocated_bytes, "e_res": e.peak_reserved_bytes,
                        "e_dev": e.peak_device_bytes - e.paged_bytes})
    Path(path).write_text(json.dumps(out))
    print(f"{len(out)} records -> {path}")


def _err(r: dict[str, Any], k: str) -> float | None:
    m = r.get("m_" + k)
    if not m or (k != "alloc" and not r["clean"]):
        return None
    return 100 * (r["e_" + k] / m - 1)


def _summary(keys: list[tuple[str, str]], src: dict[tuple[str, str], Any], k: str) -> str:
    xs = sorted(abs(e) for key in keys if key in src and "error" not in src[key]
                for e in [_err(src[key], k)] if e is not None)
    if not xs:
        return "-"
    p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
    return f"{statistics.median(xs):.2f}/{p90:.2f}/{xs[-1]:.2f}"


def compare(before_path: str, after_path: str) -> None:
    b = {(r["run"], r["id"]): r for r in json.loads(Path(before_path).read_text())}
    a = {(r["run"], r["id"]): r for r in json.loads(Path(after_path).read_text())}
    keys = [k for k in b if "error" not in b[k]]
    groups: dict[str, list[tuple[str, str]]] = {"every training record": keys}
    for k in keys:
        groups.setdefault(RUNS[k[0]], []).append(k)
    groups["gemma-2 (every run)"] = [k for k in keys if b[k]["model"].startswith("gemma-2")]
    groups["eager attention"] = [k for k in keys if b[k]["attn"] == "eager"]
    groups["qlora"] = [k for k in keys if b[k]["method"] == "qlora"]
    print("| records | n | allocated med/p90/worst % | reserved | device |")
    print("|---|---|---|---|---|")
    for name, ks in groups.items():
        cells = [f"{_summary(ks, b, k)} -> {_summary(ks, a, k)}" for k in KEYS]
        print(f"| {name} | {len(ks)} | " + " | ".join(cells) + " |")
    print("\nmoved by more than 0.5 points (before -> after, %):")
    moved = 0
    for k in keys:
        if k not in a or "error" in a[k]:
            continue
        parts = []
        for m in KEYS:
            eb, ea = _err(b[k], m), _err(a[k], m)
            if eb is not None and ea is not None and abs(ea - eb) > 0.5:
                parts.append(f"{m} {eb:+.2f} -> {ea:+.2f}")
        if parts:
            moved += 1
            print(f"  {k[0]:28s} {k[1]:34s} {b[k]['model']:20s} {b[k]['attn']:5s} "
                  f"{b[k]['method']:5s} " + "; ".join(parts))
    print(f"{moved} of {len(keys)} moved")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", metavar="FILE")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.save:
        save(args.save)
    if args.compare:
        compare(*args.compare)
    if not (args.save or args.compare):
        ap.error("give --save FILE or --compare BEFORE AFTER")


if __name__ == "__main__":
    main(sys.argv[1:])
