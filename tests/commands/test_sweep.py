"""`vramcalc sweep`: the series, the GPU lines, the chart, the files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.commands.sweep import parse_over
from vramcalc.errors import PlanError
from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.memory.estimate import estimate
from vramcalc.models.spec import get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.verdict import fits_certainly


def test_parse_over() -> None:
    assert parse_over("seq-len=512:4096").values == [512, 1024, 2048, 4096]
    assert parse_over("batch=1:10:+4").values == [1, 5, 9, 10]
    assert parse_over("rank=8:256:3").values == [8, 45, 256]
    assert parse_over("batch=1:9:*3").values == [1, 3, 9]


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("lr=1:2", "--over: cannot sweep 'lr'"),
        ("seq-len=512", "--over 'seq-len=512': expected NAME=START:STOP[:STEP]"),
        ("batch=8:4", "--over batch: need 0 < START < STOP"),
        ("batch=1:1000:+1", "--over batch: 1000 points"),
    ],
)
def test_parse_over_errors(text: str, start: str) -> None:
    with pytest.raises(PlanError) as err:
        parse_over(text)
    assert str(err.value).startswith(start)


def test_json_series_and_where_each_gpu_stops() -> None:
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-3.1-8b", "--over", "seq-len=512:32768",
                                 "--gpu", "rtx-4090", "--gpu", "a100-80gb", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    spec = get_spec("llama-3.1-8b")
    pts = out["points"]
    assert [p["seq-len"] for p in pts] == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    for p in pts:  # the raw estimate of the same plan (conftest switches corrections off)
        est = estimate(spec, TrainPlan(seq_len=p["seq-len"]))
        assert p["required_device_bytes"] == est.required_device_bytes
    req = [p["required_device_bytes"] for p in pts]
    assert req == sorted(req)
    for gpu in out["gpus"]:  # the bytes plan --gpu offers, and its rule for "fits"
        assert gpu["memory_bytes"] == resolve_gpu(gpu["name"]).usable_bytes
        fit = [p["seq-len"] for p in pts if fits_certainly(
            gpu["memory_bytes"], p["required_device_bytes"], gpu["margin_bytes"])]
        assert gpu["fits_up_to"] == (max(fit) if fit else None)
    assert out["gpus"][0]["name"] == "rtx-4090" and out["gpus"][0]["fits_up_to"] < 32768


def test_csv_and_chart() -> None:
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--over", "batch=1:8", "--csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [int(row["batch"]) for row in rows] == [1, 2, 4, 8]
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--over", "batch=1:8",
                                 "--gpu", "rtx-4090"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[-1].startswith("  |1: rtx-4090 (23.8 GiB): ")  # usable: as plan --gpu


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--over", "x=1:2"])
    assert (r.exit_code, r.stderr) == (1, "Error: --over: cannot sweep 'x'; use one of "
                                          "seq-len, batch, rank\n")
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--plot", str(tmp_path / "a.gif")])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: --plot ") and "must end in .png or .svg" in r.stderr


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_file(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    f = tmp_path / f"sweep.{suffix}"
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--over", "seq-len=512:4096",
                                 "--gpu", "rtx-4090", "--plot", str(f)])
    assert r.exit_code == 0, r.output
    head = f.read_bytes()[:64]
    assert head.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in f.read_bytes()[:2000]
    assert [p.name for p in tmp_path.iterdir()] == [f.name]  # no temporary file left


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    r = CliRunner().invoke(app, ["sweep", "-m", "llama-7b", "--plot", str(tmp_path / "a.png")])
    assert r.exit_code == 1
    assert r.stderr == "Error: --plot needs matplotlib: pip install 'qlora-vramcalc[plot]'\n"
    assert not list(tmp_path.iterdir())
