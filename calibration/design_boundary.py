"""Boundary matrices on emulated cards (issue 11): where does a plan stop fitting?

    python calibration/design_boundary.py sweep > calibration/matrices/h200-boundary-sweep.json

A card is emulated with `torch.cuda.set_per_process_memory_fraction` (`memory_limit_gib`,
calibrate/run.py): the caching allocator raises out-of-memory once its reserved bytes would
pass the limit, after the same release-and-retry it does on a full card
(CUDACachingAllocator.cpp, malloc -> release_cached_blocks). The CUDA context and managed
(paged) memory lie outside the limit, as they lie outside torch's reserved bytes on a real
card, so an emulated card of limit L offers L + context + paged to the fit rule.

`sweep`: for each case (model x plan) and each loop x allocator, limits at the variant's
predicted peak allocated + offsets: which offsets run and which run out of memory bound the
unreleasable slack the required-free-memory rule must cover (allocator.unreleasable_slack);
every out-of-memory run also records the allocator's own figures at the failing request.
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.estimate import estimate  # noqa: E402
from vramcalc.plan_settings import TrainPlan  # noqa: E402
from vramcalc.specs import get_spec  # noqa: E402

GiB = 2**30
VARIANTS = [(loop, exp) for loop in ("trainer", "plain") for exp in (False, True)]

# (model, batch, seq_len): QLoRA defaults otherwise (nf4, r16 all-linear, checkpointing,
# paged_adamw_8bit, sdpa); tokens x vocab from 0.52 G to 1.24 G elements.
SWEEP_CASES = [
    ("qwen2.5-0.5b", 2, 2048), ("qwen2.5-0.5b", 4, 2048), ("llama-3.2-1b", 3, 2048),
    ("tinyllama-1.1b", 4, 4096), ("qwen2.5-1.5b", 2, 2048), ("smollm2-1.7b", 6, 2048),
]
SWEEP_OFFSETS_GIB = (0.15, 0.4, 0.75, 1.2, 1.8)


def variant_tag(loop: str, exp: bool) -> str:
    return f"{loop}-{'exp' if exp else 'def'}"


def sweep_points() -> list[dict[str, Any]]:
    pts = []
    for name, batch, seq in SWEEP_CASES:
        spec = get_spec(name)
        for loop, exp in VARIANTS:
            plan = {"batch_size": batch, "seq_len": seq, "loop": loop,
                    "expandable_segments": exp}
            est = estimate(spec, TrainPlan.model_validate(plan))
            for off in SWEEP_OFFSETS_GIB:
                limit = round(est.peak_allocated_bytes / GiB + off, 3)
                pts.append({"id": f"sweep-{name}-b{batch}s{seq}-{variant_tag(loop, exp)}"
                                  f"-o{off:.2f}",
                            "spec": name, "layers": None, "plan": plan, "steps": 3,
                            "memory_limit_gib": limit})
    return pts


def main(which: str) -> None:
    if which == "sweep":
        points = sweep_points()
    else:
        raise SystemExit("usage: design_boundary.py sweep")
    json.dump({"note": __doc__.split("\n\n")[0], "points": points}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
