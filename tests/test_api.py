"""The Python API: `from vramcalc import plan, check`, the same numbers as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vramcalc import CheckResult, PlanEstimate, check, plan
from vramcalc.cli import app
from vramcalc.errors import PlanError, UnknownGpuError, UnknownModelError
from vramcalc.memory.result import Estimate


def test_plan_matches_the_cli() -> None:
    est = plan("llama-7b", rank=8, batch_size=4, seq_len=1024)
    assert isinstance(est, PlanEstimate) and isinstance(est, Estimate)
    assert est.plan.batch_size == 4 and est.plan.rank == 8
    r = CliRunner().invoke(app, ["plan", "-m", "llama-7b", "-r", "8", "-b", "4", "-s", "1024",
                                 "--json"])
    out = json.loads(r.stdout)
    assert est.required_device_bytes == out["required_device_bytes"]
    assert dict(est.components.items()) == out["components"]
    assert "required=" in repr(est) and "<table>" in est._repr_html_()


def test_plan_options_are_validated() -> None:
    with pytest.raises(PlanError, match="method qlora needs a quantized base"):
        plan("llama-7b", method="qlora", quant="none")
    with pytest.raises(PlanError, match="batch_size"):
        plan("llama-7b", batch_size=0)
    with pytest.raises(UnknownModelError):
        plan("no-such-model")


def test_check_matches_the_cli() -> None:
    res = check("llama-7b", gpus=["rtx-4090", "t4"], batch_size=2)
    assert isinstance(res, CheckResult)
    assert len(res.verdicts) == 2
    r = CliRunner().invoke(app, ["check", "-m", "llama-7b", "-b", "2", "--gpu", "rtx-4090",
                                 "--json"])
    cli = json.loads(r.stdout)["best_gpu"]
    v = res.verdicts[0]
    assert v.required_bytes == cli["required_device_bytes"]
    assert v.fits == cli["fits_empty"]
    assert res.verdicts[1].compute_dtype == "fp16"  # a T4 has no bf16, as the CLI plans it
    assert "fits" in repr(res)
    with pytest.raises(UnknownGpuError):
        check("llama-7b", gpus=["no-such-gpu"])


def test_api_import_loads_no_cli_or_heavy_library() -> None:
    code = (
        "import sys\nfrom vramcalc import plan, check\n"
        "e = plan('llama-7b', batch_size=2)\nc = check('llama-7b', gpus=['a100-80gb'])\n"
        "bad = {'rich', 'typer', 'torch', 'transformers', 'huggingface_hub'} & set(sys.modules)\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_largest_is_plan_max_json_for_training_and_inference() -> None:
    """`plan --max ... --json` is api.largest's MaxResult.to_json, for a training step and
    for --task infer (one search door)."""
    import json

    from typer.testing import CliRunner

    from vramcalc.api import largest
    from vramcalc.cli import app
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import InferPlan, TrainPlan
    from vramcalc.sizing.verdict import catalog_target

    spec, card = get_spec("qwen2.5-0.5b"), catalog_target(resolve_gpu("t4"))
    r = CliRunner().invoke(app, ["plan", "-m", "qwen2.5-0.5b", "--gpu", "t4", "--max", "batch",
                                 "--no-calibration", "--json"])
    train = largest(spec, TrainPlan(), "batch", card, 2**29)
    assert r.exit_code == 0 and json.loads(r.stdout) == train.to_json()
    assert train.fits and "task" not in train.to_json()
    r = CliRunner().invoke(app, ["plan", "-m", "qwen2.5-0.5b", "--task", "infer", "--gpu", "t4",
                                 "--max", "prompt-len", "--json"])
    infer = largest(spec, InferPlan(), "prompt-len", card, 2**29)
    assert r.exit_code == 0 and json.loads(r.stdout) == infer.to_json()
    assert infer.to_json()["task"] == "infer" and infer.value > 0


def test_check_json_is_check_step_to_json() -> None:
    """`check --gpu ... --json` is api.check_step's CheckReport.to_json (one front door),
    for a plan that fits one card and not the other (suggestions, several GPUs)."""
    import json

    from typer.testing import CliRunner

    from vramcalc.api import check_step
    from vramcalc.cli import app
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.verdict import catalog_target

    said: list[str] = []
    targets = [catalog_target(resolve_gpu(g)) for g in ("t4", "rtx-4090")]
    report = check_step(get_spec("llama-3.1-8b"), TrainPlan(batch_size=8, seq_len=2048),
                        targets, 2**29, say=said.append)
    r = CliRunner().invoke(app, ["check", "-m", "llama-3.1-8b", "--gpu", "t4", "--gpu",
                                 "rtx-4090", "--batch", "8", "--seq-len", "2048", "--json"])
    assert r.exit_code == (0 if report.fits else 3)
    assert json.loads(r.stdout) == json.loads(json.dumps(report.to_json()))
    assert report.best.target.name == "rtx-4090"
    assert any("no bf16" in line for line in said)  # the T4 is planned in fp16
    assert all(line in r.stderr for line in said)


def test_sweep_json_is_api_sweep_to_json() -> None:
    """`sweep --json` is api.sweep's SweepResult.to_json, and each card's "fits up to" is a
    value plan --gpu calls "fits" (one answer)."""
    import json

    from typer.testing import CliRunner

    from vramcalc.api import plan_step, sweep
    from vramcalc.cli import app
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.verdict import catalog_target

    spec, card = get_spec("llama-3.1-8b"), catalog_target(resolve_gpu("rtx-4090"))
    result = sweep(spec, TrainPlan(), "batch", [1, 2, 4, 8], [card], 2**29)
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-3.1-8b", "--over", "batch=1:8",
                                 "--gpu", "rtx-4090", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout) == json.loads(json.dumps(result.to_json()))
    best = result.gpus[0].fits_up_to
    assert best is not None
    at = plan_step(spec, TrainPlan(batch_size=best), target=card, margin_bytes=2**29)
    assert at.verdict is not None and at.verdict.certainty == "fits"


def test_task_json_is_api_task_step_and_check_task() -> None:
    """`plan --task infer|merge --json` and `check --task ... --json` are api.task_step's
    and api.check_task's to_json: the same bytes and verdicts."""
    import json

    from typer.testing import CliRunner

    from vramcalc.api import check_task, task_step
    from vramcalc.cli import app
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import InferPlan, MergePlan
    from vramcalc.sizing.verdict import catalog_target

    spec, card = get_spec("llama-3.1-8b"), catalog_target(resolve_gpu("rtx-4090"))
    for task, task_plan in (("infer", InferPlan()), ("merge", MergePlan())):
        r = CliRunner().invoke(app, ["plan", "-m", "llama-3.1-8b", "--task", task, "--gpu",
                                     "rtx-4090", "--json"])
        answer = task_step(spec, task_plan, target=card, margin_bytes=2**29, time_gpu="rtx-4090")
        assert r.exit_code == (0 if answer.fits else 3)
        assert json.loads(r.stdout) == json.loads(json.dumps(answer.to_json()))
        r = CliRunner().invoke(app, ["check", "-m", "llama-3.1-8b", "--task", task, "--gpu",
                                     "rtx-4090", "--json"])
        report = check_task(spec, task_plan, [card], 2**29)
        assert json.loads(r.stdout) == json.loads(json.dumps(report.to_json()))
        assert report.best.required_bytes == answer.estimate.required_device_bytes


