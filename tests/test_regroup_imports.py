"""tools/regroup_imports.py, which rewrites code written against the layout before the
regroup (issue 26, Deliver 4): its map points at names that exist, and each import form is
rewritten once (a second run changes nothing)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "regroup_imports.py"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regroup_imports", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_new_name_exists_and_every_old_one_is_gone(tool: ModuleType) -> None:
    for old, new in tool.MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
        if old != "vramcalc.corrections":  # now the package of corrections.factors
            assert importlib.util.find_spec(old) is None, old
    for old, new in tool.SYMBOLS_MOVED.items():
        module, _, name = new.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        old_module, _, old_name = old.rpartition(".")
        # gone from the old module, or only imported there (the same object: defined once)
        assert getattr(importlib.import_module(old_module), old_name, obj) is obj, old
    root = TOOL.parents[1]
    for old, new in tool.TESTS_MOVED.items():
        assert (root / new).is_file() and not (root / old).exists(), old


def test_this_file_is_left_alone(tool: ModuleType) -> None:
    """The examples below are old names on purpose: a run over tests/ skips this file."""
    files = tool.files([Path(__file__).resolve().parent])
    assert Path(__file__).resolve() not in {p.resolve() for p in files}
    assert files  # and it did walk tests/


@pytest.mark.parametrize(("old", "new"), [
    ("from vramcalc.specs import ModelSpec, get_spec",
     "from vramcalc.models.spec import ModelSpec, get_spec"),
    ("from vramcalc import specs", "from vramcalc.models import spec as specs"),
    ("    from vramcalc import api, corrections as corr  # noqa: E402",
     "    from vramcalc import api  # noqa: E402\n"
     "    from vramcalc.corrections import factors as corr"),
    ("from vramcalc.corrections import gpu_family",
     "from vramcalc.corrections.factors import gpu_family"),
    ("from vramcalc.inference import (  # noqa: E402\n    InferPlan,\n    estimate_merge,\n)",
     "from vramcalc.memory.inference import estimate_merge  # noqa: E402\n"
     "from vramcalc.plans import InferPlan"),
    ("from vramcalc.specs import resolve_model",
     "from vramcalc.models.resolve import resolve_model"),
    ("import vramcalc.allocator_replay as r", "import vramcalc.memory.allocator.replay as r"),
    ('monkeypatch.setattr("vramcalc.gpus.query_devices", fake)',
     'monkeypatch.setattr("vramcalc.hardware.devices.query_devices", fake)'),
    ("python -m vramcalc.calibrate.matrix", "python -m vramcalc.calibrate.matrix"),
    ("see src/vramcalc/step_requests.py and tests/test_step_requests.py",
     "see src/vramcalc/memory/program/step.py and "
     "tests/memory/program/test_step_requests.py"),
    ('Extension("vramcalc._replay", ["src/vramcalc/_replay.c"])',
     'Extension("vramcalc.memory.allocator._replay", '
     '["src/vramcalc/memory/allocator/_replay.c"])'),
    ("from vramcalc import plan, check", "from vramcalc import plan, check"),
])
def test_each_form_is_rewritten_once(tool: ModuleType, old: str, new: str) -> None:
    assert tool.rewrite(old) == new
    assert tool.rewrite(new) == new
