"""The pre-registered step-time holdout (issue 30): a serial matrix and its predictions.

    python calibration/design_time.py matrix > calibration/matrices/h200-time1.json
    python calibration/design_time.py predict calibration/matrices/h200-time1.json "NOTE" \\
        > calibration/matrices/h200-time1-predictions.json
    python calibration/design_time.py budget calibration/matrices/h200-time1.json
    python calibration/design_time.py matrix2 > calibration/matrices/h200-time2.json
    python calibration/design_time.py predict calibration/matrices/h200-time2.json "NOTE" \
        > calibration/matrices/h200-time2-predictions.json
    python calibration/design_time.py matrix3 > calibration/matrices/h200-time3.json
    python calibration/design_time.py predict calibration/matrices/h200-time3.json "NOTE" \
        > calibration/matrices/h200-time3-predictions.json
    python calibration/design_time.py matrix5 > calibration/matrices/h200-time5.json
    python calibration/design_time.py predict calibration/matrices/h200-time5.json "NOTE" \
        > calibration/matrices/h200-time5-predictions.json
    python calibration/design_time.py matrix_pairs > calibration/matrices/h100-lorapair.json
    python calibration/design_time.py predict calibration/matrices/h100-lorapair.json "NOTE" \
        rtx-4060-ti-16gb rtx-4090 > calibration/matrices/h100-lorapair-predictions.json

Four catalog architectures (GQA and MHA, 32k-256k vocabularies, fused qkv/gate_up, Gemma-2's
eager-only attention with soft capping, a 28-layer model at full depth), eight points each:
full fine-tuning, 16-bit LoRA, QLoRA nf4 and int8 LoRA, each with checkpointing on and off;
batch 1 to 16, sequences 512 to 2048. One `time_worker` process per
architecture runs its points one after another; run the matrix with `--max-parallel 1`
so every point has the GPU to itself (`timing_grade` in its record).

`budget` prints the estimated device seconds: weights builds (about 20 s each, four at a
time: calibration/h200/run26-holdout14.log), one process start per architecture (about
15 s of imports and CUDA start), per point about 4 s of load, prepare and Trainer set-up
(run 26's `measurement.wall_s` of 4-layer points less their steps) plus its steps at the
predicted step time (the first step counted twice for warm-up).
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.hardware.catalog import resolve_gpu  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import depth_cut, get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.timing.gpu_speed import gpu_speed  # noqa: E402
from vramcalc.timing.step_time import step_time, train_work  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

TIME_WORKER = "vramcalc.calibrate.time_worker"
STEPS = 6  # one warm-up step, five timed (run.step_seconds: the median after the first)
MAX_PEAK_GIB = 100  # one point at a time on a 141 GB H200: room for the process's leftovers
ARCHS: dict[str, int | None] = {  # catalog name -> layers (None: full depth)
    "llama-3.1-8b": 4, "qwen2.5-1.5b": None, "gemma-2-2b": 6, "phi-3-mini": 4,
}
# Each method twice per architecture: checkpointing on (even slots) and off (odd slots).
SLOTS: list[dict[str, Any]] = [
    {"method": "full"}, {"method": "full"},
    {"method": "lora"}, {"method": "lora"},
    {"method": "qlora", "quant": "nf4"}, {"method": "qlora", "quant": "nf4"},
    {"method": "qlora", "quant": "int8"}, {"method": "qlora", "quant": "int8"},
]
BATCHES = [1, 2, 4, 8, 16]
SEQS = [512, 1024, 512, 2048, 512, 1024, 512]
PROCESS_START_S = 15.0
POINT_SETUP_S = 4.0
WEIGHTS_S = 20.0
BUILD_PARALLEL = 4


def plan_for(arch_index: int, slot: int) -> dict[str, Any]:
    plan: dict[str, Any] = dict(SLOTS[slot])
    plan["gradient_checkpointing"] = slot % 2 == 0
    plan["batch_size"] = BATCHES[(slot + arch_index) % len(BATCHES)]
    plan["seq_len"] = SEQS[(slot + arch_index) % len(SEQS)]
    if plan["method"] == "full":
        plan["optimizer"] = "adamw_torch_fused" if (slot + arch_index) % 2 else "adamw_torch"
    elif plan.get("quant") == "int8":
        plan["optimizer"] = "adamw_8bit"
    elif plan["method"] == "lora":
        plan["optimizer"] = "adamw_torch"
    else:
        plan["optimizer"] = "paged_adamw_8bit"
    return plan


def _fit(name: str, layers: int | None, plan: dict[str, Any]) -> dict[str, Any]:
    """Halve the batch (then the sequence) until the predicted peak fits MAX_PEAK_GIB."""
    spec = get_spec(name)
    spec = depth_cut(spec, layers) if layers else spec
    while estimate(spec, TrainPlan.model_validate(plan)).peak_device_bytes > MAX_PEAK_GIB * GiB:
        if plan["batch_size"] > 1:
            plan["batch_size"] //= 2
        else:
            plan["seq_len"] //= 2
    return plan


def time_group(group: str, name: str, layers: int | None, plans: list[dict[str, Any]],
               reserve_gib: float) -> dict[str, Any]:
    """One time worker point: `plans` timed one after another on `name` (cut to
    `layers`), each `STEPS` steps, as `group`/0, `group`/1, ..."""
    subs = [{"id": f"{group}/{j}", "plan": plan, "steps": STEPS}
            for j, plan in enumerate(plans)]
    return {"id": group, "worker": TIME_WORKER, "spec": name, "layers": layers,
            "reserve_gib": reserve_gib, "job": {"points": subs}}


def matrix() -> dict[str, Any]:
    return {"points": [
        time_group(f"t{a}-{name}", name, layers,
                   [_fit(name, layers, plan_for(a, j)) for j in range(len(SLOTS))],
                   MAX_PEAK_GIB)
        for a, (name, layers) in enumerate(ARCHS.items())]}


# ---- time holdout 2 (after run 28 set the host constants; docs/time-model.md) ----------
# Five architectures, none of time 1's: llama-3.2-1b at full depth (16 layers; 10 of the 42
# points, about a quarter), mistral-7b@4L (GQA, 32k vocabulary, untied), qwen3-4b@6L
# (q/k norms, 152k tied vocabulary), smollm2-1.7b@8L (MHA, 49k vocabulary), gemma-7b@4L
# (MHA with 256-wide heads, GeGLU, 256k vocabulary). Each group: the four methods with
# checkpointing on and off; the rest drawn with a fixed seed: batch 1 to 16, sequence 256
# to 2048, the optimizer, LoRA rank, dropout and targets. Sized for one H100 80GB: every
# point's estimated peak <= MAX_PEAK2_GIB (the estimate under-predicted gemma-2 by 4-6 %;
# none of these is gemma-2, and 50 of 80 GB leaves 35 % besides).
ARCHS2: dict[str, int | None] = {
    "llama-3.2-1b": None, "mistral-7b": 4, "qwen3-4b": 6, "smollm2-1.7b": 8, "gemma-7b": 4,
}
EXTRA2 = {"llama-3.2-1b": 2}  # two more points at full depth
SEED2 = 20261207
MAX_PEAK2_GIB = 50
RESERVE2_GIB = 60
BATCHES2 = [1, 2, 4, 8, 16]
SEQS2 = [256, 512, 1024, 2048]
OPTIMIZERS2 = {
    "full": ["adamw_torch", "adamw_torch_fused", "adamw_8bit"],
    "lora": ["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"],
    "nf4": ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"],
    "int8": ["adamw_8bit", "paged_adamw_8bit", "adamw_torch"],
}
TARGETS2 = ["all-linear", "all-linear", "all-linear", "q_proj,k_proj,v_proj,o_proj",
            "q_proj,v_proj"]


def plan2_for(rng: Any, slot: int, seqs: list[int] = SEQS2) -> dict[str, Any]:
    kind = ["full", "lora", "nf4", "int8"][(slot // 2) % 4]
    plan: dict[str, Any] = (
        {"method": kind} if kind in ("full", "lora")
        else {"method": "qlora", "quant": kind})
    plan["gradient_checkpointing"] = slot % 2 == 0
    plan["batch_size"] = rng.choice(BATCHES2)
    plan["seq_len"] = rng.choice(seqs)
    plan["optimizer"] = rng.choice(OPTIMIZERS2[kind])
    if kind != "full":
        plan["rank"] = rng.choice([8, 16, 64])
        plan["alpha"] = 2.0 * plan["rank"]
        plan["lora_dropout"] = rng.choice([0.0, 0.05, 0.1])
        plan["targets"] = rng.choice(TARGETS2)
    return plan


FUSED_TARGETS = {"q_proj,k_proj,v_proj,o_proj": "qkv_proj,o_proj", "q_proj,v_proj": "qkv_proj"}


def _fit2(name: str, layers: int | None, plan: dict[str, Any]) -> dict[str, Any]:
    """Halve the batch (then the sequence) until the estimated peak fits MAX_PEAK2_GIB. A
    fused-qkv model (phi-3) gets the drawn attention targets as its own module names."""
    spec = get_spec(name)
    spec = depth_cut(spec, layers) if layers else spec
    if "targets" in plan and any(lin.role == "qkv" for lin in spec.block_linears()):
        plan["targets"] = FUSED_TARGETS.get(plan["targets"], plan["targets"])
    while estimate(spec, TrainPlan.model_validate(plan)).peak_device_bytes \
            > MAX_PEAK2_GIB * GiB:
        if plan["batch_size"] > 1:
            plan["batch_size"] //= 2
        else:
            plan["seq_len"] //= 2
    return plan


def matrix2() -> dict[str, Any]:
    return _drawn_matrix(SEED2, ARCHS2, EXTRA2, "u")


def _drawn_matrix(seed: int, archs: dict[str, int | None], extra: dict[str, int],
                  prefix: str) -> dict[str, Any]:
    """One time worker point per architecture (`prefix`, its index, its name), each timing
    len(SLOTS) (+ `extra`) plans drawn by plan2_for from `seed` and fitted by _fit2."""
    import random

    rng = random.Random(seed)
    points = []
    for a, (name, layers) in enumerate(archs.items()):
        n = len(SLOTS) + extra.get(name, 0)
        points.append(time_group(f"{prefix}{a}-{name}", name, layers,
                                 [_fit2(name, layers, plan2_for(rng, j)) for j in range(n)],
                                 RESERVE2_GIB))
    # batch 1 and 16 both present (the range): the draws are checked, not forced
    batches = {s["plan"]["batch_size"] for g in points for s in g["job"]["points"]}
    if not {1, 16} <= batches:
        raise SystemExit(f"draw lacks batch 1 or 16: {sorted(batches)}")
    return {"points": points}


# ---- time holdout 3 (after runs 28 and 30 set the host constant and bitsandbytes' 8-bit
# kernel share; docs/time-model.md) ------------------------------------------------------
# Five architectures or sizes in neither holdout: qwen2.5-0.5b at full depth (24 layers,
# hidden 896, 152k tied vocabulary; 10 of the 42 points, about a quarter), llama-3.2-3b@8L
# (hidden 3072, 128k tied), qwen3-8b@4L (q/k norms, 152k untied), phi-2@8L (MHA, LayerNorm,
# plain GELU MLP with biases, partial rotary, 51k untied), mistral-nemo-12b@2L (hidden
# 5120 with 128-wide heads, 131k untied). Drawn as time 2 (plan2_for, _fit2: the same
# ranges and peak limit) with a new seed.
ARCHS3: dict[str, int | None] = {
    "qwen2.5-0.5b": None, "llama-3.2-3b": 8, "qwen3-8b": 4, "phi-2": 8,
    "mistral-nemo-12b": 2,
}
EXTRA3 = {"qwen2.5-0.5b": 2}
SEED3 = 20261208


def matrix3() -> dict[str, Any]:
    return _drawn_matrix(SEED3, ARCHS3, EXTRA3, "v")


# ---- time holdout 4 (after run 31: Python- vs engine-issued operators, phi-2's block,
# gelu_new's bytes, the host probe; docs/time-model.md) ----------------------------------
# Five architectures, none in holdouts 1-3 at any depth: tinyllama-1.1b at full depth (22
# layers, GQA 4 kv heads, 32k untied vocabulary; 10 of the 42 points, about a quarter),
# qwen2.5-7b@4L (q/k/v biases, 4 kv heads, 152k untied), gemma-2b@6L (MQA with 256-wide
# heads, GeGLU, 256k tied), llama-2-13b@2L (MHA, hidden 5120, 32k untied), qwen3-1.7b@8L
# (q/k norms, 152k tied). Drawn as times 2 and 3 (plan2_for, _fit2) with a new seed.
ARCHS4: dict[str, int | None] = {
    "tinyllama-1.1b": None, "qwen2.5-7b": 4, "gemma-2b": 6, "llama-2-13b": 2,
    "qwen3-1.7b": 8,
}
EXTRA4 = {"tinyllama-1.1b": 2}
SEED4 = 20261209


def matrix4() -> dict[str, Any]:
    return _drawn_matrix(SEED4, ARCHS4, EXTRA4, "w")


# ---- time holdout 5 (after run 32: the host is the machine's, centred on the four H100
# hosts seen; int8's forward overlaps between its syncs; Gemma's block counted;
# docs/time-model.md) --------------------------------------------------------------------
# Five catalog entries never timed at any depth: qwen3-0.6b at full depth (28 layers,
# hidden 1024, q/k norms, 152k tied vocabulary; 8 of the 40 points, a fifth),
# qwen2.5-3b@8L (q/k/v biases, 2 kv heads, hidden 2048, 152k tied), gemma-2-9b@3L
# (Gemma-2: eager attention, soft capping, four norms, hidden 3584, 256k tied),
# phi-3-medium@2L (fused qkv and gate_up: the drawn attention targets become qkv_proj,
# FUSED_TARGETS; hidden 5120, 10 kv heads, 32k untied), qwen3-14b@2L (q/k norms, hidden
# 5120, 152k untied). Drawn as times 2-4 (plan2_for, _fit2) with a new seed; eight points
# each (no extra points) and these depths keep `budget` at 329 s (<= 330 with the host
# constants of run 32's refit: 42 points at 4 to 12 layers said 351 s). phi-3-mini,
# mistral-7b and llama-3.1-8b were timed at 4 layers before (and the 7-8B ones do not fit
# 50 GiB at full depth with full fine-tuning), qwen2.5-0.5b at full depth.
ARCHS5: dict[str, int | None] = {
    "qwen3-0.6b": None, "qwen2.5-3b": 8, "gemma-2-9b": 3, "phi-3-medium": 2,
    "qwen3-14b": 2,
}
EXTRA5: dict[str, int] = {}
SEED5 = 20261210


def matrix5() -> dict[str, Any]:
    return _drawn_matrix(SEED5, ARCHS5, EXTRA5, "x")


# ---- LoRA vs full pairs (issue 30: "is LoRA really slower than full fine-tuning for small
# models?"; docs/time-model.md "LoRA vs full fine-tuning on a small model") -------------
# `vramcalc plan -m qwen2.5-0.5b --gpu rtx-4060-ti-16gb` says LoRA 0.309 s/step, full 0.181,
# QLoRA 0.414 (batch 1 x 512, checkpointing): LoRA's step there is the host's, the peft
# operators per adapted Linear (OPS_LORA_FWD / OPS_LORA_BWD) at the H100 hosts' cost. The
# committed step times hold no such pair (times 1-5 draw each method's batch, sequence and
# optimizer apart), so this matrix times the pairs themselves: the two small catalog models
# at full depth, each plan at batch 1 and 8 x 512 with checkpointing, the CLI's defaults
# (full: adamw_torch_fused; LoRA and QLoRA nf4: paged_adamw_8bit, r 16, alpha 32, dropout
# 0.05, all-linear, fp32 adapters), and LoRA at batch 1 with full's optimizer (the adapters
# without the optimizer's difference). Serial on one card (--max-parallel 1).
PAIR_ARCHS: dict[str, int | None] = {"qwen2.5-0.5b": None, "llama-3.2-1b": None}
PAIR_METHODS: list[dict[str, Any]] = [
    {"method": "full", "optimizer": "adamw_torch_fused"},
    {"method": "lora", "optimizer": "paged_adamw_8bit"},
    {"method": "qlora", "quant": "nf4", "optimizer": "paged_adamw_8bit"},
]
PAIR_BATCHES = [1, 8]
PAIR_RESERVE_GIB = 40
PAIR_GPUS = ("rtx-4060-ti-16gb", "rtx-4090")  # the derived cards the question is about


def pair_plans() -> list[dict[str, Any]]:
    plans = []
    for batch in PAIR_BATCHES:
        for m in PAIR_METHODS:
            plan: dict[str, Any] = {**m, "batch_size": batch, "seq_len": 512,
                                    "gradient_checkpointing": True}
            if m["method"] != "full":
                plan.update(rank=16, alpha=32.0, lora_dropout=0.05, targets="all-linear")
            plans.append(plan)
    plans.append({**plans[1], "optimizer": "adamw_torch_fused"})  # LoRA, full's optimizer
    return plans


def matrix_pairs() -> dict[str, Any]:
    return {"points": [
        time_group(f"p{a}-{name}", name, layers,
                   [_fit2(name, layers, plan) for plan in pair_plans()], PAIR_RESERVE_GIB)
        for a, (name, layers) in enumerate(PAIR_ARCHS.items())]}


PREDICTED_GPUS = ("h200", "h100-sxm")  # the run may get either card


def _predict_all(path: str, extra_gpus: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    speeds = {name: gpu_speed(resolve_gpu(name)) for name in (*PREDICTED_GPUS, *extra_gpus)}
    speed = speeds["h200"]
    assert speed is not None
    out = []
    for group in json.loads(open(path, encoding="utf-8").read())["points"]:
        spec = get_spec(group["spec"])
        spec = depth_cut(spec, group["layers"]) if group.get("layers") else spec
        for sub in group["job"]["points"]:
            plan = TrainPlan.model_validate(sub["plan"])
            st = step_time(train_work(spec, plan), speed)
            work = train_work(spec, plan)
            by_gpu = {name: round(step_time(work, sp).step_seconds, 6)
                      for name, sp in speeds.items() if sp is not None}
            out.append({"id": sub["id"], "gpu": "h200", "basis": st.basis,
                        "step_seconds": round(st.step_seconds, 6), "by_gpu": by_gpu,
                        "tokens_per_second": round(st.tokens_per_second, 1),
                        "gpu_seconds": round(st.gpu_seconds, 6),
                        "host_seconds": round(st.host_seconds, 6),
                        "steps": sub.get("steps", STEPS)})
    return out


def predictions(path: str, note: str, extra_gpus: tuple[str, ...] = ()) -> dict[str, Any]:
    """The step time of every point of matrix `path` on the H200 (`step_seconds`) and in
    `by_gpu` on the H100 SXM, the H200 and any `extra_gpus` (catalog names)."""
    return {"note": note, "points": _predict_all(path, extra_gpus)}


def budget(path: str) -> float:
    preds = _predict_all(path)
    groups = json.loads(open(path, encoding="utf-8").read())["points"]
    weights = WEIGHTS_S * -(-len(groups) // BUILD_PARALLEL)
    steps = sum(p["step_seconds"] * (p["steps"] + 1) for p in preds)
    total = weights + PROCESS_START_S * len(groups) + POINT_SETUP_S * len(preds) + steps
    print(f"{len(groups)} processes, {len(preds)} points: weights {weights:.0f} s, starts "
          f"{PROCESS_START_S * len(groups):.0f} s, set-up {POINT_SETUP_S * len(preds):.0f} s, "
          f"steps {steps:.0f} s; total {total:.0f} s")
    return total


def main(argv: list[str]) -> None:
    if argv[:1] == ["matrix"]:
        json.dump(matrix(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["matrix2"]:
        json.dump(matrix2(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["matrix3"]:
        json.dump(matrix3(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["matrix4"]:
        json.dump(matrix4(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["matrix5"]:
        json.dump(matrix5(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["matrix_pairs"]:
        json.dump(matrix_pairs(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["predict"] and len(argv) >= 3:
        json.dump(predictions(argv[1], argv[2], tuple(argv[3:])), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["budget"] and len(argv) == 2:
        budget(argv[1])
    else:
        raise SystemExit("usage: design_time.py matrix | matrix2 | matrix3 | matrix4 | matrix5 | "
                         "matrix_pairs | predict MATRIX NOTE [GPU ...] | budget MATRIX")


if __name__ == "__main__":
    main(sys.argv[1:])
