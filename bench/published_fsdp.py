"""Published FSDP runs vs `vramcalc plan --gpus N --strategy fsdp --gpu CARD`: per row the
verdict (ours by the rule of `plan`: required free memory + 0.5 GiB margin against what the
card offers, "fits, tight" counting as fits; theirs: the run trained or the source says it
did not fit) and, where the source gives a per-GPU peak, our error on it.

Rows: bench/data/published_fsdp.yaml (verdict rows, each with URL and quoted line) and the
per-GPU peaks of bench/data/published_multi_gpu.yaml that name their cards (those runs
trained: "fits"). The A100 table of issue 27 could not be found; see the YAML's header.
Run: PYTHONPATH=src python bench/published_fsdp.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.memory.multi_gpu import ParallelPlan, estimate_parallel
from vramcalc.models.spec import get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.verdict import DEFAULT_MARGIN_GIB, catalog_target, verdict

DATA = Path(__file__).parent / "data"
GiB = 2**30
TOLERANCE = 0.10
PARALLEL_KEYS = ("gpus", "strategy", "offload", "sharding_strategy")
METRIC_ATTR = {"device": "peak_device_bytes", "reserved": "peak_reserved_bytes",
               "allocated": "peak_allocated_bytes"}


def _row_rows() -> list[dict[str, Any]]:
    """Every row to judge: the verdict rows, then the peaks that name their card."""
    verdicts = yaml.safe_load((DATA / "published_fsdp.yaml").read_text())
    peaks = {r["id"]: r for r in yaml.safe_load((DATA / "published_multi_gpu.yaml").read_text())}
    out = [r for r in verdicts if "id" in r]
    for r in verdicts:
        for gpu, ids in r.get("ids_ran_on", {}).items():
            out.extend({**peaks[i], "gpu": gpu, "ran": True} for i in ids)
    return out


def judge(row: dict[str, Any]) -> dict[str, Any]:
    p = dict(row["plan"])
    par = ParallelPlan(**{k: p.pop(k) for k in PARALLEL_KEYS if k in p})
    p["batch_size"] = p.pop("batch")
    spec = get_spec(row["model"])
    if row.get("spec_update"):
        spec = spec.model_copy(update=row["spec_update"])
    pe = estimate_parallel(spec, TrainPlan(**p), par)
    target = catalog_target(resolve_gpu(row["gpu"]))
    v = verdict(target.free_bytes, pe.busiest.required_device_bytes,
                int(DEFAULT_MARGIN_GIB * GiB), pe.busiest.required_low)
    out: dict[str, Any] = {"id": row["id"], "gpus": par.gpus, "gpu": row["gpu"],
                           "ran": row["ran"], "ours": v.word, "verdict_right": v.fits ==
                           row["ran"], "required_gib": pe.busiest.required_device_bytes / GiB,
                           "offers_gib": target.free_bytes / GiB, "error": None}
    published = row.get("published_gib", row.get("published_gb", 0) * 1e9 / GiB or None)
    if published:
        ours = getattr(pe.busiest, METRIC_ATTR[row.get("metric", "device")]) / GiB
        out.update(metric=row.get("metric", "device"), published_gib=published, ours_gib=ours,
                   error=(ours - published) / published)
    return out


def rows() -> list[dict[str, Any]]:
    return [judge(r) for r in _row_rows()]


def main() -> None:
    print(f"{'id':38} {'GPUs':>4} {'card':15} {'ran':>5} {'ours':>14} {'needs':>7} "
          f"{'offers':>7} {'peak err':>8}")
    got = rows()
    for r in got:
        err = "" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        mark = "" if r["verdict_right"] else "  <- verdict wrong"
        print(f"{r['id']:38} {r['gpus']:>4} {r['gpu']:15} {str(r['ran']):>5} {r['ours']:>14} "
              f"{r['required_gib']:>7.2f} {r['offers_gib']:>7.2f} {err:>8}{mark}")
    right = sum(r["verdict_right"] for r in got)
    peaks = [r for r in got if r["error"] is not None]
    within = sum(abs(r["error"]) <= TOLERANCE for r in peaks)
    print(f"verdicts right: {right}/{len(got)}; per-GPU peaks within 10 %: "
          f"{within}/{len(peaks)}")


if __name__ == "__main__":
    main()