def test_multi_gpu_json_is_api_parallel_step() -> None:
    """`plan --gpus 2 --strategy fsdp --gpu X --json` and its --max are api.parallel_step
    and api.largest_parallel serialized."""
    import json

    from typer.testing import CliRunner

    from vramcalc.api import largest_parallel, parallel_step
    from vramcalc.cli import app
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.memory.multi_gpu import ParallelPlan
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.verdict import catalog_target

    spec, card = get_spec("llama-3.1-8b"), catalog_target(resolve_gpu("rtx-4090"))
    argv = ["plan", "-m", "llama-3.1-8b", "--gpus", "2", "--strategy", "fsdp", "--gpu",
            "rtx-4090", "--json"]
    r = CliRunner().invoke(app, argv)
    # the split as the CLI built it (its per-GPU budget for a device map included)
    par = ParallelPlan(**json.loads(r.stdout)["parallel"])
    assert (par.gpus, par.strategy) == (2, "fsdp")
    result = parallel_step(spec, TrainPlan(), par, card.free_bytes, 2**29,
                           time_gpu="rtx-4090")
    assert r.exit_code == (0 if result.fits else 3) and result.time is not None
    assert json.loads(r.stdout) == json.loads(json.dumps(result.plan_json(card.name)))
    r = CliRunner().invoke(app, [*argv, "--max", "batch"])
    best = largest_parallel(spec, TrainPlan(), par, "batch", card, 2**29)
    assert json.loads(r.stdout) == best.to_json() and best.to_json()["per_gpu"] is True


def test_check_step_estimates_each_plan_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_step on a card the plan does not fit (suggestions, multi-GPU options): every
    plan it estimates through its estimate functions (the cards', the suggestions', the
    multi-GPU options' one-GPU reference) is estimated once (Estimators.raw shared with
    memory.multi_gpu.smallest_fitting_parallel)."""
    from collections import Counter

    import vramcalc.corrections.planning as planning
    import vramcalc.memory.multi_gpu as multi_gpu
    import vramcalc.sizing.search as search
    from vramcalc.api import check_step
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.memory.estimate import estimate, required_bytes
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan
    from vramcalc.sizing.verdict import catalog_target

    seen: Counter[TrainPlan] = Counter()

    def counting(spec, plan, **kw):  # type: ignore[no-untyped-def]
        seen[plan] += 1
        return estimate(spec, plan, **kw)

    read: Counter[TrainPlan] = Counter()  # required bytes read without the replay

    def counting_required(spec, plan, formula=None, **kw):  # type: ignore[no-untyped-def]
        read[plan] += 1
        return required_bytes(spec, plan, formula, **kw)

    monkeypatch.setattr(planning, "estimate", counting)
    monkeypatch.setattr(multi_gpu, "estimate", counting)
    monkeypatch.setattr(search, "required_bytes", counting_required)
    report = check_step(get_spec("llama-3.1-8b"), TrainPlan(batch_size=16, seq_len=4096),
                        [catalog_target(resolve_gpu("rtx-4090"))], 2**29)
    assert not report.fits and report.suggestions  # and the multi-GPU options ran
    # the suggestions' and searches' probes read the required bytes (sizing.search
    # raw_probes: the raw estimate), each plan once, and none of a plan estimated before
    assert len(read) > 5
    assert max(seen.values()) == 1, [p for p, n in seen.items() if n > 1]
    assert max(read.values()) == 1, [p for p, n in read.items() if n > 1]
    assert not set(read) & set(seen)
    est = planning.Estimators(use_calibration=True)
    assert est.raw() is est("rtx-4090")  # no corrections for an RTX 4090: the raw estimate
