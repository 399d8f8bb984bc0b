"""One engine, one answer (issue 26): for the same settings and GPU every command prints the
same required memory to the byte, every "largest batch / longest sequence" is the same
number and the largest value `plan` calls "fits", and a card offers the same bytes.

Settings are drawn at random (seeded): a catalog model, a method, batch, seq-len, rank, a
loss kernel, a batch layout, activation offloading and a catalog GPU; each is run through
`plan`, `check`, `compare`, `fit`, `sweep` (their `--json`) and the Python API. `fit` runs
over a one-model catalog (the drawn model), the rest as a user runs them. Most draws run on
the quick estimate (conftest: the replay off, the same estimator in every command); the
`replay` draws run the full one, the estimate `plan` shows, so a command that still
searched another engine would differ there.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

import pytest
from typer.testing import CliRunner

import vramcalc
from vramcalc.cli import app
from vramcalc.errors import PlanError
from vramcalc.hardware.catalog import catalog as gpu_catalog
from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.memory.estimate import check_loss_kernel
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.models.spec import catalog as model_catalog
from vramcalc.plans import LAYOUTS, LOSS_KERNELS, OFFLOAD_ACTIVATIONS, TrainPlan

runner = CliRunner()
# fit's methods as plan options (comparison.METHOD_SETUPS, with each one's usual optimizer)
METHOD_FLAGS = {
    "full": ["--method", "full", "--optimizer", "adamw_torch_fused"],
    "lora": ["--method", "lora"],
    "qlora": ["--method", "qlora", "--quant", "nf4"],
    "int8": ["--method", "qlora", "--quant", "int8"],
}
API_METHOD = {"full": {"method": "full", "optimizer": "adamw_torch_fused"},
              "lora": {"method": "lora"}, "qlora": {"method": "qlora", "quant": "nf4"},
              "int8": {"method": "qlora", "quant": "int8"}}
COMPARE_ROW = {"full": "full", "lora": "lora", "qlora": "qlora", "int8": "int8"}


class Draw(NamedTuple):
    model: str
    method: str
    batch: int
    seq: int
    rank: int
    gpu: str
    # the switches of issue 29 (TrainPlan.loss_kernel, layout, offload_activations)
    loss_kernel: str = "torch"
    layout: str = "padded"
    offload: str = "none"

    def flags(self, batch: int | None = None, seq: int | None = None,
              swept: str | None = None) -> list[str]:
        """The plan options of this draw, method included (as `plan` / `check` take them):
        no --rank for full fine-tuning and not the option `sweep --over` sets, which both
        are refused."""
        shared = self.shared(batch, seq)
        drop = {"--rank"} if self.method == "full" else set()
        if swept is not None:
            drop.add(swept)
        out = []
        for name, value in zip(shared[::2], shared[1::2], strict=True):
            if name not in drop:
                out += [name, value]
        return ["-m", self.model, *METHOD_FLAGS[self.method], *out]

    def shared(self, batch: int | None = None, seq: int | None = None) -> list[str]:
        """The options compare / fit apply to every row."""
        dropout = ["--lora-dropout", "0"] if get_spec(self.model).is_moe else []
        return ["--batch", str(batch or self.batch), "--seq-len", str(seq or self.seq),
                "--rank", str(self.rank), *dropout, "--loss-kernel", self.loss_kernel,
                "--batch-layout", self.layout, "--offload-activations", self.offload]

    def api(self) -> dict[str, Any]:
        """The switches as API keywords."""
        return {"loss_kernel": self.loss_kernel, "layout": self.layout,
                "offload_activations": self.offload}


def _runnable_kernel(spec: ModelSpec, kernel: str) -> str:
    """The drawn kernel where the model runs it for every method, else torch (a refused
    kernel is tested in tests/memory/program/test_loss_kernels.py)."""
    for method in API_METHOD.values():
        try:
            check_loss_kernel(spec, TrainPlan(**{**method, "loss_kernel": kernel}))
        except PlanError:
            return "torch"
    return kernel


def draws(seed: int, n: int, models: list[ModelSpec]) -> list[Draw]:
    rng = random.Random(seed)
    gpus = [g.name for g in gpu_catalog()]
    out = []
    for _ in range(n):
        spec = rng.choice(models)
        d = Draw(spec.name, rng.choice(list(METHOD_FLAGS)), rng.randint(1, 8),
                 rng.choice([256, 512, 1024, 2048, 4096]), rng.choice([8, 16, 32, 64]),
                 rng.choice(gpus))
        out.append(d._replace(
            loss_kernel=_runnable_kernel(spec, rng.choice(LOSS_KERNELS)),
            layout=rng.choice(LAYOUTS), offload=rng.choice(OFFLOAD_ACTIVATIONS)))
    return out


def cli(*args: str) -> tuple[int, dict[str, Any]]:
    r = runner.invoke(app, list(args))
    assert r.exit_code in (0, 3), (args, r.output)
    return r.exit_code, json.loads(r.stdout)


def plan_json(d: Draw, *extra: str, batch: int | None = None,
              seq: int | None = None) -> dict[str, Any]:
    return cli("plan", *d.flags(batch, seq), *extra, "--json")[1]


def assert_one_answer(d: Draw, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec(d.model)
    card = resolve_gpu(d.gpu)
    offered = card.usable_bytes  # what an empty card offers, in every command

    # plan, without and with the card
    bare = plan_json(d)
    on = plan_json(d, "--gpu", d.gpu)
    need = on["required_device_bytes"]
    assert on["gpu_memory_bytes"] == offered
    if card.bf16_supported:  # on a card without bf16, plan --gpu computes in fp16
        assert need == bare["required_device_bytes"]

    # check --gpu: the same verdict and bytes
    code, chk = cli("check", *d.flags(), "--gpu", d.gpu, "--json")
    best = chk["best_gpu"]
    assert best["required_device_bytes"] == need
    assert best["free_bytes"] == best["empty_bytes"] == offered
    assert (chk["fits"], chk["certainty"]) == (on["fits"], on["certainty"])
    assert (code == 0) == on["fits"]

    # the Python API
    api_options = {**API_METHOD[d.method], "batch_size": d.batch, "seq_len": d.seq,
                   "rank": d.rank, "lora_dropout": 0.0 if spec.is_moe else None, **d.api()}
    assert vramcalc.plan(d.model, **api_options).required_device_bytes == bare[
        "required_device_bytes"]
    (v,) = vramcalc.check(d.model, gpus=[d.gpu], **api_options).verdicts
    assert (v.required_bytes, v.memory_bytes, v.certainty) == (need, offered, on["certainty"])

    # --max: the same number in plan and check, and the largest value plan calls "fits"
    maxima: dict[str, int] = {}
    for what, field in (("batch", "batch"), ("seq-len", "seq")):
        value = plan_json(d, "--gpu", d.gpu, "--max", what)["value"]
        (row,) = cli("check", *d.flags(), "--gpu", d.gpu, "--max", what, "--json")[1]["gpus"]
        assert row["value"] == value and row["free_bytes"] == offered
        at = {field: value} if value else {}
        if value:
            assert plan_json(d, "--gpu", d.gpu, **at)["certainty"] == "fits"
        after = plan_json(d, "--gpu", d.gpu, **{field: value + 1})
        assert after["certainty"] != "fits", (d, what, value)
        maxima[what] = value

    # fit over a catalog of the drawn model: its row is plan's at batch 1 and --max
    with monkeypatch.context() as m:
        m.setattr("vramcalc.models.spec.catalog", lambda: (spec,))
        _, fit = cli("fit", "--gpu", d.gpu, *d.shared(), "--json")
    assert fit["gpu_memory_bytes"] == offered
    (row,) = [r for r in fit["rows"] if r["method"] == d.method]
    if row["error"] is None:
        one = plan_json(d, "--gpu", d.gpu, batch=1)
        assert row["required_device_bytes"] == one["required_device_bytes"]
        assert (row["fits"], row["certainty"]) == (one["fits"], one["certainty"])
        assert row["max_batch"] == maxima["batch"]
        if row["fits"]:  # fit searches the longest sequence only where batch 1 fits
            assert row["max_seq_len"] == maxima["seq-len"]

    # compare: the method's row is plan's; its smallest GPU is one plan calls "fits"
    _, cmp = cli("compare", "-m", d.model, *d.shared(), *(
        ["--optimizer", "adamw_torch_fused"] if d.method == "full" else []), "--json")
    (crow,) = [r for r in cmp["methods"] if r["method"] == COMPARE_ROW[d.method]]
    if crow["error"] is None:
        assert crow["required_device_bytes"] == bare["required_device_bytes"]
        small = crow["smallest_gpu"]
        if small is not None:
            there = plan_json(d, "--gpu", small["name"])
            assert small["memory_bytes"] == there["gpu_memory_bytes"]
            assert small["required_device_bytes"] == there["required_device_bytes"]
            assert small["certainty"] == there["certainty"] == "fits"
            if small["name"] == card.name:
                assert small["memory_bytes"] == offered

    # sweep over the batch: each point is plan's, "fits up to" is plan's rule
    start = max(maxima["batch"] - 2, 1)  # around plan's largest batch
    over = f"batch={start}:{maxima['batch'] + 2}:+1"
    _, sw = cli("sweep", *d.flags(swept="--batch"), "--over", over, "--gpu", d.gpu, "--json")
    (g,) = sw["gpus"]
    assert g["memory_bytes"] == offered
    for p in sw["points"][:2]:  # the series is plan's, without a card
        assert p["required_device_bytes"] == plan_json(d, batch=p["batch"])[
            "required_device_bytes"]
    assert g["fits_up_to"] == (maxima["batch"] or None)


@pytest.mark.parametrize("draw", draws(26, 6, [s for s in model_catalog()]),
                         ids=lambda d: "-".join(map(str, d)))
def test_one_answer_on_the_quick_estimate(draw: Draw, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_answer(draw, monkeypatch)


@pytest.mark.replay
@pytest.mark.parametrize("draw", draws(2026, 2, [s for s in model_catalog()
                                                 if s.num_params() < 2e9]),
                         ids=lambda d: "-".join(map(str, d)))
def test_one_answer_on_the_full_estimate(draw: Draw, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replayed estimate, what `plan` shows (small models: about 0.1 s an estimate)."""
    assert_one_answer(draw, monkeypatch)


def test_every_card_offers_one_number() -> None:
    """An empty catalog card offers its usable bytes in plan, check, fit and sweep."""
    for name in ("rtx-4090", "t4", "h100-sxm"):
        offered = resolve_gpu(name).usable_bytes
        assert cli("plan", "-m", "qwen2.5-0.5b", "--gpu", name, "--json")[1][
            "gpu_memory_bytes"] == offered
        assert cli("check", "-m", "qwen2.5-0.5b", "--gpu", name, "--json")[1]["best_gpu"][
            "free_bytes"] == offered
        assert cli("sweep", "-m", "qwen2.5-0.5b", "--over", "batch=1:2", "--gpu", name,
                   "--json")[1]["gpus"][0]["memory_bytes"] == offered
        assert cli("check", "-m", "qwen2.5-0.5b", "--task", "infer", "--gpu", name,
                   "--json")[1]["best_gpu"]["empty_bytes"] == offered
