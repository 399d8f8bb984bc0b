"""Traced step programs give the generated estimates, byte for byte, on the catalog.

    python bench/trace_identity.py [--models N]

For every catalog model x {qlora nf4, lora, full, qlora int8} (bench/estimates_digest.py's
catalog plans, at its batch 2 and sequence 1024) and each of batch_size and seq_len: a
sweep of VALUES through a step cache that traces at the first move
(program.symbolic.StepCache(trace_after=1): the most reads), against the same estimates
made with no cache (each one generated). Prints how many estimates were read from a
trace, how many differ (must be 0), and one sha256 over the cached estimates. Also run
with VRAMCALC_NO_EXTENSIONS=1 (the Python replay).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimates_digest import CATALOG_PLANS, SETTING  # noqa: E402

from vramcalc.errors import VramcalcError  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.memory.program import step  # noqa: E402
from vramcalc.memory.program.symbolic import StepCache  # noqa: E402
from vramcalc.models.spec import catalog  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402

VALUES = {"batch_size": [2, 3, 4, 5, 8, 9, 16, 17, 31],
          "seq_len": [1024, 1025, 1500, 2048, 2049, 3000, 4096, 6000]}


class _Off(StepCache):
    """Every request sequence generated."""

    def get(self, owner: object, key: tuple[object, ...], plan: Any, generate: Any,
            build: Any) -> Any:
        return generate(plan)


def _estimates(spec: Any, plans: list[TrainPlan]) -> list[str]:
    out = []
    for p in plans:
        try:
            out.append(estimate(spec, p).model_dump_json())
        except VramcalcError as err:
            out.append(f"error: {err}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=None, help="the first N catalog models")
    args = ap.parse_args()
    cache = StepCache(trace_after=1)
    digest = hashlib.sha256()
    compared = differ = 0
    t0 = time.perf_counter()
    for spec in catalog()[:args.models]:
        for name, fields in CATALOG_PLANS.items():
            base = TrainPlan(**fields, **SETTING)
            for field, values in VALUES.items():
                plans = [base.model_copy(update={field: v}) for v in values]
                step.STEP_CACHE = cache
                cache.clear()
                got = _estimates(spec, plans)
                step.STEP_CACHE = _Off()
                want = _estimates(spec, plans)
                compared += len(plans)
                bad = [v for v, a, b in zip(values, got, want, strict=True) if a != b]
                if bad:
                    differ += len(bad)
                    print(f"DIFFER {spec.name} {name} {field} at {bad}")
                for g in got:
                    digest.update(g.encode())
    print(f"{compared} estimates compared, {differ} differ; through the cache: "
          f"{cache.counts['generated']} generated, {cache.counts['traced']} traced, "
          f"{cache.counts['read']} read from a trace ({time.perf_counter() - t0:.0f} s)")
    print(f"{digest.hexdigest()}  (the cached estimates)")
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
