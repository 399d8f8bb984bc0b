"""Data shipped in the wheel (GPU catalog, fitted corrections), read via importlib.resources."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vramcalc.models.catalog_index import FolderIndex, package_folder


@functools.cache
def _index() -> FolderIndex:
    return FolderIndex(package_folder("vramcalc.data"))


def shipped_yaml(name: str, parse: Callable[[str], Any]) -> Any:
    """The parsed mapping of vramcalc/data/NAME: from the folder's index where it holds
    this file's text (models/catalog_index.py), else `parse(text)` (PyYAML)."""
    text = (package_folder("vramcalc.data") / name).read_text(encoding="utf-8")
    found, data = _index().parsed(name, text)
    return data if found else parse(text)
