"""Runs 37 and 42: a user's calibration sets the host factor, measured end to end (issue 30).

    python calibration/design_hostcal.py matrix > calibration/matrices/h100-hostcal37.json
    python calibration/design_hostcal.py cal          # writes the calibrate-run matrices
    python calibration/design_hostcal.py specs DIR    # writes the depth cuts as spec YAMLs
    python calibration/design_hostcal.py budget calibration/matrices/h100-hostcal37.json
    python calibration/design_hostcal.py predict MATRIX SPECS GPU OUT.json [--no-calibration]
    python calibration/design_hostcal.py fake DATA OUT.jsonl GPU H   # the dry run's inputs

Run 42 (time holdout 6, MATRIX6 below; calibration/device/run42-time6.sh) is the same
protocol on another matrix and step a: `matrix6`, and `cal`, `specs DIR`, `fake ...` with
its matrix as the last argument (calibration/matrices/h100-time6.json); `budget` of a
design's matrix also prints the whole call's seconds (call_budget).

The protocol (calibration/device/run37-hostcal.sh, docs/time-model.md "End-to-end host
calibration"): on the device, (a) `vramcalc calibrate run` as a user runs it, on two
catalog models at full depth, three plans each (CAL, below: the `--matrix` files), into a
fresh DATA folder; (b) before any test point is measured, `vramcalc plan --json` for every
test point with VRAMCALC_DATA_DIR=DATA (the host factor fitted on step a's runs,
`timing/host_calibration.py`) and with `--no-calibration`, both saved; (c) the test matrix
(this file's `matrix`) timed by the time worker, serially.

The test matrix: three architectures, none of step a's models: tinyllama-1.1b at full
depth (22 layers, hidden 2048: host-bound at small batches), smollm2-1.7b@8L (MHA, 49k
vocabulary) and llama-3.1-8b@4L (hidden 4096, 128k vocabulary: GPU-bound at 4k-16k tokens
per step). Eight plans each: full, 16-bit LoRA, QLoRA nf4 and int8 LoRA, each with
checkpointing on (even slots) and off; batches and sequences chosen per architecture
(BATCH_SEQ) so that every method has a batch 1-2 point and the 8B cut has GPU-bound ones.
Every estimated peak <= MAX_PEAK_GIB (design_time._fit2).

`predict` runs `python -m vramcalc plan ... --json` (the user's command; a depth cut is
the spec YAML `specs` wrote, `-m DIR/NAME@nL.yaml`) for every test point, eight at a time,
and writes {"gpu", "calibration", "points": [{"id", "argv", "plan_json"}]}. It exits 1
with one line when a plan fails, or when a calibrated plan is not "calibrated"
(time_basis) -- the calibration was not found.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "calibration"))

from design_time import (  # noqa: E402
    BUILD_PARALLEL,
    POINT_SETUP_S,
    PROCESS_START_S,
    RESERVE2_GIB,
    WEIGHTS_S,
    _fit2,
    plan2_for,
    time_group,
)

MATRIX = "calibration/matrices/h100-hostcal37.json"
RESERVE_GIB = 60
ARCHS: dict[str, int | None] = {
    "tinyllama-1.1b": None, "smollm2-1.7b": 8, "llama-3.1-8b": 4,
}
SLOT_METHODS: list[dict[str, Any]] = [
    {"method": "full"}, {"method": "full"},
    {"method": "lora"}, {"method": "lora"},
    {"method": "qlora", "quant": "nf4"}, {"method": "qlora", "quant": "nf4"},
    {"method": "qlora", "quant": "int8"}, {"method": "qlora", "quant": "int8"},
]
# (batch, sequence) per slot: the small model host-bound, the 8B cut mostly GPU-bound
BATCH_SEQ: dict[str, list[tuple[int, int]]] = {
    "tinyllama-1.1b": [(2, 512), (1, 1024), (1, 512), (2, 256), (1, 1024), (2, 512),
                       (4, 512), (1, 256)],
    "smollm2-1.7b": [(8, 1024), (2, 512), (1, 512), (16, 512), (4, 1024), (1, 256),
                     (2, 1024), (8, 512)],
    "llama-3.1-8b": [(8, 2048), (4, 1024), (16, 1024), (2, 2048), (8, 2048), (1, 1024),
                     (4, 2048), (16, 512)],
}
OPTIMIZER = {"full": ["adamw_torch_fused", "adamw_torch"], "lora": ["adamw_torch"],
             "nf4": ["paged_adamw_8bit"], "int8": ["adamw_8bit"]}

# Step a: what a user calibrating small models runs (`calibrate run -m M ... --matrix F
# --out DATA`), three plans per model, its defaults otherwise (--steps 3: the median of
# steps 2 and 3, calibrate/run.py step_seconds). Models outside the test matrix.
CAL: dict[str, list[dict[str, Any]]] = {
    "qwen2.5-0.5b": [
        {"method": "lora", "quant": "none", "batch_size": 2, "seq_len": 512,
         "optimizer": "adamw_torch", "gradient_checkpointing": True},
        {"method": "qlora", "quant": "nf4", "batch_size": 1, "seq_len": 1024,
         "optimizer": "paged_adamw_8bit", "gradient_checkpointing": False},
        {"method": "full", "quant": "none", "batch_size": 8, "seq_len": 512,
         "optimizer": "adamw_torch_fused", "gradient_checkpointing": True},
    ],
    "llama-3.2-1b": [
        {"method": "qlora", "quant": "nf4", "batch_size": 2, "seq_len": 512,
         "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
        {"method": "lora", "quant": "none", "batch_size": 4, "seq_len": 1024,
         "optimizer": "adamw_torch", "gradient_checkpointing": False},
        {"method": "qlora", "quant": "int8", "batch_size": 1, "seq_len": 512,
         "optimizer": "adamw_8bit", "gradient_checkpointing": False},
    ],
}


class Design(NamedTuple):
    """One end-to-end run: its test matrix, step a's `calibrate run` plans per model (in
    `cal_file`, {model} filled in), the folder of its depth cuts' spec YAMLs, the device
    script's bound on step a (seconds) and the jsonl the script writes its test points to
    (bench/host_calibration_e2e.py reads the committed predictions of that stem)."""

    matrix: str
    archs: dict[str, int | None]
    cal: dict[str, list[dict[str, Any]]]
    cal_file: str
    specs: str
    cal_s: int
    jsonl: str


RUN37 = Design(MATRIX, ARCHS, CAL, "calibration/matrices/hostcal37-cal-{model}.json",
               "calibration/matrices/hostcal37-specs", 120, "hostcal37.jsonl")


def cal_path(model: str, design: Design = RUN37) -> str:
    return design.cal_file.format(model=model)


def plan_for(name: str, slot: int) -> dict[str, Any]:
    plan: dict[str, Any] = dict(SLOT_METHODS[slot])
    plan["gradient_checkpointing"] = slot % 2 == 0
    plan["batch_size"], plan["seq_len"] = BATCH_SEQ[name][slot]
    kind = plan.get("quant", plan["method"])
    plan["optimizer"] = OPTIMIZER[kind][slot % len(OPTIMIZER[kind])]
    return plan


def matrix() -> dict[str, Any]:
    return {"points": [
        time_group(f"h{a}-{name}", name, layers,
                   [_fit2(name, layers, plan_for(name, j)) for j in range(len(SLOT_METHODS))],
                   RESERVE_GIB)
        for a, (name, layers) in enumerate(ARCHS.items())]}


# ---- run 42: time holdout 6 in run 37's protocol (docs/time-model.md "Time holdout 6") ---
# Three catalog models at depths no time matrix holds (h200-time1..5, h100-hostcal37,
# h100-lorapair), neither step a's: qwen3-1.7b at full depth (28 layers, hidden 2048, q/k
# norms, 152k tied: host-bound, predicted host share 0.6-1.0 of the step; timed before at
# 8 layers only), llama-2-7b@6L (MHA, hidden 4096, 32k untied: the body outweighs the
# vocabulary) and llama-3.1-70b@2L (hidden 8192, no model this wide was timed; 128k untied:
# GPU-bound at a few thousand tokens). Every method with checkpointing on and off, drawn as
# holdouts 2-5 (design_time.plan2_for: batch 1-16, optimizer, rank, dropout, targets) with
# a new seed and sequences 256-4096; _fit2 keeps every estimated peak <= 50 GiB, then a
# point whose predicted H100 step (host factor 1) is over STEP_CAP6_S and GPU-bound is
# halved (batch, then sequence) to keep the call's budget: halving a host-bound step
# would not shorten it. Step a: qwen2.5-0.5b's first two plans of run 37 (the same plans
# timed on another host), bounded at 65 s (run 37: 76 s for all three).
MATRIX6 = "calibration/matrices/h100-time6.json"
ARCHS6: dict[str, int | None] = {"qwen3-1.7b": None, "llama-2-7b": 6, "llama-3.1-70b": 2}
POINTS6 = {"qwen3-1.7b": 10, "llama-2-7b": 11, "llama-3.1-70b": 11}
SEED6 = 20261242
SEQS6 = [256, 512, 1024, 2048, 4096]
STEP_CAP6_S = 0.3
CAL6 = {"qwen2.5-0.5b": CAL["qwen2.5-0.5b"][:2]}
RUN42 = Design(MATRIX6, ARCHS6, CAL6, "calibration/matrices/time6-cal-{model}.json",
               "calibration/matrices/time6-specs", 65, "time6.jsonl")
DESIGNS = {d.matrix: d for d in (RUN37, RUN42)}


def _fit6(name: str, layers: int | None, plan: dict[str, Any]) -> dict[str, Any]:
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import depth_cut, get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import step_time, train_work

    plan = _fit2(name, layers, plan)
    spec = get_spec(name)
    spec = depth_cut(spec, layers) if layers else spec
    speed = gpu_speed(resolve_gpu("h100-sxm"))
    assert speed is not None
    while plan["batch_size"] > 1 or plan["seq_len"] > SEQS6[0]:
        st = step_time(train_work(spec, TrainPlan.model_validate(plan)), speed)
        if st.step_seconds <= STEP_CAP6_S or st.gpu_seconds <= st.host_seconds:
            break
        if plan["batch_size"] > 1:
            plan["batch_size"] //= 2
        else:
            plan["seq_len"] //= 2
    return plan


def matrix6() -> dict[str, Any]:
    import random

    rng = random.Random(SEED6)
    points = [time_group(f"z{a}-{name}", name, layers,
                         [_fit6(name, layers, plan2_for(rng, j, SEQS6))
                          for j in range(POINTS6[name])], RESERVE2_GIB)
              for a, (name, layers) in enumerate(ARCHS6.items())]
    batches = {s["plan"]["batch_size"] for g in points for s in g["job"]["points"]}
    if not {1, 16} <= batches:  # the range: the draw is checked, not forced
        raise SystemExit(f"draw lacks batch 1 or 16: {sorted(batches)}")
    return {"points": points}


def write_cal(design: Design = RUN37) -> None:
    for model, plans in design.cal.items():
        path = ROOT / cal_path(model, design)
        path.write_text(json.dumps([{"plan": p} for p in plans], indent=1) + "\n",
                        encoding="utf-8")
        print(path.relative_to(ROOT))


def write_specs(folder: Path, design: Design = RUN37) -> None:
    """The matrix's depth cuts as spec YAMLs (`plan -m FILE.yaml`: a user's own spec)."""
    import yaml

    from vramcalc.models.spec import depth_cut, get_spec

    folder.mkdir(parents=True, exist_ok=True)
    for name, layers in design.archs.items():
        if not layers:
            continue
        spec = depth_cut(get_spec(name), layers)
        (folder / f"{spec.name}.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False),
            encoding="utf-8")
        print(folder / f"{spec.name}.yaml")


# TrainPlan field -> `plan` option; booleans are --x / --no-x
FLAGS = {"method": "--method", "quant": "--quant", "batch_size": "--batch",
         "seq_len": "--seq-len", "optimizer": "--optimizer", "rank": "--rank",
         "alpha": "--alpha", "lora_dropout": "--lora-dropout", "targets": "--targets",
         "attn": "--attn"}
BOOLS = {"gradient_checkpointing": "gradient-checkpointing"}


def plan_argv(group: dict[str, Any], plan: dict[str, Any], specs: Path, gpu: str,
              calibration: bool) -> list[str]:
    """`python -m vramcalc plan` for one matrix point (an unknown plan field is an error:
    the mapping must cover every field the matrix sets)."""
    layers = group.get("layers")
    model = str(specs / f"{group['spec']}@{layers}L.yaml") if layers else group["spec"]
    argv = [sys.executable, "-m", "vramcalc", "plan", "-m", model]
    if plan.get("method") == "qlora" and "quant" not in plan:
        raise SystemExit(f"{group['id']}: a qlora plan without quant")
    for key, value in plan.items():
        if key in FLAGS:
            argv += [FLAGS[key], str(value)]
        elif key in BOOLS:
            argv.append(f"--{BOOLS[key]}" if value else f"--no-{BOOLS[key]}")
        else:
            raise SystemExit(f"{group['id']}: plan field {key!r} has no option here")
    if plan.get("method") in ("lora", "full") and "quant" not in plan:
        argv += ["--quant", "none"]
    argv += ["--gpu", gpu, "--json"]
    if not calibration:
        argv.append("--no-calibration")
    return argv


def predict(matrix_path: str, specs: Path, gpu: str, out: Path, calibration: bool) -> int:
    groups = json.loads(Path(matrix_path).read_text(encoding="utf-8"))["points"]
    jobs = [(sub["id"], plan_argv(g, sub["plan"], specs, gpu, calibration))
            for g in groups for sub in g["job"]["points"]]

    def one(job: tuple[str, list[str]]) -> tuple[str, list[str], subprocess.CompletedProcess[str]]:
        return job[0], job[1], subprocess.run(job[1], capture_output=True, text=True,
                                              timeout=120)

    def good(proc: subprocess.CompletedProcess[str]) -> bool:
        if proc.returncode not in (0, 3):
            return False
        try:
            return not calibration or json.loads(proc.stdout).get("time_basis") == "calibrated"
        except ValueError:
            return False

    done = [one(jobs[0])]  # the first alone: a missing calibration fails in a second
    if good(done[0][2]):
        with ThreadPoolExecutor(8) as pool:
            done += list(pool.map(one, jobs[1:]))
    points = []
    for pid, argv, proc in done:
        if proc.returncode not in (0, 3):  # 3: does not fit the card (still timed)
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"Error: plan for {pid} exited {proc.returncode}: {err}", file=sys.stderr)
            return 1
        doc = json.loads(proc.stdout)
        if calibration and doc.get("time_basis") != "calibrated":
            print(f"Error: plan for {pid} is not calibrated (time_basis "
                  f"{doc.get('time_basis')!r}: no run of this card under the data folder)",
                  file=sys.stderr)
            return 1
        points.append({"id": pid, "argv": argv[3:], "plan_json": doc})
    out.write_text(json.dumps({"gpu": gpu, "calibration": calibration, "points": points},
                              indent=1) + "\n", encoding="utf-8")
    first = points[0]["plan_json"]
    print(f"{len(points)} plans on {gpu}, calibration {'on' if calibration else 'off'}: "
          f"basis {first.get('time_basis')}, host factor {first.get('host_factor')}; "
          f"{first.get('time_calibration') or ''}")
    return 0


def _model_seconds(spec: Any, plan: dict[str, Any], gpu: str, h: float) -> float:
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.plans import TrainPlan
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import step_time, train_work

    speed = gpu_speed(resolve_gpu(gpu))
    assert speed is not None
    return step_time(train_work(spec, TrainPlan.model_validate(plan)),
                     speed._replace(host_factor=h)).step_seconds


def fake(data: Path, out: Path, gpu: str, h: float, design: Design = RUN37) -> None:
    """What the device would leave, made by the time model at host factor `h` (no GPU: the
    dry run of run37-hostcal.sh and tests/timing/test_hostcal_e2e.py): DATA/runs/ a run of
    CAL's points (calibrate/store.py, the card's NVML name and memory) and OUT a matrix
    driver's jsonl of the test matrix, each test step `h` x the model's times 1.0 / 1.1
    alternately (a known error to score)."""
    from vramcalc.calibrate import store
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import depth_cut, get_spec
    from vramcalc.plans import TrainPlan

    card = resolve_gpu(gpu)
    run = store.new_run(store.Environment(gpu_name=card.nvml_names[0],
                                          gpu_memory_bytes=card.memory_bytes))
    for model, plans in design.cal.items():
        for plan in plans:
            secs = _model_seconds(get_spec(model), plan, gpu, h)
            run.points.append(store.RunPoint(model=model, plan=TrainPlan.model_validate(plan),
                                             steps=3, measurement={"step_seconds": secs}))
    store.write_run(data / store.RUNS_DIR / store.run_file_name(run), run)
    lines = []
    for g in json.loads((ROOT / design.matrix).read_text(encoding="utf-8"))["points"]:
        spec = get_spec(g["spec"])
        spec = depth_cut(spec, g["layers"]) if g.get("layers") else spec
        subs = [{"id": s["id"], "plan": s["plan"], "status": "ok",
                 "step_seconds": _model_seconds(spec, s["plan"], gpu, h) * (1 + 0.1 * (k % 2))}
                for k, s in enumerate(g["job"]["points"])]
        meas = {"points": subs, "device_name": card.nvml_names[0]}
        lines.append(json.dumps({"id": g["id"], "status": "ok", "spec": g["spec"],
                                 "layers": g.get("layers"), "timing_grade": True,
                                 "measurement": meas}))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def budget(path: str) -> float:
    from design_time import _predict_all

    preds = _predict_all(path)
    groups = json.loads(Path(path).read_text(encoding="utf-8"))["points"]
    weights = WEIGHTS_S * -(-len(groups) // BUILD_PARALLEL)
    steps = sum(p["by_gpu"]["h100-sxm"] * (p["steps"] + 1) for p in preds)
    total = weights + PROCESS_START_S * len(groups) + POINT_SETUP_S * len(preds) + steps
    print(f"{len(groups)} processes, {len(preds)} points: weights {weights:.0f} s, starts "
          f"{PROCESS_START_S * len(groups):.0f} s, set-up {POINT_SETUP_S * len(preds):.0f} s, "
          f"steps {steps:.0f} s (h100-sxm, host factor 1); total {total:.0f} s")
    return total


# The call's other parts, from run 37 (calibration/h100/run37/prereg.txt, t+ stamps): the
# wheels' install and the CLI's preflight before step a (t+3 s), both `predict` passes (48
# plans in 7 s: 0.15 s a plan, eight at a time), the tar and the scoring after the matrix
# (2 s; 5 counted).
INSTALL_S = 3.0
PREDICT_S_PER_PLAN = 0.15
PACK_S = 5.0


def call_budget(design: Design) -> float:
    """The whole device call (the machine's start not counted): install, step a at its
    bound, the two `predict` passes, the matrix by `budget`, the tar and the scoring."""
    matrix_s = budget(str(ROOT / design.matrix))
    groups = json.loads((ROOT / design.matrix).read_text(encoding="utf-8"))["points"]
    plans = sum(len(g["job"]["points"]) for g in groups)
    predict_s = 2 * plans * PREDICT_S_PER_PLAN
    total = INSTALL_S + design.cal_s + predict_s + matrix_s + PACK_S
    print(f"call: install {INSTALL_S:.0f} s, calibrate run <= {design.cal_s} s, predict "
          f"{predict_s:.0f} s ({2 * plans} plans), matrix {matrix_s:.0f} s, tar and score "
          f"{PACK_S:.0f} s; total {total:.0f} s")
    return total


def _design(path: str) -> Design | None:
    full = Path(path).resolve()
    return next((d for d in DESIGNS.values() if (ROOT / d.matrix).resolve() == full), None)


def main(argv: list[str]) -> int:
    design = _design(argv[-1]) if argv else None
    if argv[:1] in (["matrix"], ["matrix6"]):
        json.dump(matrix() if argv[0] == "matrix" else matrix6(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif argv[:1] == ["cal"] and (len(argv) == 1 or (len(argv) == 2 and design)):
        write_cal(design or RUN37)
    elif argv[:1] == ["specs"] and (len(argv) == 2 or (len(argv) == 3 and design)):
        write_specs(Path(argv[1]), design or RUN37)
    elif argv[:1] == ["fake"] and (len(argv) == 5 or (len(argv) == 6 and design)):
        fake(Path(argv[1]), Path(argv[2]), argv[3], float(argv[4]), design or RUN37)
    elif argv[:1] == ["budget"] and len(argv) == 2:
        if design:
            call_budget(design)
        else:
            budget(argv[1])
    elif argv[:1] == ["predict"] and len(argv) in (5, 6) and argv[5:] in ([], ["--no-calibration"]):
        return predict(argv[1], Path(argv[2]), argv[3], Path(argv[4]), len(argv) == 5)
    else:
        print("usage: design_hostcal.py matrix | matrix6 | cal [MATRIX] | specs DIR [MATRIX] | "
              "budget MATRIX | predict MATRIX SPECS GPU OUT.json [--no-calibration] | "
              "fake DATA OUT.jsonl GPU H [MATRIX]  (MATRIX: run 37's or run 42's)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
