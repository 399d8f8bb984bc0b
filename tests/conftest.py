"""Unit tests run on the raw estimate: the fitted corrections (shipped and user) are
switched off here, and tested on their own (test_corrections_applied.py); the user data
folder is a temporary one, so no test reads or writes the real one."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_committed_corrections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VRAMCALC_CORRECTIONS", "")
    monkeypatch.setenv("VRAMCALC_DATA_DIR", str(tmp_path / "user-data"))


@pytest.fixture(autouse=True)
def _leaves_no_temporary_files(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test runs with its own empty temp folder (TMPDIR, for subprocesses too) and
    fails if it, or the code it runs, leaves anything there (issue 28: the suite left
    ~30 folders in /tmp)."""
    import tempfile

    scratch = tmp_path_factory.mktemp("system-tmp")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def nothing_left() -> None:
        # torch's compile cache, one folder per user reused by every run
        # (torch/_inductor/runtime/cache_dir_utils.py default_cache_dir): not a leftover.
        left = sorted(p.name for p in scratch.iterdir()
                      if not p.name.startswith("torchinductor_"))
        if left:
            pytest.fail(f"left in the temp folder: {', '.join(left)}", pytrace=False)

    request.addfinalizer(nothing_left)


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches the network: an empty Hugging Face cache, offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def _replay_only_where_marked(request: pytest.FixtureRequest,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator replay (vramcalc.memory.program.step, ~0.1-0.7 s per estimate of a full-size
    model on a busy 2-core machine) is what every command shows; tests not marked `replay`
    run without it, on the phase formula and the linear slack rule, by switching the
    default of `estimate()`'s `replay` argument. Every command and search under test then
    still runs one estimator, the same in all of them; tests marked `replay` test the
    replayed numbers themselves."""
    from vramcalc.memory.estimate import estimate, required_bytes

    if request.node.get_closest_marker("replay"):
        return
    # (required_bytes: the estimate's required bytes without building it, fit's rows)
    for fn in (estimate, required_bytes):
        assert fn.__kwdefaults__ is not None
        monkeypatch.setitem(fn.__kwdefaults__, "replay", False)
