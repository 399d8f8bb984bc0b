"""Draw the measurement matrices at random from a seed (issue 10's designed matrix).

    python calibration/design.py design   > calibration/matrices/h200-design.json
    python calibration/design.py holdout  > calibration/matrices/h200-holdout.json
    python calibration/design.py holdout3 > calibration/matrices/h200-holdout3.json
    python calibration/design.py holdout4 > calibration/matrices/h200-holdout4.json
    python calibration/design.py holdout6 > calibration/matrices/h200-holdout6.json
    python calibration/design.py holdout15 > calibration/matrices/h200-holdout15.json
    python calibration/design.py holdout16 > calibration/matrices/h200-holdout16.json
    python calibration/design.py predict MATRIX.json "NOTE" > PREDICTIONS.json

`design`: 16 architectures (MHA, GQA, MQA, tied/untied, 32k-256k vocabularies, fused
modules, qk-norm, softcapping, plain gelu_new MLP with residual dropout, MoE with few large
and many small experts), each point drawn at random over method x quantization x compute
dtype x checkpointing x attention x optimizer x rank x targets x batch x sequence length x
loop x allocator, plus allocator-trace points and emulated-card boundary points.
`holdout`: architectures never used in `design` (OLMo-2, StarCoder2, Gemma-3, StableLM,
Qwen2-MoE, Mistral-NeMo), drawn the same way; its predictions are committed before the run.

Large models are depth-cut (same shapes, fewer layers); small ones run at full depth. A
draw whose predicted peak passes `MAX_PEAK_GIB` is redrawn, so points run side by side.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.errors import PlanError  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.hf_config import spec_from_hf_config  # noqa: E402
from vramcalc.models.spec import ModelSpec, depth_cut, get_spec  # noqa: E402
from vramcalc.plans import LOOP_NAMES, TrainPlan, current_loop_names  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

MAX_PEAK_GIB = 60

# name -> layers measured (None: full depth)
DESIGN_ARCHS: dict[str, int | None] = {
    "llama-2-7b": 4, "llama-3.1-8b": 4, "mistral-7b": 4, "qwen2.5-7b": 4,
    "qwen2.5-0.5b": None, "qwen3-8b": 4, "phi-3-mini": 4, "phi-2": 6, "gemma-2-2b": 6,
    "gemma-2-9b": 4, "falcon-7b": 4, "tinyllama-1.1b": None, "llama-3.2-1b": None,
    "mixtral-8x7b": 2, "qwen3-moe": 2, "smollm2-1.7b": 8,
}

# Configs of architectures outside the catalog, as their config.json files give them.
INLINE_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B config.json (128 experts, top 8)
    "qwen3-moe": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
                  "intermediate_size": 6144, "moe_intermediate_size": 768,
                  "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                  "tie_word_embeddings": False, "max_position_embeddings": 40960,
                  "rope_theta": 1000000.0},
    # allenai/OLMo-2-1124-7B config.json
    "olmo2-7b": {"model_type": "olmo2", "vocab_size": 100352, "hidden_size": 4096,
                 "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32,
                 "tie_word_embeddings": False, "max_position_embeddings": 4096,
                 "rope_theta": 500000},
    # bigcode/starcoder2-7b config.json
    "starcoder2-7b": {"model_type": "starcoder2", "vocab_size": 49152, "hidden_size": 4608,
                      "intermediate_size": 18432, "num_hidden_layers": 32,
                      "num_attention_heads": 36, "num_key_value_heads": 4,
                      "hidden_act": "gelu_pytorch_tanh", "use_bias": True,
                      "max_position_embeddings": 16384, "sliding_window": 4096,
                      "rope_theta": 1000000},
    # google/gemma-3-1b-pt config.json (text-only gemma3_text)
    "gemma-3-1b": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
                   "intermediate_size": 6912, "num_hidden_layers": 26,
                   "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512,
                   "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
                   "rope_theta": 1000000, "tie_word_embeddings": True},
    # stabilityai/stablelm-2-1_6b config.json
    "stablelm-2-1.6b": {"model_type": "stablelm", "vocab_size": 100352, "hidden_size": 2048,
                        "intermediate_size": 5632, "num_hidden_layers": 24,
                        "num_attention_heads": 32, "num_key_value_heads": 32,
                        "use_qkv_bias": True, "partial_rotary_factor": 0.25,
                        "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # Qwen/Qwen1.5-MoE-A2.7B config.json (60 experts, top 4, a shared expert)
    "qwen2-moe": {"model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048,
                  "intermediate_size": 5632, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
                  "num_experts_per_tok": 4, "max_position_embeddings": 8192,
                  "tie_word_embeddings": False},
}

HOLDOUT_ARCHS: dict[str, int | None] = {
    "olmo2-7b": 4, "starcoder2-7b": 4, "gemma-3-1b": 8, "stablelm-2-1.6b": None,
    "qwen2-moe": 2, "mistral-nemo-12b": 4,
}

METHODS = [  # (weight, plan fields)
    (30, {"method": "qlora", "quant": "nf4"}),
    (4, {"method": "qlora", "quant": "nf4", "double_quant": False}),
    (4, {"method": "qlora", "quant": "fp4"}),
    (12, {"method": "qlora", "quant": "int8"}),
    (20, {"method": "lora"}),
    (14, {"method": "full"}),
    (8, {"method": "full", "weights_dtype": "fp32"}),
]
LORA_OPTIMIZERS = ["paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused",
                   "paged_adamw_32bit", "sgd"]
FULL_OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"]
SEQ_LENS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def spec_named(name: str) -> ModelSpec:
    if name in INLINE_CONFIGS:
        return spec_from_hf_config(dict(INLINE_CONFIGS[name]), name, name=name)
    return get_spec(name)


def cut(name: str, layers: int | None) -> ModelSpec:
    spec = spec_named(name)
    return depth_cut(spec, layers) if layers else spec


def weighted(rng: random.Random, options: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    total = sum(w for w, _ in options)
    x = rng.uniform(0, total)
    for w, o in options:
        x -= w
        if x <= 0:
            return dict(o)
    return dict(options[-1][1])


def draw_plan(rng: random.Random, spec: ModelSpec, plain: str = "plain-outputs"
              ) -> dict[str, Any]:
    plan = weighted(rng, METHODS)
    full = plan["method"] == "full"
    if rng.random() < 0.15:
        plan["compute_dtype"] = "fp16"
        if full:
            plan["weights_dtype"] = "fp32"  # fp16 Trainer needs fp32 master weights
        elif plan["method"] == "lora":
            plan["weights_dtype"] = "fp16"
    plan["gradient_checkpointing"] = rng.random() < 0.6
    plan["attn"] = "eager" if rng.random() < 0.2 else "sdpa"
    plan["optimizer"] = rng.choice(FULL_OPTIMIZERS if full else LORA_OPTIMIZERS)
    if not full:
        plan["rank"] = rng.choice([8, 16, 32, 64, 128])
        t = rng.random()
        if t < 0.2 and spec.attention_layout == "separate":
            plan["targets"] = ",".join(spec.module_name(r) for r in ("q", "k", "v", "o"))
        elif t < 0.3 and spec.attention_layout == "separate":
            plan["targets"] = ",".join(spec.module_name(r) for r in ("q", "v"))
        plan["lora_dropout"] = 0.0 if (rng.random() < 0.2 or spec.is_moe) else 0.05
    plan["batch_size"] = rng.choice([1, 1, 2, 4, 8])
    seqs = SEQ_LENS if plan["attn"] == "sdpa" else SEQ_LENS[:5]
    plan["seq_len"] = rng.choice(seqs)
    if rng.random() < 0.15:
        plan["loop"] = plain  # runs 1-9 drew the loop that keeps `out` (plain-outputs)
    if rng.random() < 0.15:
        plan["expandable_segments"] = True
    return plan


def predicted_gib(spec: ModelSpec, plan: dict[str, Any], loop_names: int = 1) -> float:
    """The predicted peak device of a drawn plan, whose loop names are `loop_names`' (1:
    the names of the matrices before issue 27, plan_settings.LEGACY_LOOPS)."""
    est = estimate(spec, TrainPlan.model_validate(current_loop_names(plan, loop_names)))
    return est.peak_device_bytes / GiB


def random_points(archs: dict[str, int | None], n: int, seed: int, prefix: str,
                  plain: str = "plain-outputs") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = list(archs)
    points: list[dict[str, Any]] = []
    while len(points) < n:
        name = names[len(points) % len(names)]
        spec = cut(name, archs[name])
        for _ in range(50):
            plan = draw_plan(rng, spec, plain)
            try:
                if predicted_gib(spec, plan) <= MAX_PEAK_GIB:
                    break
            except PlanError:
                continue
        else:
            continue
        steps = 4 if plan.get("quant") == "int8" else 3
        points.append({"id": f"{prefix}{len(points):03d}-{name}", "spec": spec_ref(name),
                       "layers": archs[name], "plan": plan, "steps": steps})
    return points


def int8_draws(archs: dict[str, int | None], n: int, seed: int, prefix: str,
               wanted: int) -> list[dict[str, Any]]:
    """`wanted` int8 LoRA points out of `n` random draws over `archs` (each draw turned
    to int8, rank 16 where unset, 4 steps: int8's peak comes at the second step), keeping
    those whose predicted peak fits MAX_PEAK_GIB."""
    out: list[dict[str, Any]] = []
    for p in random_points(archs, n, seed=seed, prefix=prefix):
        p["plan"].update(method="qlora", quant="int8")
        p["plan"].pop("weights_dtype", None)
        p["plan"].setdefault("rank", 16)
        p["steps"] = 4
        try:
            if predicted_gib(cut(p["spec"] if isinstance(p["spec"], str)
                                 else p["id"].split("-", 1)[1], p["layers"]),
                             p["plan"]) > MAX_PEAK_GIB:
                continue
        except PlanError:
            continue
        out.append(p)
        if len(out) == wanted:
            break
    return out


# holdouts 6 and 7: every architecture measured so far plus four never measured before
REPLAY_HOLDOUT_ARCHS: dict[str, int | None] = {
    **DESIGN_ARCHS, **HOLDOUT_ARCHS, "qwen2.5-1.5b": None, "llama-3.2-3b": 8,
    "codellama-7b": 4, "qwen3-4b": 8, "gemma-7b": 4, "qwen2.5-3b": 12, "llama-2-13b": 4,
    "qwen3-14b": 4, "phi-3-medium": 4, "gemma-2b": 8, "qwen2.5-14b": 4, "qwen2.5-32b": 2,
    "gemma-2-27b": 2, "llama-3.1-70b": 2,
}

# holdouts 9-11: those plus four more never measured
HOLDOUT9_ARCHS: dict[str, int | None] = {
    **REPLAY_HOLDOUT_ARCHS, "llama-3-8b": 4, "mistral-7b-v0.3": 4, "llama-7b": 4,
    "qwen2.5-72b": 2,
}


# holdout 15 (issue 27): the loop people write, three ways, plus Trainer draws
H15_FULL_DEPTH = ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-1b", "tinyllama-1.1b",
                  "stablelm-2-1.6b", "smollm2-1.7b", "gemma-3-1b", "gemma-2-2b")
# the issue's three example settings, at full depth
H15_ISSUE: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-2-7b", "cache", {"method": "qlora", "quant": "nf4", "rank": 64,
                             "targets": "q_proj,v_proj", "batch_size": 2, "seq_len": 1024,
                             "gradient_checkpointing": False, "loop": "plain"}),
    ("llama-2-7b", "nocache", {"method": "qlora", "quant": "nf4", "rank": 64,
                               "targets": "q_proj,v_proj", "batch_size": 2, "seq_len": 1024,
                               "gradient_checkpointing": False, "loop": "plain",
                               "use_cache": False}),
    ("llama-3.1-8b", "loss", {"method": "qlora", "quant": "int8", "rank": 16,
                              "batch_size": 2, "seq_len": 1024, "optimizer": "adamw_torch",
                              "loop": "plain"}),
    ("llama-3.1-8b", "del", {"method": "qlora", "quant": "int8", "rank": 16,
                             "batch_size": 2, "seq_len": 1024, "optimizer": "adamw_torch",
                             "loop": "trainer-plain"}),
]


def holdout15_points(seed: int = 290, n_cache: int = 8,
                     held: tuple[tuple[dict[str, Any], int], ...] = (
                         ({"method": "qlora", "quant": "int8"}, 4),
                         ({"method": "qlora", "quant": "nf4"}, 2),
                         ({"method": "lora"}, 2), ({"method": "full"}, 2)),
                     tied: tuple[str, ...] = ("qwen2.5-1.5b", "smollm2-1.7b",
                                              "qwen2.5-0.5b", "gemma-3-1b"),
                     n_trainer: int = 8,
                     issue: bool = True) -> list[dict[str, Any]]:
    """Issue 27's holdout: the tutorial loop (`--loop plain`) three ways, Trainer draws,
    and the issue's examples. Seeded draws over holdout 9's architectures:
    - `u`: use_cache on, no checkpointing (8);
    - `h`: the loss kept into the next step: int8 x4, nf4 x2, lora x2, full x2 (10);
    - `o`: the directly built 8-bit optimizer on full fine-tuning of large tied
      embeddings, at full depth, with Trainer twins of the first two (6);
    - `t`: Trainer draws (8);
    - `x`: the issue's examples at full depth (4).
    Small models run at full depth (H15_FULL_DEPTH): with `x` and `o` over a quarter.
    The arguments draw other holdouts the same way (holdout 16)."""
    rng = random.Random(seed)
    # a dozen of the architectures, drawn once, so that few checkpoints are built (the
    # run's weights phase counts against its deadline)
    pool = sorted(rng.sample(sorted(HOLDOUT9_ARCHS), 12))
    dense = [n for n in pool if not spec_named(n).is_moe]
    points: list[dict[str, Any]] = []

    def layers_of(name: str) -> int | None:
        return None if name in H15_FULL_DEPTH else HOLDOUT9_ARCHS.get(name, 4)

    def add(prefix: str, name: str, plan: dict[str, Any], layers: int | None,
            tag: str = "") -> bool:
        try:
            if predicted_gib(cut(name, layers), plan, LOOP_NAMES) > MAX_PEAK_GIB:
                return False
        except PlanError:
            return False
        steps = 4 if plan.get("quant") == "int8" or plan.get("loop") == "plain" else 3
        pid = f"{prefix}{len(points):03d}-{name}{'-' + tag if tag else ''}"
        points.append({"id": pid, "spec": spec_ref(name), "layers": layers, "plan": plan,
                       "steps": steps})
        return True

    def drawn(prefix: str, n: int, names: list[str], fix: Callable[[dict[str, Any]], None]
              ) -> None:
        goal = len(points) + n
        while len(points) < goal:
            name = rng.choice(names)
            plan = draw_plan(rng, cut(name, layers_of(name)))
            plan.pop("loop", None)
            fix(plan)
            add(prefix, name, plan, layers_of(name))

    def cache(plan: dict[str, Any]) -> None:
        plan.update(loop="plain", gradient_checkpointing=False)
        plan["seq_len"] = min(plan["seq_len"], 4096)

    drawn("u", n_cache, dense, cache)
    kinds = [k for k, n in held for _ in range(n)]
    for kind in kinds:
        def held(plan: dict[str, Any], kind: dict[str, Any] = kind) -> None:
            for key in ("method", "quant", "weights_dtype", "double_quant"):
                plan.pop(key, None)
            plan.update(kind, loop="plain")
            if kind["method"] == "full":
                plan.pop("rank", None)
                plan.pop("targets", None)
                plan.pop("lora_dropout", None)
            else:
                plan.setdefault("rank", 16)
            if rng.random() < 0.7:
                plan["gradient_checkpointing"] = True
        drawn("h", 1, dense, held)
    for name in tied:
        plan = {"method": "full", "optimizer": rng.choice(["adamw_8bit", "paged_adamw_8bit"]),
                "batch_size": 2, "seq_len": rng.choice([1024, 2048]), "loop": "plain"}
        add("o", name, plan, None)
    for p in [p for p in points if p["id"].startswith("o")][:2]:
        add("o", p["id"].split("-", 1)[1], {**p["plan"], "loop": "trainer"}, None, "trainer")

    def trainer(plan: dict[str, Any]) -> None:
        plan["loop"] = "trainer"

    drawn("t", n_trainer, pool, trainer)
    for name, tag, plan in H15_ISSUE if issue else []:
        add("x", name, dict(plan), None, tag)
    return points


def as_eager(point: dict[str, Any], max_seq: int) -> None:
    """Turn a drawn point to eager attention, its sequence capped at `max_seq`."""
    point["plan"]["attn"] = "eager"
    point["plan"]["seq_len"] = min(point["plan"]["seq_len"], max_seq)


def first_fitting(draws: list[dict[str, Any]], n: int, max_gib: float
                  ) -> list[dict[str, Any]]:
    """The first `n` draws whose predicted peak is at most `max_gib`; inline specs (no
    catalog name) are kept unchecked, as the eager matrix was drawn."""
    out: list[dict[str, Any]] = []
    for p in draws:
        if (isinstance(p["spec"], str)
                and predicted_gib(cut(p["spec"], p["layers"]), p["plan"]) > max_gib):
            continue
        out.append(p)
        if len(out) == n:
            break
    return out


def spec_ref(name: str) -> Any:
    """A catalog name, or the inline spec (the device has no config files)."""
    if name in INLINE_CONFIGS:
        return spec_named(name).model_dump(mode="json")
    return name


def snapshot_points() -> list[dict[str, Any]]:
    base = {"batch_size": 2, "seq_len": 2048}
    variants = {
        "qlora-ckpt": {},
        "qlora-nockpt": {"gradient_checkpointing": False},
        "int8-nockpt": {"quant": "int8", "gradient_checkpointing": False},
        "lora-nockpt": {"method": "lora", "gradient_checkpointing": False},
        "full-bf16": {"method": "full", "optimizer": "adamw_torch"},
        "full-fp32": {"method": "full", "weights_dtype": "fp32", "optimizer": "adamw_torch"},
        "plain-loop": {"loop": "plain-outputs"},
        "eager-nockpt": {"attn": "eager", "gradient_checkpointing": False},
    }
    pts = [{"id": f"snap-{k}", "spec": "llama-2-7b", "layers": 4, "plan": {**base, **v},
            "steps": 3, "snapshot": True} for k, v in variants.items()]
    pts.append({"id": "snap-mixtral-qlora", "spec": "mixtral-8x7b", "layers": 2,
                "plan": {"batch_size": 1, "seq_len": 2048, "lora_dropout": 0.0},
                "steps": 3, "snapshot": True})
    pts.append({"id": "cannot-start-mixtral", "spec": "mixtral-8x7b", "layers": 2,
                "plan": {"batch_size": 1, "seq_len": 512}, "steps": 2})
    return pts


def boundary_points() -> list[dict[str, Any]]:
    """Emulated small cards (set_per_process_memory_fraction): the trainer and the plain
    loop, default and expandable allocator, around the predicted boundary."""
    pts = []
    cases = [("qwen2.5-0.5b", None, 2048, 10.0), ("llama-3.2-1b", None, 2048, 14.0)]
    for name, layers, seq, limit in cases:
        spec = cut(name, layers)
        for batch in (2, 3, 4, 5, 6, 7, 8):
            plan = {"batch_size": batch, "seq_len": seq}
            need = estimate(spec, TrainPlan.model_validate(plan)).required_device_bytes / GiB
            if abs(need - limit - 0.75) > 3.0:
                continue
            for loop in ("trainer", "plain-outputs"):
                for exp in (False, True):
                    p = {**plan, "loop": loop, "expandable_segments": exp}
                    pts.append({"id": f"edge-{name}-b{batch}-{loop}-{'exp' if exp else 'def'}",
                                "spec": name, "layers": layers, "plan": p, "steps": 3,
                                "memory_limit_gib": limit})
    return pts


def targeted_points() -> list[dict[str, Any]]:
    """The rules added after run 6 on points drawn by hand (effective.py): falcon QLoRA
    (an unquantized fp32 base), falcon sdpa (math attention), LoRA on an fp32 base (autocast
    copies of frozen weights, not cached)."""
    cases = [
        ("falcon-7b", 4, {"quant": "nf4", "batch_size": 1, "seq_len": 2048}),
        ("falcon-7b", 4, {"quant": "nf4", "attn": "eager", "gradient_checkpointing": False,
                          "batch_size": 1, "seq_len": 1024}),
        ("falcon-7b", 4, {"quant": "int8", "batch_size": 2, "seq_len": 1024,
                          "optimizer": "adamw_torch"}),
        ("llama-3.2-1b", None, {"method": "lora", "weights_dtype": "fp32", "batch_size": 4,
                                "seq_len": 1024}),
        ("mistral-7b", 4, {"method": "lora", "weights_dtype": "fp32", "batch_size": 2,
                           "seq_len": 2048, "gradient_checkpointing": False}),
    ]
    return [{"id": f"xt{i}-{name}", "spec": spec_ref(name), "layers": layers, "plan": plan,
             "steps": 4 if plan.get("quant") == "int8" else 3}
            for i, (name, layers, plan) in enumerate(cases)]


def predictions(matrix: str, note: str) -> dict[str, Any]:
    """The raw estimator's predictions for every training point of a matrix file: what a
    holdout commits before the run (bench/accuracy_h200.py compares them)."""
    from vramcalc.calibrate.matrix import matrix_points, point_spec

    out = []
    for point in matrix_points(json.loads(open(matrix, encoding="utf-8").read())):
        try:
            est = estimate(point_spec(point), TrainPlan.model_validate(point["plan"]))
        except PlanError:
            continue
        out.append({"id": point["id"], **{k: getattr(est, k) for k in (
            "peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes",
            "required_device_bytes", "paged_bytes", "peak_phase")}})
    return {"note": note, "points": out}


def main(which: str) -> None:
    if which == "predict":  # design.py predict MATRIX.json "NOTE"
        json.dump(predictions(sys.argv[2], sys.argv[3]), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    if which == "design":
        points = snapshot_points() + random_points(DESIGN_ARCHS, 96, seed=10, prefix="d")
        points += boundary_points()
    elif which == "holdout":
        points = random_points(HOLDOUT_ARCHS, 36, seed=20, prefix="h")
    elif which == "holdout2":
        # After the model was corrected on run 1 (and run 2 was seen): fresh draws over
        # every architecture, predictions committed before run 4.
        archs = {**DESIGN_ARCHS, **HOLDOUT_ARCHS}
        points = random_points(archs, 40, seed=30, prefix="v")
    elif which == "holdout3":
        # After the run-5 traces changed the model (full fine-tuning backward, MoE experts,
        # sliding-window masks): fresh draws over every architecture plus three never
        # measured (qwen2.5-1.5b, llama-3.2-3b, codellama-7b); predictions committed before
        # run 6 (h200-holdout3-predictions.json).
        archs = {**DESIGN_ARCHS, **HOLDOUT_ARCHS, "qwen2.5-1.5b": None, "llama-3.2-3b": None,
                 "codellama-7b": 4}
        points = random_points(archs, 44, seed=50, prefix="w")
    elif which == "holdout4":
        # After effective.py (falcon's unquantized base and math attention) and the
        # frozen-base autocast copies: fresh draws over every architecture plus four never
        # measured (qwen3-4b, gemma-7b, qwen2.5-3b, llama-2-13b), and targeted points for the
        # new rules; predictions committed before run 9 (h200-holdout4-predictions.json).
        archs = {**DESIGN_ARCHS, **HOLDOUT_ARCHS, "qwen2.5-1.5b": None, "llama-3.2-3b": 8,
                 "codellama-7b": 4, "qwen3-4b": 8, "gemma-7b": 4, "qwen2.5-3b": 12,
                 "llama-2-13b": 4}
        points = random_points(archs, 40, seed=70, prefix="x") + targeted_points()
    elif which == "holdout5":
        # After the post-run-9 changes (TrainPlan.autocast, --loop plain keeping only the
        # loss): fresh draws over every architecture plus three never measured (qwen3-14b,
        # phi-3-medium, gemma-2b); the plain loop drawn is the new, loss-only one.
        # Predictions committed before run 11 (h200-holdout5-predictions.json).
        archs = {**DESIGN_ARCHS, **HOLDOUT_ARCHS, "qwen2.5-1.5b": None, "llama-3.2-3b": 8,
                 "codellama-7b": 4, "qwen3-4b": 8, "gemma-7b": 4, "qwen2.5-3b": 12,
                 "llama-2-13b": 4, "qwen3-14b": 4, "phi-3-medium": 4, "gemma-2b": 8}
        points = random_points(archs, 40, seed=90, prefix="y", plain="plain")
    elif which == "holdout6":
        # After the allocator replay (step_requests + allocator_replay replaced the linear
        # slack rule for dense models): fresh draws over every architecture plus four never
        # measured (qwen2.5-14b, qwen2.5-32b, gemma-2-27b, llama-3.1-70b); predictions
        # committed before run 15 (h200-holdout6-predictions.json).
        archs = REPLAY_HOLDOUT_ARCHS
        points = random_points(archs, 40, seed=130, prefix="r", plain="plain")
    elif which == "holdout7":
        # After the post-holdout-6 changes to the step programs (optimizer states in model
        # order, foreach AdamW's sqrt list, in-place gradient sums): fresh draws over the
        # same architectures as holdout 6; predictions committed before run 16
        # (h200-holdout7-predictions.json).
        archs = REPLAY_HOLDOUT_ARCHS
        points = random_points(archs, 40, seed=150, prefix="q", plain="plain")
    elif which == "holdout8":
        # After the post-run-16 changes (Gemma-2 soft capping, softmax backward's temporary
        # in the step programs): a small set that fits the last device minutes, small
        # architectures at full depth or few layers, every other draw eager; predictions
        # committed before run 17 (h200-holdout8-predictions.json).
        archs = {"qwen2.5-0.5b": None, "llama-3.2-1b": None, "tinyllama-1.1b": None,
                 "gemma-3-1b": None, "gemma-2-2b": 6, "smollm2-1.7b": 8,
                 "qwen2.5-1.5b": None, "stablelm-2-1.6b": None, "phi-2": 6, "gemma-2-9b": 2}
        draws = random_points(archs, 24, seed=170, prefix="p", plain="plain")
        for p in draws[1::2]:
            as_eager(p, 2048)
        points = first_fitting(draws, 10, max_gib=30)
    elif which == "holdout9":
        # After the load programs (load_requests) and the traced int8, MoE and full
        # fine-tuning step programs (runs 17-18): fresh draws, one per architecture, over
        # every architecture of holdouts 6-7 plus four never measured (llama-3-8b,
        # mistral-7b-v0.3, llama-7b, qwen2.5-72b); predictions committed before run 19
        # (h200-holdout9-predictions.json).
        points = random_points(HOLDOUT9_ARCHS, 40, seed=190, prefix="n", plain="plain")
    elif which == "holdout10":
        # A replication of holdout 9 with the estimator unchanged since (fresh draws, same
        # architectures, another seed); predictions committed before run 20
        # (h200-holdout10-predictions.json).
        points = random_points(HOLDOUT9_ARCHS, 40, seed=210, prefix="m", plain="plain")
    elif which == "holdout11":
        # After the post-run-20 review fixes (the checkpointed LoRA programs' leaked
        # embedding-output gradient): 20 fresh draws over 20 of holdout 9's architectures
        # picked at random, what the last device minutes of the session allow; predictions
        # committed before run 21 (h200-holdout11-predictions.json).
        picked = random.Random(231).sample(sorted(HOLDOUT9_ARCHS), 20)
        points = random_points({k: HOLDOUT9_ARCHS[k] for k in picked}, 20, seed=230,
                               prefix="k",
                               plain="plain")
    elif which == "holdout12":
        # After the int8 outlier-column fraction (activations.int8_outlier_fraction), the
        # graph a held int8 output keeps into the next step, and `plain-outputs-del`: 40
        # fresh draws over holdout 9's architectures (the plain loop drawn as the one that
        # keeps `out`), plus 8 int8 draws over the models of hidden <= 3072, where the
        # fraction moves; predictions committed before run 22
        # (h200-holdout12-predictions.json).
        points = random_points(HOLDOUT9_ARCHS, 40, seed=250, prefix="j")
        small = {k: v for k, v in HOLDOUT9_ARCHS.items()
                 if spec_named(k).hidden_size <= 3072 and not spec_named(k).is_moe}
        points += int8_draws(small, 40, seed=251, prefix="i", wanted=8)
    elif which == "holdout13":
        # After the step program became the peak where it covers the plan (estimate
        # step_program_covers), with int8's subB and the sliding-window masks in it: 40
        # fresh draws over holdout 9's architectures, plus 12 int8 draws over every dense
        # one (checkpointed int8 on hidden 4096 was the formula's worst); predictions
        # committed before run 24 (h200-holdout13-predictions.json).
        points = random_points(HOLDOUT9_ARCHS, 40, seed=260, prefix="g")
        dense = {k: v for k, v in HOLDOUT9_ARCHS.items() if not spec_named(k).is_moe}
        points += int8_draws(dense, 60, seed=261, prefix="e", wanted=12)
    elif which == "holdout14":
        # After the reserved peak took in loading and preparing (run 24's g020): 24 fresh
        # draws over holdout 9's architectures plus 6 int8 draws over the dense ones, sized
        # for the device time left in the session; predictions committed before run 26
        # (h200-holdout14-predictions.json).
        points = random_points(HOLDOUT9_ARCHS, 24, seed=270, prefix="a")
        dense = {k: v for k, v in HOLDOUT9_ARCHS.items() if not spec_named(k).is_moe}
        points += int8_draws(dense, 40, seed=271, prefix="c", wanted=6)
    elif which == "holdout15":
        # Issue 27: the loop people write (no Trainer, optimizer built directly, `loss`
        # kept into the next step, use_cache on) and required memory that never falls;
        # predictions committed before the run (h200-holdout15-predictions.json).
        json.dump({"loop_names": LOOP_NAMES, "points": holdout15_points()}, sys.stdout,
                  indent=1)
        sys.stdout.write("\n")
        return
    elif which == "holdout16":
        # After run 28's gemma-2 traces (fp32-scaled norms, repeat_kv under a mask): the
        # loop people write and Trainer draws again with a new seed, smaller so that it runs
        # beside the issue-29 matrices on one H100, plus the gemma family at full depth or
        # cut; predictions committed before the run (h200-holdout16-predictions.json).
        points = holdout15_points(seed=300, n_cache=6, held=(
            ({"method": "qlora", "quant": "int8"}, 2), ({"method": "qlora", "quant": "nf4"}, 1),
            ({"method": "lora"}, 1), ({"method": "full"}, 2)), tied=(), n_trainer=6,
            issue=False)
        rng = random.Random(301)
        # `g`: the gemma family; `f`: more models at full depth, 7-8B ones included
        drawn = {"gemma-2-2b": None, "gemma-3-1b": None, "gemma-2-9b": 4, "gemma-7b": 4,
                 "llama-3.1-8b": None, "mistral-7b-v0.3": None, "qwen2.5-1.5b": None,
                 "llama-3.2-1b": None}
        for i, name in enumerate(drawn):
            spec = cut(name, drawn[name])
            for _ in range(50):
                plan = draw_plan(rng, spec)
                plan["loop"] = "plain" if i % 2 else "trainer"
                try:
                    if predicted_gib(spec, plan, LOOP_NAMES) <= 24:
                        break
                except PlanError:
                    continue
            prefix = "g" if name.startswith("gemma") else "f"
            points.append({"id": f"{prefix}{len(points):03d}-{name}", "spec": spec_ref(name),
                           "layers": drawn[name], "plan": plan, "steps": 4})
        json.dump({"loop_names": LOOP_NAMES, "points": points}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    elif which == "eager":
        # After run 12 rewrote eager attention's backward: fresh eager points only (the draws
        # with sdpa turned eager, sequences capped at 4096); predictions committed before
        # run 13 (h200-eager-holdout-predictions.json).
        archs = {k: v for k, v in {**DESIGN_ARCHS, **HOLDOUT_ARCHS, "llama-3.2-3b": 8,
                                   "qwen3-4b": 8, "gemma-7b": 4}.items()
                 if k not in ("gemma-2-2b", "gemma-2-9b")}  # gemma-2 runs eager always
        draws = random_points(archs, 60, seed=110, prefix="z")
        for p in draws:
            as_eager(p, 4096)
        points = first_fitting(draws, 16, max_gib=40)
    else:
        raise SystemExit("usage: design.py design|holdout|holdout2|holdout3|holdout4|holdout5|"
                         "holdout6|holdout7|holdout8|holdout9|holdout10|holdout11|holdout12|"
                         "holdout13|holdout14|holdout15|holdout16|eager")
    json.dump({"points": points}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "design")
