"""Do the commands give one answer? `fit` against `plan --max`, `sweep` against `plan --max`.

    python bench/one_answer.py [--src PATH] [--part fit|sweep|both] [--out FILE.json]

Every number comes from the CLI itself (typer's CliRunner, in process), so the same script
measures any version of vramcalc: `--src` puts another checkout's `src/` first on the path
(e.g. `git archive 74a3a3e | tar -x -C /tmp/before`, then `--src /tmp/before/src`).

- fit: `vramcalc fit --gpu rtx-4090 --seq-len 2048 --json`, and for every row that fits at
  batch 1, `vramcalc plan -m MODEL <the row's method> --gpu rtx-4090 --seq-len 2048 --max
  batch --json`. Counts the rows whose largest batch differs, and the rows where `plan
  --gpu` at fit's batch does not say "fits" (tight or not fitting).
- sweep: 15 settings a new user might try (SETTINGS), `vramcalc sweep ... --gpu G --json`
  against `vramcalc plan ... --gpu G --max batch|seq-len --json`. A sweep's "fits up to"
  agrees when it is the largest swept value at most --max (the sweep only sees its points).

Slow while the full estimate replays the allocator in Python (0.1-0.7 s for an 8B model on
the shared 2-core dev machine), since every search now runs on it: 20 minutes for the fit
part, 16 for the sweep part there (load average ~12).

Measured (bench/data/one_answer_before.json, one_answer_after.json):
- before (main at 74a3a3e): fit's largest batch differs from plan --max in 3 of 83 fitting
  rows (160 rows), fit higher in all 3; plan calls fit's batch "fits, tight" in 5 rows.
  sweep's "fits up to" differs in 4 of 15 settings, above --max in all 4 (llama-3.1-8b
  QLoRA s512 on an RTX 4090: 11 vs 10); sweep offers another card size in 15 of 15.
- after (branch oneanswer at cda8c6e): 0 of 83, 0 of 15, 0 of 15.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPU = "rtx-4090"
SEQ = 2048
# fit's methods as plan options (comparison.METHOD_SETUPS; the usual optimizer of each)
METHOD_FLAGS = {
    "full": ["--method", "full", "--optimizer", "adamw_torch_fused"],
    "lora": ["--method", "lora"],
    "qlora": ["--method", "qlora", "--quant", "nf4"],
    "int8": ["--method", "qlora", "--quant", "int8"],
}
# (model, plan flags, --over, GPU): what a new user would try first
SETTINGS: list[tuple[str, list[str], str, str]] = [
    ("llama-3.1-8b", ["--seq-len", "512"], "batch=1:32:+1", "rtx-4090"),
    ("llama-3.1-8b", ["--seq-len", "2048"], "batch=1:32:+1", "rtx-4090"),
    ("qwen2.5-7b", ["--seq-len", "1024"], "batch=1:32:+1", "rtx-4090"),
    ("mistral-7b", ["--method", "lora", "--seq-len", "1024"], "batch=1:32:+1",
     "a100-sxm4-80gb"),
    ("llama-3.2-1b", ["--method", "full", "--optimizer", "adamw_torch_fused",
                      "--seq-len", "2048"], "batch=1:32:+1", "rtx-4090"),
    ("qwen2.5-0.5b", ["--method", "full", "--optimizer", "adamw_torch_fused",
                      "--seq-len", "1024"], "batch=1:32:+1", "t4"),
    ("gemma-2-9b", ["--seq-len", "1024"], "batch=1:32:+1", "l4"),
    ("llama-3.2-3b", ["--seq-len", "4096"], "batch=1:32:+1", "rtx-3090"),
    ("mistral-7b", ["--quant", "int8", "--seq-len", "512"], "batch=1:32:+1", "a10g"),
    ("qwen2.5-14b", ["--seq-len", "1024"], "batch=1:32:+1", "rtx-4090"),
    ("llama-3.1-8b", ["--batch", "1"], "seq-len=1024:32768:+1024", "rtx-4090"),
    ("qwen2.5-7b", ["--batch", "2"], "seq-len=1024:32768:+1024", "a100-sxm4-40gb"),
    ("llama-3.1-70b", ["--batch", "1"], "seq-len=1024:32768:+1024", "h100-sxm"),
    ("phi-3-mini", ["--method", "lora", "--batch", "1"], "seq-len=1024:32768:+1024", "rtx-4090"),
    ("qwen3-8b", ["--batch", "4"], "seq-len=512:16384:+512", "l40s"),
]


def invoke(app: Any, args: list[str]) -> tuple[int, Any]:
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, args)
    try:
        return r.exit_code, json.loads(r.stdout)
    except json.JSONDecodeError:
        return r.exit_code, {"output": r.output}


def fit_part(app: Any) -> dict[str, Any]:
    code, fit = invoke(app, ["fit", "--gpu", GPU, "--seq-len", str(SEQ), "--json"])
    assert code == 0, fit
    rows = [r for r in fit["rows"] if r["fits"]]
    out = []
    for r in rows:
        base = ["-m", r["model"], *METHOD_FLAGS[r["method"]], "--gpu", GPU,
                "--seq-len", str(SEQ)]
        _, mx = invoke(app, ["plan", *base, "--max", "batch", "--json"])
        at = {}
        if r["max_batch"]:
            _, p = invoke(app, ["plan", *base, "--batch", str(r["max_batch"]), "--json"])
            at = {"certainty": p.get("certainty"), "required": p.get("required_device_bytes")}
        out.append({"model": r["model"], "method": r["method"], "fit": r["max_batch"],
                    "plan_max": mx.get("value"), "plan_at_fit": at.get("certainty"),
                    "fit_certainty_batch1": r.get("certainty")})
        print(f"  {r['model']:16s} {r['method']:5s} fit {r['max_batch']:4d}  plan --max "
              f"{mx.get('value')!s:>4s}  plan at fit's: {at.get('certainty')}", flush=True)
    differ = [o for o in out if o["fit"] != o["plan_max"]]
    not_fits = [o for o in out if o["fit"] and o["plan_at_fit"] != "fits"]
    return {"rows": len(fit["rows"]), "fitting_rows": len(out), "differ": len(differ),
            "fit_higher": sum(1 for o in differ if o["fit"] > (o["plan_max"] or 0)),
            "plan_not_fits_at_fit_batch": len(not_fits), "detail": out}


def _largest_at_most(values: list[int], limit: int) -> int | None:
    below = [v for v in values if v <= limit]
    return max(below) if below else None


def sweep_part(app: Any) -> dict[str, Any]:
    out = []
    for model, flags, over, gpu in SETTINGS:
        what = over.split("=")[0]
        code, sw = invoke(app, ["sweep", "-m", model, *flags, "--over", over, "--gpu", gpu,
                                "--json"])
        assert code == 0, sw
        values = [p[what] for p in sw["points"]]
        up_to = sw["gpus"][0]["fits_up_to"]
        _, mx = invoke(app, ["plan", "-m", model, *flags, "--gpu", gpu, "--max", what,
                             "--json"])
        implied = _largest_at_most(values, mx.get("value") or 0)
        row = {"model": model, "flags": flags, "over": over, "gpu": gpu,
               "sweep_fits_up_to": up_to, "plan_max": mx.get("value"),
               "sweep_card_bytes": sw["gpus"][0]["memory_bytes"],
               "plan_card_bytes": mx.get("gpu_memory_bytes"), "agree": up_to == implied}
        out.append(row)
        print(f"  {model:14s} {' '.join(flags):45s} {over:24s} {gpu:15s} sweep {up_to!s:>6s}"
              f"  --max {mx.get('value')!s:>6s}  {'ok' if row['agree'] else 'DIFFER'}",
              flush=True)
    return {"settings": len(out), "differ": sum(1 for o in out if not o["agree"]),
            "sweep_above_max": sum(1 for o in out if (o["sweep_fits_up_to"] or 0)
                                   > (o["plan_max"] or 0)),
            "card_bytes_differ": sum(1 for o in out
                                     if o["sweep_card_bytes"] != o["plan_card_bytes"]),
            "detail": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src",
                    help="the vramcalc source folder to measure (default: this checkout's)")
    ap.add_argument("--part", choices=("fit", "sweep", "both"), default="both")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import vramcalc
    from vramcalc.cli import app

    print(f"vramcalc from {Path(vramcalc.__file__).parent}", flush=True)
    result: dict[str, Any] = {"src": str(args.src)}
    t0 = time.perf_counter()
    if args.part in ("fit", "both"):
        print(f"fit --gpu {GPU} --seq-len {SEQ} against plan --max batch:", flush=True)
        f = result["fit"] = fit_part(app)
        print(f"fit: {f['differ']} of {f['fitting_rows']} fitting rows ({f['rows']} rows) "
              f"differ from plan --max batch ({f['fit_higher']} with fit higher); plan does "
              f"not call fit's batch \"fits\" in {f['plan_not_fits_at_fit_batch']}", flush=True)
    if args.part in ("sweep", "both"):
        print("sweep against plan --max:", flush=True)
        s = result["sweep"] = sweep_part(app)
        print(f"sweep: {s['differ']} of {s['settings']} settings differ from plan --max "
              f"({s['sweep_above_max']} above it); the card's bytes differ in "
              f"{s['card_bytes_differ']}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{result['seconds']} s", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
