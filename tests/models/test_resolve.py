"""One door for `--model` (models/resolve.py `resolve`): the CLI, the API and the page get
the same spec and the same notes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vramcalc import api
from vramcalc.cli import app
from vramcalc.errors import PlanError
from vramcalc.models.resolve import resolve, resolve_model
from vramcalc.models.spec import get_spec

VISION = Path(__file__).resolve().parents[1] / "fixtures" / "hub" / "meta-llama" / \
    "Llama-3.2-11B-Vision-Instruct"


def test_multimodal_notes_are_the_same_on_every_path() -> None:
    found = resolve(str(VISION))
    assert any("multimodal" in n for n in found.spec.notes)
    r = CliRunner().invoke(app, ["plan", "--model", str(VISION), "--json"])
    assert r.exit_code == 0, r.stderr
    printed = [line for line in r.stderr.splitlines() if line.startswith(("note:", "warning:"))]
    assert printed == found.lines()
    est = api.plan(str(VISION))
    assert list(est.notes[:len(found.spec.notes)]) == list(found.spec.notes)
    assert json.loads(r.stdout)["required_device_bytes"] == est.required_device_bytes
    # check's API result carries them too
    checked = api.check(str(VISION), gpus=["a100-80gb"])
    assert list(checked.estimate.notes[:len(found.spec.notes)]) == list(found.spec.notes)


def test_catalog_name_and_folder_here_warns_on_every_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "llama-3.1-8b").mkdir()
    monkeypatch.chdir(tmp_path)
    found = resolve("llama-3.1-8b")
    assert found.spec == get_spec("llama-3.1-8b")
    assert len(found.warnings) == 1 and "using the catalog model" in found.warnings[0]
    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--json"])
    assert r.exit_code == 0
    assert found.warnings[0] in r.stderr
    assert api.plan("llama-3.1-8b").notes[0] == found.warnings[0]


def test_empty_model_is_one_error_on_every_path() -> None:
    with pytest.raises(PlanError, match="--model is empty"):
        resolve_model("")
    with pytest.raises(PlanError, match="--model is empty"):
        api.plan(" ")


def test_a_spec_goes_through_as_is() -> None:
    spec = get_spec("qwen2.5-0.5b")
    assert resolve(spec).spec is spec and resolve(spec).warnings == ()
