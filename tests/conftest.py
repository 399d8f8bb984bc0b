"""Unit tests run on the raw estimate: the committed corrections (calibration/) are
switched off here, and tested on their own (test_corrections_applied.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_committed_corrections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMCALC_CORRECTIONS", "")


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches the network: an empty Hugging Face cache, offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    monkeypatch.delenv("HF_TOKEN", raising=False)
