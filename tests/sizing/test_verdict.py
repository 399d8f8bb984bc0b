"""plan and check answer "does it fit?" with one rule (vramcalc.sizing.verdict), on every catalog
GPU x catalog model; readable at 80 columns."""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from vramcalc.api import checked_on
from vramcalc.commands import check as check_mod
from vramcalc.corrections.planning import Estimators
from vramcalc.hardware.catalog import MIB, catalog, resolve_gpu
from vramcalc.memory.estimate import estimate
from vramcalc.models.spec import catalog as model_catalog
from vramcalc.models.spec import get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.advice import for_gpu, smallest_fitting_gpu, suggest
from vramcalc.sizing.verdict import Target, catalog_target, certainty, fits_certainly, verdict

GIB = 2**30
MARGIN = GIB // 2
runner = CliRunner()


def test_empty_h100_offers_its_total_less_the_reservation() -> None:
    h100 = resolve_gpu("h100")
    assert h100.memory_bytes == 81559 * MIB and h100.usable_bytes == 81079 * MIB
    assert f"{h100.usable_bytes / GIB:.2f}" == "79.18"
    assert all(0 < g.usable_bytes < g.memory_bytes for g in catalog())


def test_verdict_rule() -> None:
    assert verdict(10, 9, 1).fits and not verdict(10, 9, 2).fits
    assert verdict(10, 12, 0).headroom_bytes == -2


def test_fits_certainly_is_the_fits_certainty() -> None:
    """The searches' rule (fits_certainly, a bisectable need) is exactly `certainty`'s
    "fits", for any band: every required, least and margin around the spread's edges."""
    mib = 2**20
    for required in (0, 100 * mib, 8 * GIB, 20 * GIB, 40 * GIB):
        for low in (None, required - 300 * mib, required - 2 * GIB):
            for margin in (0, 100 * mib, MARGIN, 2 * GIB):
                for memory in range(max(required - 3 * GIB, 0), required + 3 * GIB, 7 * mib):
                    assert fits_certainly(memory, required, margin) == (
                        certainty(memory, required, margin, low) == "fits")


@pytest.mark.parametrize("batch", [1, 8])
def test_plan_and_check_agree_on_every_gpu_and_model(batch: int) -> None:
    """The same pure function and the same usable memory decide both commands."""
    gpus = catalog()
    targets = [catalog_target(g) for g in gpus]
    mismatches = []
    for spec in model_catalog():
        # MoE experts under peft 0.21 need lora_dropout 0 (the default plan cannot start)
        base = TrainPlan(batch_size=batch, lora_dropout=0.0 if spec.is_moe else 0.05)
        for gpu, t in zip(gpus, targets, strict=True):
            plan = for_gpu(base, gpu.bf16_supported)
            est = estimate(spec, plan)
            by_plan = verdict(t.free_bytes, est.required_device_bytes, MARGIN, est.required_low)
            by_check = checked_on(spec, base, [t], MARGIN,
                                Estimators(False))[0]
            if by_plan.fits != by_check.fits_free or by_check.now != by_plan:
                mismatches.append((spec.name, gpu.name))
    assert not mismatches


@pytest.mark.parametrize(("model", "gpu", "batch"), [
    ("llama-3.1-8b", "rtx-4090", 1), ("llama-3.1-8b", "t4", 4), ("qwen2.5-7b", "h100", 32),
    ("llama-3.1-70b", "a100-40gb", 1), ("llama-3.1-70b", "h100", 1),
])
def test_cli_plan_and_check_agree(model: str, gpu: str, batch: int) -> None:
    args = ["--model", model, "--gpu", gpu, "--batch", str(batch), "--json"]
    p = runner.invoke(__import__("vramcalc.cli").cli.app, ["plan", *args])
    c = runner.invoke(__import__("vramcalc.cli").cli.app, ["check", *args])
    pj, cj = json.loads(p.stdout), json.loads(c.stdout)
    assert pj["fits"] == cj["fits"] and p.exit_code == c.exit_code
    assert pj["required_device_bytes"] == cj["best_gpu"]["required_device_bytes"]
    assert pj["gpu_memory_bytes"] == cj["best_gpu"]["free_bytes"] == resolve_gpu(gpu).usable_bytes


