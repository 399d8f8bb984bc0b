"""Pre-registered points for issue 29 part B: packed and padding-free batches and
activation offloading, at full depth, on four architectures (vocabulary 32k to 256k).

    python calibration/design_pack.py calibration/matrices/h200-pack1-predictions.json \
        > calibration/matrices/h200-pack1.json
    python calibration/design_pack.py --holdout2 \
        calibration/matrices/h100-switch2-predictions.json > calibration/matrices/h100-switch2.json
    python calibration/design_pack.py --trlprep \
        calibration/matrices/h100-trlprep-predictions.json > calibration/matrices/h100-trlprep.json

Each technique point has its padded / not-offloaded twin (`base` in the point): the
measured difference is the technique's, and the predictions (the raw estimate at the
commit that writes this file, with the host bytes) are committed before any run. Every
point runs under `--loop trainer` (the worker measures layouts and offloading there only:
calibrate/offload.py). gemma-2 runs eager (transformers 5 refuses sdpa for it).
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.calibrate.store import Prediction  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402

GiB = 2**30
LIMIT_GIB = 70.0
# the plan fields of the techniques: a point without them is its base (twin)
TECHNIQUE = ("layout", "tokens_per_step", "offload_activations", "loss_kernel", "kbit_prep",
             "adapter_dtype")
# every point's predicted peak device stays under LIMIT_GIB

# (model, base plan, [(suffix, technique changes)])
CASES: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = [
    ("llama-3.2-1b", {"method": "qlora", "batch_size": 4, "seq_len": 2048}, [
        ("pf", {"layout": "padding-free"}),
        ("pf5000", {"layout": "padding-free", "tokens_per_step": 5000}),
        ("packed", {"layout": "packed"}),
        ("ckoff", {"offload_activations": "checkpoints"}),
        ("alloff-nogc", {"offload_activations": "all", "gradient_checkpointing": False}),
    ]),
    ("qwen2.5-1.5b", {"method": "lora", "batch_size": 4, "seq_len": 2048}, [
        ("pf", {"layout": "padding-free", "batch_size": 2, "seq_len": 4096}),
        ("ckoff", {"offload_activations": "checkpoints"}),
        ("alloff", {"offload_activations": "all"}),
    ]),
    ("mistral-7b", {"method": "qlora", "batch_size": 4, "seq_len": 2048}, [
        ("pf", {"layout": "padding-free"}),
        ("ckoff", {"offload_activations": "checkpoints", "seq_len": 4096}),
        ("alloff-nogc", {"offload_activations": "all", "gradient_checkpointing": False,
                         "batch_size": 2}),
    ]),
    ("gemma-2-2b", {"method": "qlora", "batch_size": 2, "seq_len": 2048, "attn": "eager"}, [
        ("pf", {"layout": "padding-free"}),
        ("ckoff", {"offload_activations": "checkpoints", "batch_size": 4}),
        ("alloff-nogc", {"offload_activations": "all", "gradient_checkpointing": False,
                         "seq_len": 1024}),
    ]),
]
# Switch holdout 2 (`--holdout2`, after run 32's traces: the first layer's offloaded input
# held as a leaf, chunked CE's capping after every chunk's matmul): the two techniques
# run 31/32 missed, at full depth, on architectures they were not measured on
CASES2: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = [
    ("qwen2.5-7b", {"method": "qlora", "batch_size": 2, "seq_len": 4096}, [
        ("ckoff", {"offload_activations": "checkpoints"}),
    ]),
    ("phi-3-mini", {"method": "qlora", "batch_size": 4, "seq_len": 2048}, [
        ("ckoff", {"offload_activations": "checkpoints"}),
    ]),
    ("gemma-2-9b", {"method": "qlora", "batch_size": 2, "seq_len": 2048, "attn": "eager"}, [
        ("ckoff", {"offload_activations": "checkpoints"}),
        ("chunked", {"loss_kernel": "chunked"}),
    ]),
    ("gemma-2b", {"method": "qlora", "batch_size": 4, "seq_len": 2048}, [
        ("chunked", {"loss_kernel": "chunked"}),
    ]),
]


# TRL's QLoRA preparation (`--trlprep`, issue 29): SFTTrainer calls no
# prepare_model_for_kbit_training and casts the adapters to bf16 (TrainPlan.kbit_prep False,
# adapter_dtype bf16), each point with its kbit-prepared, fp32-adapter twin; full depth,
# three architectures, torch loss, the trainer loop, adamw_torch_fused (TRL's optimizer:
# its states follow the adapters' dtype), every predicted peak device under 30 GiB
LIMIT_TRLPREP_GIB = 30.0
TRL_PREP = {"kbit_prep": False, "adapter_dtype": "bf16"}
CASES3: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = [
    (model, {"method": "qlora", "quant": "nf4", "batch_size": batch, "seq_len": 2048,
             "optimizer": "adamw_torch_fused"}, [("trl", TRL_PREP)])
    for model, batch in (("llama-3.2-3b", 4), ("qwen2.5-3b", 2), ("mistral-7b", 4))
]


def points(cases: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = CASES,
           prefix: str = "k") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    n = 0

    def add(pid: str, model: str, plan: dict[str, Any], base: str | None) -> None:
        nonlocal n
        spec = get_spec(model)
        train = TrainPlan.model_validate(plan)
        est = estimate(spec, train)
        assert est.peak_device_bytes < LIMIT_GIB * GiB, (pid, est.peak_device_bytes / GiB)
        point: dict[str, Any] = {"id": f"{prefix}{n:03d}-{pid}", "spec": model,
                                 "plan": train.model_dump(mode="json", exclude_defaults=True),
                                 "steps": 3}
        if base is not None:
            point["base"] = base
        out.append(point)
        preds.append({"id": point["id"], **Prediction.of(est).model_dump(mode="json"),
                      "required_device_bytes": est.required_device_bytes,
                      "host_bytes": est.host_bytes})
        n += 1

    bases: dict[str, str] = {}  # the twin's plan (JSON) -> its id
    for model, base, techniques in cases:
        for suffix, changes in techniques:
            plan = {**base, **changes}
            twin = {k: v for k, v in plan.items() if k not in TECHNIQUE}
            key = json.dumps([model, twin], sort_keys=True)
            if key not in bases:
                bases[key] = f"{prefix}{n:03d}-{model}-base{len(bases)}"
                add(f"{model}-base{len(bases) - 1}", model, twin, None)
            add(f"{model}-{suffix}", model, plan, bases[key])
    return out, preds


def main(argv: list[str]) -> int:
    name = "h200-pack1"
    if argv[:1] == ["--trlprep"]:
        global LIMIT_GIB
        LIMIT_GIB = LIMIT_TRLPREP_GIB
        argv, name = argv[1:], "h100-trlprep"
        pts, preds = points(CASES3, "p")
        note = ("issue 29: QLoRA as TRL's SFTTrainer prepares it (no "
                "prepare_model_for_kbit_training, bf16 adapters: kbit_prep false, adapter_dtype "
                "bf16), full depth, 3 architectures, each with its kbit-prepared twin; "
                "predictions in h100-trlprep-predictions.json, committed before any run")
    elif argv[:1] == ["--holdout2"]:
        argv, name = argv[1:], "h100-switch2"
        pts, preds = points(CASES2, "s")
        note = ("issue 29 switch holdout 2: offloaded checkpoints and chunked CE after run 32's "
                "traces, full depth, 4 architectures not measured with them, each technique "
                "with its base; predictions in h100-switch2-predictions.json, committed "
                "before any run")
    else:
        pts, preds = points()
        note = ("issue 29 part B: packed / padding-free batches and activation offloading, "
                "full depth, 4 architectures (vocab 32k-256k), each technique with its base; "
                "predictions in h200-pack1-predictions.json, committed before any run")
    json.dump({"note": note, "points": pts}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            json.dump({"note": f"raw estimator predictions (no correction) of {name}.json, "
                       "written by calibration/design_pack.py before any run", "points": preds},
                      f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
