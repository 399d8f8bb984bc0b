"""Boundary matrices on emulated cards (issue 11): where does a plan stop fitting?

    python calibration/design_boundary.py sweep > calibration/matrices/h200-boundary-sweep.json
    python calibration/design_boundary.py holdout \
        calibration/matrices/h200-boundary-holdout-predictions.json \
        > calibration/matrices/h200-boundary-holdout.json

A card is emulated with `torch.cuda.set_per_process_memory_fraction` (`memory_limit_gib`,
calibrate/run.py): the caching allocator raises out-of-memory once its reserved bytes would
pass the limit, after the same release-and-retry it does on a full card
(CUDACachingAllocator.cpp, malloc -> release_cached_blocks). The CUDA context and managed
(paged) memory lie outside the limit, as they lie outside torch's reserved bytes on a real
card, so an emulated card of limit L offers L + context + paged to the fit rule.

`sweep`: for each case (model x plan) and each loop x allocator, limits at the variant's
predicted peak allocated + offsets: which offsets run and which run out of memory bound the
unreleasable slack the required-free-memory rule must cover (allocator.required_slack);
every out-of-memory run also records the allocator's own figures at the failing request.
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.calibrate.matrix import emulated_card_bytes  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan, current_loop_names  # noqa: E402
from vramcalc.units import GiB  # noqa: E402

# "plain-outputs": runs 7 and 8 measured the loop that keeps `out` (named "plain" then)
VARIANTS = [(loop, exp) for loop in ("trainer", "plain-outputs") for exp in (False, True)]

# (model, batch, seq_len): QLoRA defaults otherwise (nf4, r16 all-linear, checkpointing,
# paged_adamw_8bit, sdpa); tokens x vocab from 0.52 G to 1.24 G elements.
SWEEP_CASES = [
    ("qwen2.5-0.5b", 2, 2048), ("qwen2.5-0.5b", 4, 2048), ("llama-3.2-1b", 3, 2048),
    ("tinyllama-1.1b", 4, 4096), ("qwen2.5-1.5b", 2, 2048), ("smollm2-1.7b", 6, 2048),
]
SWEEP_OFFSETS_GIB = (0.15, 0.4, 0.75, 1.2, 1.8)


def variant_tag(loop: str, exp: bool) -> str:
    loop = {"plain-outputs": "plain"}.get(loop, loop)  # the ids runs 7 and 8 recorded
    return f"{loop}-{'exp' if exp else 'def'}"


def sweep_points() -> list[dict[str, Any]]:
    pts = []
    for name, batch, seq in SWEEP_CASES:
        spec = get_spec(name)
        for loop, exp in VARIANTS:
            plan = {"batch_size": batch, "seq_len": seq, "loop": loop,
                    "expandable_segments": exp}
            est = estimate(spec, TrainPlan.model_validate(current_loop_names(plan)))
            for off in SWEEP_OFFSETS_GIB:
                limit = round(est.peak_allocated_bytes / GiB + off, 3)
                pts.append({"id": f"sweep-{name}-b{batch}s{seq}-{variant_tag(loop, exp)}"
                                  f"-o{off:.2f}",
                            "spec": name, "layers": None, "plan": plan, "steps": 3,
                            "memory_limit_gib": limit})
    return pts


# The pre-registered boundary holdout (after the sweep changed allocator.required_slack):
# cases the sweep never ran, two models never measured (qwen3-0.6b, qwen3-1.7b), and
# other methods, ranks and optimizers. Each card lies within 5 % of the trainer/default
# plan's required free memory, the most (even cases) or the least (odd cases) it may need
# (offsets cycle over -5..+5 %).
HOLDOUT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("qwen3-0.6b", {"batch_size": 2, "seq_len": 2048}),
    ("qwen3-1.7b", {"batch_size": 2, "seq_len": 2048}),
    ("tinyllama-1.1b", {"batch_size": 6, "seq_len": 2048}),
    ("llama-3.2-1b", {"batch_size": 1, "seq_len": 4096}),
    ("qwen2.5-1.5b", {"batch_size": 1, "seq_len": 4096}),
    ("smollm2-1.7b", {"batch_size": 3, "seq_len": 4096}),
    ("qwen2.5-0.5b", {"batch_size": 3, "seq_len": 2048}),
    ("qwen3-0.6b", {"batch_size": 1, "seq_len": 4096, "method": "lora"}),
    ("llama-3.2-1b", {"batch_size": 2, "seq_len": 2048, "rank": 64}),
    ("tinyllama-1.1b", {"batch_size": 2, "seq_len": 4096, "optimizer": "adamw_torch"}),
]
HOLDOUT_OFFSETS = (-0.05, 0.03, -0.01, 0.05, -0.03, 0.01)
REPEATS = 3
MARGIN = GiB // 2  # check's default margin: the suggestions are planned with it


def holdout_points() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The grid (cases x loops x allocators x repeats) and, for every variant that check
    calls "does not fit", each suggestion it prints, run once in the same loop and card.
    Returns the points and their predictions (certainty with no margin and with 0.5 GiB)."""
    from vramcalc.sizing import advice
    from vramcalc.sizing.verdict import certainty

    pts: list[dict[str, Any]] = []
    preds: dict[str, Any] = {}

    def predict(pid: str, spec: Any, plan: dict[str, Any], limit_gib: float) -> None:
        est = estimate(spec, TrainPlan.model_validate(current_loop_names(plan)))
        offered = emulated_card_bytes(est, int(limit_gib * GiB))
        preds[pid] = {
            "peak_allocated_bytes": est.peak_allocated_bytes,
            "required_low_bytes": est.required_low,
            "required_bytes": est.required_device_bytes,
            "offered_bytes": offered,
            "certainty": certainty(offered, est.required_device_bytes, 0, est.required_low),
            "certainty_margin": certainty(offered, est.required_device_bytes, MARGIN,
                                          est.required_low),
        }

    seen: set[str] = set()
    for n, (name, fields) in enumerate(HOLDOUT_CASES):
        spec = get_spec(name)
        base = TrainPlan.model_validate(fields)
        ref = estimate(spec, base)
        # even cases: within 5 % of the most the plan may need; odd: of the least
        need = ref.required_device_bytes if n % 2 == 0 else ref.required_low
        card = need * (1 + HOLDOUT_OFFSETS[n % len(HOLDOUT_OFFSETS)])
        limit = round((card - ref.components.cuda_context - ref.paged_bytes) / GiB, 3)
        tag = f"c{n:02d}-{name}"
        for loop, exp in VARIANTS:
            plan = {**fields, "loop": loop, "expandable_segments": exp}
            for r in range(REPEATS):
                pid = f"bh-{tag}-{variant_tag(loop, exp)}-r{r}"
                pts.append({"id": pid, "spec": name, "layers": None, "plan": plan,
                            "steps": 3, "memory_limit_gib": limit})
                predict(pid, spec, plan, limit)
            tp = TrainPlan.model_validate(current_loop_names(plan))
            est = estimate(spec, tp)
            offered = emulated_card_bytes(est, int(limit * GiB))
            if certainty(offered, est.required_device_bytes, MARGIN,
                         est.required_low) != "does_not_fit":
                continue
            for s in advice.suggest(spec, tp, offered - MARGIN):
                new = {**plan, **s.changes}
                key = json.dumps([name, new, limit], sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                pid = f"bs-{tag}-{variant_tag(loop, exp)}-{s.kind}"
                pts.append({"id": pid, "spec": name, "layers": None, "plan": new, "steps": 3,
                            "memory_limit_gib": limit, "suggestion": s.description,
                            "suggested_for": f"bh-{tag}-{variant_tag(loop, exp)}"})
                predict(pid, spec, new, limit)
    return pts, preds


# Issue 11's own measurement (llama-3.1-8b, r16 all-linear, seq 4096, checkpointing,
# paged_adamw_8bit, sdpa, an empty 80 GB H100 with 79.18 GiB free): Trainer b7 and b8 ran;
# a plain loop b7 ran out of memory (default allocator); with expandable segments b7 and b8
# ran, b9 did not. Replayed on the H200 with the card emulated at 79.18 GiB free, full depth.
ISSUE_FREE_GIB = 79.18
ISSUE_CASES = [  # (tag, loop, expandable, batch)
    ("t-def-b7", "trainer", False, 7), ("t-def-b8", "trainer", False, 8),
    ("p-def-b7", "plain-outputs", False, 7), ("pl-def-b7", "plain", False, 7),
    ("p-exp-b8", "plain-outputs", True, 8), ("pl-exp-b8", "plain", True, 8),
    ("pl-exp-b9", "plain", True, 9),
]


def issue_points() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Issue 11's H100 case on an emulated card; predictions (no margin) alongside."""
    from vramcalc.sizing.verdict import certainty

    spec = get_spec("llama-3.1-8b")
    pts, preds = [], {}
    for tag, loop, exp, batch in ISSUE_CASES:
        plan = {"batch_size": batch, "seq_len": 4096, "loop": loop, "expandable_segments": exp}
        est = estimate(spec, TrainPlan.model_validate(current_loop_names(plan)))
        limit = round((ISSUE_FREE_GIB * GiB - est.components.cuda_context - est.paged_bytes)
                      / GiB, 3)
        pid = f"issue11-{tag}"
        pts.append({"id": pid, "spec": "llama-3.1-8b", "layers": None, "plan": plan,
                    "steps": 3, "memory_limit_gib": limit})
        offered = emulated_card_bytes(est, int(limit * GiB))
        preds[pid] = {"peak_allocated_bytes": est.peak_allocated_bytes,
                      "required_low_bytes": est.required_low,
                      "required_bytes": est.required_device_bytes, "offered_bytes": offered,
                      "certainty": certainty(offered, est.required_device_bytes, 0,
                                             est.required_low)}
    return pts, preds


def main(which: str) -> None:
    if which == "sweep":
        points = sweep_points()
    elif which == "holdout":
        points, preds = holdout_points()
        with open(sys.argv[2], "w", encoding="utf-8") as fh:
            json.dump(preds, fh, indent=1)
            fh.write("\n")
    elif which == "issue":
        points, preds = issue_points()
        with open(sys.argv[2], "w", encoding="utf-8") as fh:
            json.dump(preds, fh, indent=1)
            fh.write("\n")
    else:
        raise SystemExit("usage: design_boundary.py sweep | holdout PRED.json | issue PRED.json")
    json.dump({"note": __doc__.split("\n\n")[0], "points": points}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