def test_several_gpus_one_verdict_each() -> None:
    from vramcalc.cli import app

    r = runner.invoke(app, ["check", "-m", "llama-3.1-8b", "--gpu", "t4", "--gpu", "h100",
                            "--batch", "16", "--seq-len", "2048", "--json"])
    data = json.loads(r.stdout)
    assert [v["name"] for v in data["gpus"]] == ["t4", "h100-sxm"]
    assert data["best_gpu"]["name"] == "h100-sxm"
    assert r.exit_code == (0 if data["fits"] else 3)


def test_check_max_per_gpu() -> None:
    from vramcalc.cli import app

    r = runner.invoke(app, ["check", "-m", "qwen2.5-7b", "--gpu", "rtx-4090", "--gpu", "h100",
                            "--max", "batch", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["gpus"]
    spec = get_spec("qwen2.5-7b")
    for row in rows:
        n = row["value"]
        need = [estimate(spec, TrainPlan(batch_size=b)).required_device_bytes for b in (n, n + 1)]
        assert fits_certainly(row["free_bytes"], need[0], MARGIN)
        assert not fits_certainly(row["free_bytes"], need[1], MARGIN)
    assert rows[0]["value"] < rows[1]["value"]


def test_batch_suggestion_keeps_the_effective_batch_exactly() -> None:
    spec = get_spec("llama-3.1-8b")
    for asked in (8, 12, 7):
        plan = TrainPlan(batch_size=asked, seq_len=4096)
        need = estimate(spec, plan).required_device_bytes
        memory = need - (need - estimate(spec, plan.model_copy(update={"batch_size": 1}))
                         .required_device_bytes) // 2
        (s,) = [s for s in suggest(spec, plan, memory, MARGIN) if s.kind == "batch"]
        size, acc = s.changes["batch_size"], s.gradient_accumulation_steps or 1
        assert size * acc == asked and s.fits
        assert f"effective batch {asked}" in s.description or acc == 1


def test_smallest_gpu_applies_suggestions() -> None:
    spec = get_spec("llama-3.1-70b")
    plan = TrainPlan(batch_size=8, seq_len=2048)
    found = smallest_fitting_gpu(spec, plan, MARGIN, catalog())
    assert found is not None and found.suggestion is not None
    assert fits_certainly(found.gpu.usable_bytes, found.suggestion.required_device_bytes, MARGIN)
    # it is smaller than the smallest GPU the plan fits as is
    as_is = [g for g in catalog() if fits_certainly(
        g.usable_bytes, estimate(spec, for_gpu(plan, g.bf16_supported)).required_device_bytes,
        MARGIN)]
    assert not as_is or found.gpu.usable_bytes < min(g.usable_bytes for g in as_is)


# ---- 80 columns ---------------------------------------------------------------------------

NUMBER = re.compile(r"\d+\.\d\d")


def test_check_tables_keep_whole_numbers_at_80_columns() -> None:
    spec = get_spec("llama-3.1-8b")
    plan = TrainPlan(batch_size=16, seq_len=4096)
    targets = [catalog_target(g) for g in catalog()[:6]] + [
        Target(name="NVIDIA GeForce RTX 4090 with a very long name indeed", index=3, label="3",
               total_bytes=24564 * MIB, free_bytes=123 * MIB, empty_bytes=24000 * MIB)]
    verdicts = checked_on(spec, plan, targets, MARGIN, Estimators(False))
    for detected in (True, False):
        console = Console(width=80, record=True, force_terminal=False)
        console.print(check_mod._verdict_table(verdicts, MARGIN, detected))
        text = console.export_text()
        assert "…" not in text
        assert all(len(line) <= 80 for line in text.splitlines())
        for v in verdicts:
            assert f"{v.estimate.required_device_bytes / GIB:.2f}" in text
            assert f"{v.headroom_bytes / GIB:+.2f}" in text


@pytest.mark.parametrize("cmd", ["plan", "check", "gpus", "models", "calibrate"])
def test_help_at_80_columns_cuts_no_option(cmd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from vramcalc.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    r = runner.invoke(app, [cmd, "--help"], terminal_width=80)
    assert r.exit_code == 0 and "…" not in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    if cmd in ("plan", "check"):
        for name in ("--gradient-checkpointing", "--no-gradient-checkpointing", "--margin",
                     "--double-quant", "--gpu-memory"):
            assert name in r.stdout
        assert "required free memory + --margin" in " ".join(r.stdout.split())


# ---- certainty: fits / tight / does_not_fit (issue 11) -------------------------------------


def test_certainty_band() -> None:
    from vramcalc.sizing.verdict import SPREAD_ABS_BYTES, SPREAD_REL, spread_bytes

    # small plans: the absolute 256 MiB; large ones: 3 % of the required bytes
    assert spread_bytes(GIB) == SPREAD_ABS_BYTES == 256 * MIB
    assert spread_bytes(100 * GIB) == int(SPREAD_REL * 100 * GIB) == int(3.0 * GIB)
    need = 20 * GIB
    spread = spread_bytes(need)
    assert verdict(need + 2 * GIB, need, MARGIN).certainty == "fits"
    assert verdict(need + spread, need, MARGIN).certainty == "fits"  # headroom == spread
    tight = verdict(need + spread - 1, need, MARGIN)
    assert tight.certainty == "tight" and tight.fits and tight.word == "fits, tight"
    assert "spread" in tight.tight_reason
    short = verdict(need + MARGIN - 1, need, MARGIN)
    assert short.certainty == "does_not_fit" and not short.fits
    # the allocator band: at least `low`, at most `need`
    low = need - 3 * GIB
    band = verdict(need - GIB, need, MARGIN, low)
    assert band.certainty == "tight" and band.fits
    assert "needs 17.00 GiB at least" in band.tight_reason
    assert verdict(low + MARGIN, need, MARGIN, low).certainty == "tight"
    assert not verdict(low + MARGIN - 1, need, MARGIN, low).fits
    assert verdict(need + 2 * GIB, need, MARGIN, low).certainty == "fits"
    d = band.model_dump()
    assert d["certainty"] == "tight" and d["spread_bytes"] == spread


def _seq_len_with_headroom(lo_gib: float, hi_gib: float, low: bool = False) -> int:
    """A seq-len whose llama-3.1-8b plan leaves lo..hi GiB of an empty rtx-4090 (above
    required_device_bytes, or above required_low)."""
    spec, usable = get_spec("llama-3.1-8b"), resolve_gpu("rtx-4090").usable_bytes
    for seq in range(2048, 8192, 64):
        est = estimate(spec, TrainPlan(seq_len=seq))
        head = usable - (est.required_low if low else est.required_device_bytes)
        if lo_gib * GIB <= head < hi_gib * GIB:
            return seq
    raise AssertionError("no such seq-len")


def test_plan_and_check_say_tight_and_exit_0() -> None:
    from vramcalc.cli import app

    seq = _seq_len_with_headroom(-0.3, 0.3)  # inside the allocator band
    args = ["-m", "llama-3.1-8b", "--gpu", "rtx-4090", "--seq-len", str(seq)]
    for cmd in ("plan", "check"):
        r = runner.invoke(app, [cmd, *args], terminal_width=80)
        assert r.exit_code == 0, r.output
        text = " ".join(r.stdout.split())
        assert "fits, tight" in text and "GiB if the allocator's cached segments" in text
        assert all(len(line) <= 80 for line in r.stdout.splitlines())
        j = runner.invoke(app, [cmd, *args, "--json"])
        assert j.exit_code == 0
        data = json.loads(j.stdout)
        assert data["fits"] is True and data["certainty"] == "tight"
    comfy = str(_seq_len_with_headroom(1.5, 4.0))
    data = json.loads(runner.invoke(app, ["plan", *args[:4], "--seq-len", comfy,
                                          "--json"]).stdout)
    assert data["certainty"] == "fits"
    over = runner.invoke(app, ["check", *args[:4], "--seq-len", "16384", "--json"])
    assert over.exit_code == 3
    assert json.loads(over.stdout)["gpus"][0]["certainty"] == "does_not_fit"
