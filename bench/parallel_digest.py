"""One sha256 over a fixed matrix of multi-GPU estimates (`estimate_parallel`, allocator
replay on): a change to multi_gpu.py that keeps this digest keeps every parallel plan in
the matrix byte-identical; `--out` writes one line per estimate (key, tab, canonical JSON)
so two runs' files diff to the plans that moved. bench/estimates_digest.py covers the
single-GPU estimates (and only twelve 2-GPU plans).

    PYTHONPATH=src python bench/parallel_digest.py [--out FILE]

Matrix: 5 models x 4 methods x {ddp, fsdp FULL_SHARD / SHARD_GRAD_OP / NO_SHARD, zero2,
zero3, device-map} x offload {none, cpu} (where allowed) x {2, 8} GPUs, batch 2 x 1024,
plus every row of bench/data/published_multi_gpu.yaml. A plan that raises gives its error
message, which is digested too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimates_digest import Job, digest_lines, run  # noqa: E402

from vramcalc.corrections.planning import memoized  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.memory.multi_gpu import ParallelPlan, estimate_parallel  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402
from vramcalc.plans import TrainPlan  # noqa: E402

MODELS = ("llama-3.1-8b", "qwen2.5-14b", "mixtral-8x7b", "llama-2-70b", "llama-3.1-70b")
METHODS: dict[str, dict[str, Any]] = {
    "qlora": {"method": "qlora", "quant": "nf4"},
    "lora": {"method": "lora"},
    "full": {"method": "full", "optimizer": "adamw_torch"},
    "full8": {"method": "full", "optimizer": "adamw_8bit"},
}
STRATS: tuple[dict[str, Any], ...] = (
    {"strategy": "ddp"},
    {"strategy": "fsdp"},
    {"strategy": "fsdp", "sharding_strategy": "SHARD_GRAD_OP"},
    {"strategy": "fsdp", "sharding_strategy": "NO_SHARD"},
    {"strategy": "fsdp", "offload": "cpu"},
    {"strategy": "zero2"},
    {"strategy": "zero2", "offload": "cpu"},
    {"strategy": "zero3"},
    {"strategy": "zero3", "offload": "cpu"},
    {"strategy": "device-map"},
)
SETTING: dict[str, Any] = {"batch_size": 2, "seq_len": 1024}
PUBLISHED = Path(__file__).parent / "data" / "published_multi_gpu.yaml"


def jobs() -> Iterator[Job]:
    single = memoized(estimate)
    for name in MODELS:
        for label, options in METHODS.items():
            for strat in STRATS:
                for gpus in (2, 8):

                    def job(name: str = name, options: dict[str, Any] = options,
                            strat: dict[str, Any] = strat, gpus: int = gpus) -> Any:
                        par = ParallelPlan(gpus=gpus, **strat)
                        return estimate_parallel(get_spec(name), TrainPlan(**options, **SETTING),
                                                 par, single)

                    key = "/".join(f"{k}={v}" for k, v in strat.items())
                    yield f"{name}/{label}/{key}/gpus={gpus}", job
    for row in yaml.safe_load(PUBLISHED.read_text()):

        def pjob(row: dict[str, Any] = row) -> Any:
            p = dict(row["plan"])
            keys = ("gpus", "strategy", "offload", "sharding_strategy")
            par = ParallelPlan(**{k: p.pop(k) for k in keys if k in p})
            p["batch_size"] = p.pop("batch")
            return estimate_parallel(get_spec(row["model"]), TrainPlan(**p), par, single)

        yield f"published/{row['id']}", pjob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="one line per estimate: key, tab, JSON")
    args = parser.parse_args()
    t0 = time.perf_counter()
    hexdigest, lines = digest_lines(run(jobs()), args.out)
    print(f"{hexdigest}  {len(lines)} parallel estimates, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
