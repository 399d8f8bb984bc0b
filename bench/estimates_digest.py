"""One sha256 over the full estimates (allocator replay on) of every committed measured
point and of a fixed list of catalog plans: a change to the engine that keeps this digest
keeps every estimate byte-identical.

    python bench/estimates_digest.py [--out FILE] [--set measured|catalog|all]

Measured points: every record with a spec and a plan in calibration/h200/*.jsonl (depth
cuts `layers` included, the plan read as bench/h200_points.py `measured_plan` does), every
line of calibration/raw/*.jsonl (model + plan) and every point of calibration/runs/*.json.
Catalog plans: every catalog model x {qlora nf4, lora, full bf16, qlora int8} at batch 2,
sequence 1024, expandable segments off and on; every model's inference (nf4 and 16-bit)
and merge; a few 2-GPU plans (estimate_parallel). A plan that raises gives its error
message, which is digested too.

Prints the digest and the count; `--out` writes one line per estimate (key, tab, canonical
JSON), so two runs' files diff to the estimate that moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from h200_points import ROOT, measured_plan  # noqa: E402

from vramcalc.calibrate.matrix import point_spec  # noqa: E402
from vramcalc.errors import VramcalcError  # noqa: E402
from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.memory.inference import estimate_inference, estimate_merge  # noqa: E402
from vramcalc.memory.multi_gpu import ParallelPlan, estimate_parallel  # noqa: E402
from vramcalc.models.spec import catalog, get_spec  # noqa: E402
from vramcalc.plans import InferPlan, MergePlan, TrainPlan  # noqa: E402

Job = tuple[str, Callable[[], Any]]

CATALOG_PLANS: dict[str, dict[str, Any]] = {
    "qlora": {"method": "qlora", "quant": "nf4"},
    "lora": {"method": "lora"},
    "full": {"method": "full", "optimizer": "adamw_torch"},
    "int8": {"method": "qlora", "quant": "int8"},
}
SETTING: dict[str, Any] = {"batch_size": 2, "seq_len": 1024}
PARALLEL_MODELS = ("llama-3.1-8b", "qwen2.5-14b", "mixtral-8x7b")
PARALLEL = (ParallelPlan(gpus=2, strategy="ddp"), ParallelPlan(gpus=2, strategy="fsdp"),
            ParallelPlan(gpus=2, strategy="zero3"), ParallelPlan(gpus=2, strategy="device-map"))


def _h200_jobs() -> Iterator[Job]:
    for path in sorted((ROOT / "calibration" / "h200").glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not rec.get("spec") or not isinstance(rec.get("plan"), dict):
                continue

            def job(rec: dict[str, Any] = rec, fname: str = path.name) -> Any:
                return estimate(point_spec(rec), measured_plan(fname, rec["plan"]))

            yield f"h200/{path.name}:{n}:{rec.get('id')}", job


def _raw_jobs() -> Iterator[Job]:
    for path in sorted((ROOT / "calibration" / "raw").glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            rec = json.loads(line)

            def job(rec: dict[str, Any] = rec) -> Any:
                return estimate(get_spec(rec["model"]), TrainPlan.model_validate(rec["plan"]))

            yield f"raw/{path.name}:{n}:{rec.get('model')}", job


def _runs_jobs() -> Iterator[Job]:
    for path in sorted((ROOT / "calibration" / "runs").glob("*.json")):
        for n, rec in enumerate(json.loads(path.read_text())["points"]):

            def job(rec: dict[str, Any] = rec) -> Any:
                return estimate(get_spec(rec["model"]), TrainPlan.model_validate(rec["plan"]))

            yield f"runs/{path.name}:{n}:{rec.get('model')}", job


def measured_jobs() -> Iterator[Job]:
    yield from _h200_jobs()
    yield from _raw_jobs()
    yield from _runs_jobs()


def catalog_jobs() -> Iterator[Job]:
    for spec in catalog():
        for label, options in CATALOG_PLANS.items():
            for expandable in (False, True):

                def job(spec: Any = spec, options: dict[str, Any] = options,
                        expandable: bool = expandable) -> Any:
                    plan = TrainPlan(**options, **SETTING, expandable_segments=expandable)
                    return estimate(spec, plan)

                yield f"catalog/{spec.name}/{label}/expandable={expandable}", job
        for quant in ("nf4", "none"):
            yield (f"catalog/{spec.name}/infer/{quant}",
                   lambda spec=spec, quant=quant: estimate_inference(
                       spec, InferPlan(quant=quant, batch_size=2)))
        yield (f"catalog/{spec.name}/merge",
               lambda spec=spec: estimate_merge(spec, MergePlan()))
    for name in PARALLEL_MODELS:
        for par in PARALLEL:
            yield (f"catalog/{name}/parallel/{par.label}",
                   lambda name=name, par=par: estimate_parallel(
                       get_spec(name), TrainPlan(**SETTING), par))


def canonical(result: Any) -> str:
    return json.dumps(result.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def run(jobs: Iterator[Job]) -> Iterator[tuple[str, str]]:
    for key, job in jobs:
        try:
            text = canonical(job())
        except (VramcalcError, ValueError) as err:  # pydantic ValidationError is a ValueError
            text = json.dumps({"error": type(err).__name__, "message": str(err)})
        yield key, text


def digest_lines(results: Iterator[tuple[str, str]], out: Path | None
                 ) -> tuple[str, list[str]]:
    """The sha256 of the `key<TAB>text` lines of `results`, and the lines (written to
    `out` when given)."""
    digest = hashlib.sha256()
    lines = []
    for key, text in results:
        line = f"{key}\t{text}\n"
        digest.update(line.encode())
        lines.append(line)
    if out:
        out.write_text("".join(lines))
    return digest.hexdigest(), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="one line per estimate: key, tab, JSON")
    parser.add_argument("--set", choices=("measured", "catalog", "all"), default="all")
    args = parser.parse_args()
    jobs: Iterator[Job] = iter(())
    if args.set in ("measured", "all"):
        jobs = measured_jobs()
    if args.set in ("catalog", "all"):
        jobs = iter([*jobs, *catalog_jobs()])
    t0 = time.perf_counter()
    hexdigest, lines = digest_lines(run(jobs), args.out)
    print(f"{hexdigest}  {len(lines)} estimates ({args.set}), "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
