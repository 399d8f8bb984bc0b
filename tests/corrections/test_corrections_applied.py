"""`plan` and `check` apply corrections only where they match (GPU family, installed
stack) and helped in the held-out replay, say which and from where (or why not), let a
user entry beat the shipped one, and `--no-calibration` turns them off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.corrections import factors as corr

runner = CliRunner()
STACK = corr.installed_stack() or "torch2.11-transformers5.17"


def _entry(**kw: object) -> corr.Corrections:
    base: dict[str, object] = dict(gpu_family="H100", stack=STACK, k_act=1.5, k_slack=2.0,
                                   context_bytes=2**30, n_points=7, models=("x",), helps=True)
    return corr.Corrections.model_validate({**base, **kw})


@pytest.fixture(autouse=True)
def _clear_caches() -> None:
    corr._load_cached.cache_clear()
    corr.shipped_entries.cache_clear()


@pytest.fixture
def corrections_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "corrections.json"
    corr.save(path, [_entry()])
    monkeypatch.setenv("VRAMCALC_CORRECTIONS", str(path))
    return path


def _plan(*extra: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    r = runner.invoke(app, ["plan", "-m", "llama-3.1-8b", "--batch", "4", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), r.stderr


def _check(gpu: str, *extra: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    r = runner.invoke(app, ["check", "-m", "llama-3.1-8b", "--gpu", gpu, "--json", *extra])
    assert r.exit_code in (0, 3), r.output
    return json.loads(r.stdout), r.stderr


def test_check_applies_and_reports_corrections(corrections_file: Path) -> None:
    corrected, note = _check("h100")
    raw, quiet = _check("h100", "--no-calibration")
    assert "applied H100 corrections" in note and "7 measured points" in note
    assert str(corrections_file) in note
    assert quiet == ""
    assert corrected["calibration"] == f"H100/{STACK}"
    assert raw["calibration"] is None
    est, raw_est = corrected["estimate"], raw["estimate"]
    assert est["peak_allocated_bytes"] > raw_est["peak_allocated_bytes"]
    assert est["components"]["cuda_context"] == 2**30
    assert sum(est["components"].values()) == est["peak_device_bytes"]


def test_other_family_and_plan_without_gpu_stay_raw(corrections_file: Path) -> None:
    other, note = _check("rtx-4090")
    assert other["calibration"] is None and "no corrections for RTX 4090" in note
    out, note = _plan()
    assert out["calibration"] is None and "no GPU is named" in note


def test_entry_that_did_not_help_is_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.json"
    corr.save(path, [_entry(helps=False)])
    monkeypatch.setenv("VRAMCALC_CORRECTIONS", str(path))
    out, note = _check("h100")
    assert out["calibration"] is None and "did not reduce the error" in note


def test_other_stack_is_not_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    corr.save(path, [_entry(stack="torch1.0-transformers1.0")])
    monkeypatch.setenv("VRAMCALC_CORRECTIONS", str(path))
    out, note = _check("h100")
    assert out["calibration"] is None and "torch1.0-transformers1.0" in note


def test_light_install_applies_nothing(
    corrections_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corr, "installed_stack", lambda: None)
    out, note = _check("h100")
    assert out["calibration"] is None and "torch/transformers not installed" in note


def test_user_entry_beats_the_shipped_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VRAMCALC_CORRECTIONS")
    shipped = _entry(k_act=1.1, n_points=50)
    monkeypatch.setattr(corr, "shipped_entries", lambda: (shipped,))
    out, note = _check("h100")
    assert "from the shipped file" in note and out["calibration"] == f"H100/{STACK}"
    user = corr.user_corrections_path()
    corr.save(user, [_entry(k_act=1.3, n_points=4)])
    corr._load_cached.cache_clear()
    (entry, origin), = corr.available()
    assert entry.k_act == 1.3 and origin == str(user)
    out, note = _check("h100")
    assert f"from {user} (user entry, replaces the shipped one)" in note


def test_the_metadata_scan_agrees_with_importlib_metadata(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """factors._scanned_versions gives importlib.metadata.version for every installed
    distribution (and None for one that is not), and leaves a zip on sys.path to it."""
    import sys
    from importlib.metadata import distributions, version

    names = sorted({d.metadata["Name"] for d in distributions()})
    assert len(names) > 20
    scanned = corr._scanned_versions([*names, "no-such-distribution-x"])
    assert scanned is not None
    assert scanned[:-1] == [version(n) for n in names]
    assert scanned[-1] is None
    zipped = tmp_path / "lib.zip"
    zipped.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive
    monkeypatch.setattr(sys, "path", [str(zipped), *sys.path])
    assert corr._scanned_versions(["torch"]) is None
