"""Issue 29's switches measured against their pre-registered predictions.

    python bench/accuracy_switches.py [--points]

The matrices of MATRICES, every point at full depth:
- `calibration/matrices/h200-loss1.json` (loss kernels: torch, liger, cce, chunked, on
  llama-2-7b, llama-3.1-8b, qwen2.5-1.5b, gemma-2-2b), predictions in
  `h200-loss1-predictions.json`;
- `calibration/matrices/h200-pack1.json` (padding-free and packed batches, a token count
  per step, activation offloading of the checkpoints or of everything), predictions in
  `h200-pack1-predictions.json`; each technique point names its twin without it in `base`.
- `calibration/matrices/h100-switch2.json` (switch holdout 2), and
  `calibration/matrices/h100-trlprep.json` (QLoRA as TRL's SFTTrainer prepares it:
  kbit_prep false, bf16 adapters, each with its kbit-prepared twin; run file
  `calibration/h100/run35-trlprep.jsonl`).
- `calibration/matrices/h100-trl3.json` (TRL 1.4-1.14's chunked_nll, trl-chunked, as trl
  1.14.0 patches it; run file `calibration/h100/run36-trl3.jsonl`, not measured yet): its
  points name as `base` their torch twins of h100-trl2 (TWIN_MATRICES), measured in run 35.
- `calibration/matrices/h100-kbit3.json` (QLoRA as axolotl and LLaMA-Factory prepare it:
  kbit_prep false, fp32 adapters, the worker's `prep`; run file
  `calibration/h100/run38-kbit3.jsonl`, not measured yet): each trainer-prepared point
  (non-reentrant checkpointing) names its kbit-prepared twin as `base`; each reentrant
  point (the trainers' default, not modelled: the same prediction) names the
  non-reentrant one, so its effect is what reentrant checkpointing does.
- `calibration/matrices/h100-unsloth.json` (Unsloth itself: FastLanguageModel's 4-bit
  load, get_peft_model with its offloading checkpointing, its kernels and fused loss; the
  worker's prep "unsloth"; run file `calibration/h100/run40-unsloth.jsonl`, not measured
  yet): against `vramcalc plan --trainer unsloth`, no twins.

For each point: peak allocated, reserved and device (NVML process peak, compared with the
predicted device less the predicted resident paged bytes, as bench/accuracy_h200.py does)
against the pre-registered prediction and against the current estimator. Then per technique
the median and worst |error|. For the pack points, the technique's own effect (the point's
peak allocated less its twin's) measured and predicted, and the host bytes the offloading
held (`measurement.offload.host_peak_bytes`, else torch's pinned host allocator peak)
against the prediction's `host_bytes`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_h200 import pct, summary  # noqa: E402
from h200_points import ROOT, records  # noqa: E402

from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

# matrix -> (its predictions, the runs that measured it)
MATRICES = {
    "h200-loss1.json": ("h200-loss1-predictions.json",
                        ("run31-loss1a.jsonl", "run31-loss1b.jsonl", "run32-loss1.jsonl")),
    "h200-pack1.json": ("h200-pack1-predictions.json",
                        ("run30-pack1.jsonl", "run31-pack1.jsonl", "run32-pack1.jsonl")),
    "h100-switch2.json": ("h100-switch2-predictions.json",
                          ("run33-switch2.jsonl", "run33-switch2b.jsonl")),
    # TRL >= 1.15 SFTTrainer's fused LM head (calibration/design_trl.py)
    "h100-trl2.json": ("h100-trl2-predictions.json", ("run35-trl2.jsonl", "run35b-trl2.jsonl")),
    # TRL's QLoRA preparation (TrainPlan.kbit_prep False, adapter_dtype bf16) and twins
    "h100-trlprep.json": ("h100-trlprep-predictions.json", ("run35-trlprep.jsonl",)),
    # TRL 1.4-1.14 SFTTrainer's chunked_nll (calibration/design_trl.py --trl3)
    "h100-trl3.json": ("h100-trl3-predictions.json", ("run36-trl3.jsonl",)),
    # QLoRA as axolotl / LLaMA-Factory prepare it (kbit_prep False, fp32 adapters; the
    # worker's prep) and twins; calibration/design_kbit3.py
    "h100-kbit3.json": ("h100-kbit3-predictions.json", ("run38-kbit3.jsonl",)),
    # Unsloth itself (the worker's prep "unsloth") against --trainer unsloth;
    # calibration/design_unsloth.py
    "h100-unsloth.json": ("h100-unsloth-predictions.json", ("run40-unsloth.jsonl",)),
}
# matrix -> the matrix whose measured points its `base` twins are
TWIN_MATRICES = {"h100-trl3.json": "h100-trl2.json"}
TARGET_ALLOC, TARGET_DEVICE = 3.0, 5.0  # issue 29: each technique, full depth
# Records whose technique the worker did not apply: reported, not scored. run 31's
# k-g-liger-gemma-2-2b ran the trainer-plain loop, whose Trainer never calls train(), where
# transformers 5.x applies use_liger_kernel: its peak is the torch twin's to the byte
# (calibrate/run.py apply_loss_kernel since the fix; tests/calibrate/test_loss_kernel_apply.py).
# Run 31's k010/k021 offloaded the checkpoints to the host (host bytes as planned) but kept
# their GPU copies too: the worker's pack hook held each layer input in its closure
# (calibrate/offload.py CheckpointOffload since the fix; tests/calibrate/test_offload_harness.py).
# Run 32 measured all three again with the fixed worker (run32-loss1.jsonl, run32-pack1.jsonl).
NOT_APPLIED = {
    ("run31-loss1a.jsonl", "k-g-liger-gemma-2-2b"):
        "Liger not applied by the worker (trainer-plain never calls Trainer.train)",
    ("run31-pack1.jsonl", "k010-qwen2.5-1.5b-ckoff"):
        "the worker kept the offloaded checkpoints' GPU copies (pack-hook closure)",
    ("run31-pack1.jsonl", "k021-gemma-2-2b-ckoff"):
        "the worker kept the offloaded checkpoints' GPU copies (pack-hook closure)",
}


def technique(point_id: str, plan: Any) -> str:
    if point_id.startswith("k-"):
        return f"loss {plan.loss_kernel}"
    tag = point_id.rsplit("-", 1)[-1]
    if tag.startswith("base"):
        return "none (twin)"
    return {"pf": "padding-free", "pf5000": "padding-free, 5000 tokens", "packed": "packed",
            "ckoff": "offload checkpoints", "nogc": "offload all",
            "alloff": "offload all", "chunked": f"loss {plan.loss_kernel}",
            "fused": "loss trl-fused", "torch": "none (twin)",
            "trl": "TRL prep (no kbit prep, bf16 adapters)",
            "axolotl": "axolotl prep",
            "llamafactory": "LLaMA-Factory prep",
            "axolotlre": "axolotl prep, reentrant",
            "llamafactoryre": "LLaMA-Factory prep, reentrant"}.get(tag, tag)


def host_measured(m: dict[str, Any]) -> int | None:
    off = m.get("offload") or {}
    value = off.get("host_peak_bytes") or off.get("host_allocator_peak_bytes")
    return int(value) if value else None


def rows_of(matrix: str) -> list[dict[str, Any]]:
    pred_file, runs = MATRICES[matrix]
    pre = {p["id"]: p for p in json.loads(
        (ROOT / "calibration" / "matrices" / pred_file).read_text())["points"]}
    bases = {p["id"]: p.get("base") for p in json.loads(
        (ROOT / "calibration" / "matrices" / matrix).read_text())["points"]}
    rows = []
    for run in runs:
        for rec, spec, plan in records(run):
            m = rec.get("measurement") or {}
            why = NOT_APPLIED.get((run, rec["id"]))
            if why is not None:
                rows.append({"id": rec["id"], "status": f"not scored: {why}",
                             "technique": technique(rec["id"], plan)})
                continue
            if rec["status"] != "ok" or not m.get("peak_allocated_bytes"):
                rows.append({"id": rec["id"], "status": rec["status"],
                             "technique": technique(rec["id"], plan)})
                continue
            p = pre[rec["id"]]
            est = estimate(spec, plan)
            clean = not (m.get("num_alloc_retries") or m.get("memory_limit_bytes"))
            dev = m.get("peak_device_bytes") if m.get("nvml_process_source") == "process" else None
            row: dict[str, Any] = {
                "id": rec["id"], "status": "ok", "technique": technique(rec["id"], plan),
                "base": bases.get(rec["id"]), "run": run,
                "meas_alloc": m["peak_allocated_bytes"], "pred_alloc": p["peak_allocated_bytes"],
                "alloc": pct(p["peak_allocated_bytes"], m["peak_allocated_bytes"]),
                "alloc_now": pct(est.peak_allocated_bytes, m["peak_allocated_bytes"]),
                "reserved": (pct(p["peak_reserved_bytes"], m["peak_reserved_bytes"])
                             if clean else None),
                "device": (pct(p["peak_device_bytes"] - p.get("paged_bytes", 0), dev)
                           if clean and dev else None),
                "device_now": (pct(est.peak_device_bytes - est.paged_bytes, dev)
                               if clean and dev else None),
                "host_pred": p.get("host_bytes", 0), "host_meas": host_measured(m),
                "retries": m.get("num_alloc_retries"),
                # the forward's peak (the worker's forward hook, the largest over the
                # steps) against the predicted forward phase, where predicted
                "fwd": (pct(p["phase_peaks"]["forward"],
                            max(f["fwd_peak"] for f in m["forward_marks"]))
                        if "phase_peaks" in p and m.get("forward_marks") else None),
            }
            rows.append(row)
    # one row per point: a measured record, else the last run's status
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if last.get(r["id"], {}).get("status") != "ok":
            last[r["id"]] = r
    return list(last.values())


def report(matrix: str, show: bool) -> None:
    rows = rows_of(matrix)
    ok = [r for r in rows if r["status"] == "ok"]
    print(f"\n== {matrix}: {len(ok)} of {len(rows)} measured (pre-registered predictions; "
          f"targets per technique: allocated {TARGET_ALLOC} %, device {TARGET_DEVICE} %)")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['id']}: {r['status']}")
    for key in ("alloc", "reserved", "device", "alloc_now", "device_now", "fwd"):
        print(f"  {key:10s} {summary([r[key] for r in ok if r[key] is not None])}")
    print("  by technique (allocated; device):")
    for tech in sorted({r["technique"] for r in ok}):
        sub = [r for r in ok if r["technique"] == tech]
        worst_a = max(abs(r["alloc"]) for r in sub)
        devs = [abs(r["device"]) for r in sub if r["device"] is not None]
        met = worst_a <= TARGET_ALLOC and all(d <= TARGET_DEVICE for d in devs)
        print(f"    {tech:28s} {summary([r['alloc'] for r in sub])}")
        dev_summary = summary([r["device"] for r in sub if r["device"] is not None])
        print(f"    {'':28s} {dev_summary}  {'met' if met else 'MISSED'}")
    by_id = {r["id"]: r for r in ok}
    if matrix in TWIN_MATRICES:
        by_id.update((r["id"], r) for r in rows_of(TWIN_MATRICES[matrix])
                     if r["status"] == "ok" and r["id"] not in by_id)
    twins = [r for r in ok if r.get("base") and r["base"] in by_id]
    if twins:
        print("  the technique's effect (peak allocated less its twin's), GiB: measured / "
              "predicted; host GiB measured / predicted")
        for r in twins:
            b = by_id[r["base"]]
            meas = (r["meas_alloc"] - b["meas_alloc"]) / GiB
            pred = (r["pred_alloc"] - b["pred_alloc"]) / GiB
            host = ("-" if r["host_meas"] is None else f"{r['host_meas'] / GiB:.2f}")
            print(f"    {r['id']:30s} {meas:+7.2f} / {pred:+7.2f}   host {host} / "
                  f"{r['host_pred'] / GiB:.2f}")
    if show:
        for r in sorted(ok, key=lambda r: -abs(r["alloc"])):
            dev = "" if r["device"] is None else f" device {r['device']:+6.2f}%"
            res = "" if r["reserved"] is None else f" reserved {r['reserved']:+6.2f}%"
            print(f"    {r['id']:30s} alloc {r['alloc']:+7.2f}%{res}{dev}"
                  f"  (now {r['alloc_now']:+.2f}%)")


def main(argv: list[str]) -> None:
    for matrix in MATRICES:
        report(matrix, "--points" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
