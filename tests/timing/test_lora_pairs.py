"""The LoRA vs full pair matrix (calibration/matrices/h100-lorapair.json, pre-registered) and
its scorer bench/lora_pairs.py (docs/time-model.md "LoRA vs full fine-tuning on a small
model")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "calibration/matrices/h100-lorapair.json"
PREDS = ROOT / "calibration/matrices/h100-lorapair-predictions.json"


def _design_time() -> Any:
    sys.path.insert(0, str(ROOT / "calibration"))
    try:
        import design_time
    finally:
        sys.path.remove(str(ROOT / "calibration"))
    return design_time


def test_pair_matrix_is_pairs_predicted_and_small() -> None:
    """Each model times full, LoRA and QLoRA nf4 at the same batch, sequence and
    checkpointing (batch 1 and 8), plus LoRA with full's optimizer; every point has a
    committed prediction for both device cards and the RTX cards in question; the committed
    matrix is what design_time.matrix_pairs builds; peaks fit an 80 GB card; the serial
    budget is small."""
    from vramcalc.memory.estimate import estimate
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan

    dt = _design_time()
    matrix = json.loads(MATRIX.read_text())
    assert matrix == json.loads(json.dumps(dt.matrix_pairs()))
    preds = {p["id"]: p for p in json.loads(PREDS.read_text())["points"]}
    subs = [(g, s) for g in matrix["points"] for s in g["job"]["points"]]
    assert {s["id"] for _, s in subs} == set(preds)
    for p in preds.values():
        assert set(p["by_gpu"]) == {"h200", "h100-sxm", "rtx-4060-ti-16gb", "rtx-4090"}
    assert {g["spec"] for g in matrix["points"]} == {"qwen2.5-0.5b", "llama-3.2-1b"}
    for g in matrix["points"]:
        assert not g.get("layers")  # full depth: the host-bound regime of the question
        by: dict[tuple[int, int, bool], set[str]] = {}
        for s in g["job"]["points"]:
            p = s["plan"]
            k = p.get("quant", p["method"]) + ("-fused" if p["method"] == "lora" and
                                               p["optimizer"] == "adamw_torch_fused" else "")
            by.setdefault((p["batch_size"], p["seq_len"], p["gradient_checkpointing"]),
                          set()).add(k)
            peak = estimate(get_spec(g["spec"]), TrainPlan.model_validate(p)).peak_device_bytes
            assert peak <= 40 * 2**30, s["id"]
        assert by == {(1, 512, True): {"full", "lora", "nf4", "lora-fused"},
                      (8, 512, True): {"full", "lora", "nf4"}}
    assert dt.budget(str(MATRIX)) <= 200


def _lora_pairs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "lora_pairs.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_lora_pairs_reports_measured_and_predicted_ratios(tmp_path: Path) -> None:
    """A synthetic run 1.25x the committed H100 predictions: every measured ratio equals
    the predicted one and every error is -20 %; a point that ran beside another is left
    out."""
    matrix = json.loads(MATRIX.read_text())
    preds = {p["id"]: p["by_gpu"]["h100-sxm"]
             for p in json.loads(PREDS.read_text())["points"]}
    lines = []
    for g, grade in zip(matrix["points"], (True, False), strict=True):
        subs = [{"id": s["id"], "plan": s["plan"], "status": "ok",
                 "step_seconds": 1.25 * preds[s["id"]]} for s in g["job"]["points"]]
        lines.append(json.dumps({"id": g["id"], "status": "ok", "spec": g["spec"],
                                 "layers": None, "timing_grade": grade,
                                 "measurement": {"points": subs,
                                                 "device_name": "NVIDIA H100 80GB HBM3"}}))
    res = tmp_path / "r.jsonl"
    res.write_text("\n".join(lines) + "\n")
    proc = _lora_pairs(str(res))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "predictions read for: h100-sxm" in proc.stdout
    rows = [r.split() for r in proc.stdout.splitlines() if r.startswith("qwen2.5-0.5b")]
    assert len(rows) == 7
    for r in rows:
        assert r[5] == "-20.0"
        if r[2] != "full":
            assert r[-1] == r[-2]  # measured ratio == predicted ratio
    assert "left out: p1-llama-3.2-1b/0: not timing-grade" in proc.stdout


def test_lora_pairs_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    proc = _lora_pairs(str(bad))
    assert proc.returncode == 1 and proc.stderr.startswith("Error: ")


def test_host_by_method_recovers_one_host_factor(tmp_path: Path) -> None:
    """Steps timed as the model gives them on a host 1.3x the reference: every method's
    host-bound points want 1.30; the others (llama-3.2-1b full at batch 8 is GPU-bound)
    are not counted."""
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import step_at_host, train_work

    speed = gpu_speed(resolve_gpu("h100-sxm"))
    assert speed is not None
    lines = []
    bound: dict[str, int] = {}
    gpu_errs: list[str] = []
    for g in json.loads(MATRIX.read_text())["points"]:
        spec = get_spec(g["spec"])
        subs = []
        for s in g["job"]["points"]:
            at = step_at_host(train_work(spec, TrainPlan.model_validate(s["plan"])), speed)
            subs.append({"id": s["id"], "plan": s["plan"], "status": "ok",
                         "step_seconds": at(1.3).step_seconds})
            one, slow = at(1.0), at(1.3)
            if one.gpu_seconds > one.host_seconds:
                gpu_errs.append(f"{s['plan']['method']} 1, "
                                f"{100 * (one.step_seconds / slow.step_seconds - 1):+.1f} %")
            if one.host_seconds > 1.5 * one.gpu_seconds:
                k = s["plan"].get("quant", s["plan"]["method"])
                bound[k] = bound.get(k, 0) + 1
        lines.append(json.dumps({"id": g["id"], "status": "ok", "spec": g["spec"],
                                 "layers": None, "timing_grade": True,
                                 "measurement": {"points": subs, "device_name": "H100"}}))
    res = tmp_path / "r.jsonl"
    res.write_text("\n".join(lines) + "\n")
    proc = _lora_pairs("--host-by-method", str(res))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = proc.stdout.splitlines()
    i = next(n for n, r in enumerate(rows) if r.startswith("r.jsonl (h100-sxm): "))
    row = rows[i]
    # the GPU-bound point (full at batch 8 of llama-3.2-1b): its error at factor 1
    assert gpu_errs and gpu_errs[0].startswith("full 1, ")
    assert rows[i + 1] == "  GPU-bound (GPU > host at factor 1), median signed error: " \
        + "; ".join(gpu_errs)
    assert bound["full"] < 4  # llama-3.2-1b full at batch 8
    cells = row.split(": ", 1)[1].split("; ")
    assert cells == [f"{k} {n}, 1.30 [1.30-1.30]" for k, n in sorted(bound.items())]


def test_pairs_lists_same_setting_points_of_one_file(tmp_path: Path) -> None:
    """Two methods at one setting make a pair, with their measured ratio; another batch or
    the same method does not."""
    def sub(i: int, method: str, batch: int, secs: float) -> dict[str, Any]:
        return {"id": f"g/{i}", "status": "ok", "step_seconds": secs,
                "plan": {"method": method, "batch_size": batch, "seq_len": 512,
                         "gradient_checkpointing": True, "optimizer": "adamw_torch"}}
    rec = {"id": "g", "status": "ok", "spec": "qwen2.5-0.5b", "layers": None,
           "timing_grade": True, "measurement": {"device_name": "H100", "points": [
               sub(0, "full", 1, 0.10), sub(1, "lora", 1, 0.25), sub(2, "lora", 2, 0.30),
               sub(3, "full", 2, 0.12), sub(4, "full", 1, 0.11)]}}
    res = tmp_path / "r.jsonl"
    res.write_text(json.dumps(rec) + "\n")
    proc = _lora_pairs("--pairs", str(res))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in proc.stdout.splitlines() if r.startswith("r.jsonl ")]
    assert [r.split(": ")[1].split(",")[0] for r in rows] == ["2.50", "2.27", "2.50"]
    # 0.25 / 0.10, 0.25 / 0.11, 0.30 / 0.12
    assert all(" lora / full: " in r for r in rows)
    assert proc.stdout.splitlines()[-1] == "3 pairs"
