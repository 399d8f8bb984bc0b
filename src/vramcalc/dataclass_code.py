"""The code dataclasses compiles for each class, kept between runs of the command line.

`@dataclass` writes each method of a class (__init__, __repr__, __eq__, __setattr__...) as
source text and `exec`s it (CPython 3.11 Lib/dataclasses.py `_create_fn`: `exec(txt,
globals, ns)`), compiling that text anew in every process. A cold `vramcalc plan` meets
59 dataclasses of pydantic, annotated_types, typer and rich (252 methods); compiling them
took most of the ~20 ms their classes cost (2026-12-08, timed around
dataclasses._process_class and its exec on the shared 2-core dev machine).

`install` gives the dataclasses module an `exec` that looks the text up in a table of
code objects read from one marshal file (`cache_file`), compiles a text it does not hold
as exec() would (file name "<string>", no inherited __future__ flags: dataclasses.py has
none), runs the code object with the same globals and namespace, and, once the command is
done, writes the table back with the texts compiled in this run (never where bytecode is
not written: PYTHONDONTWRITEBYTECODE, sys.dont_write_bytecode). The same text compiled by
the same interpreter is the same code object, so every class comes out as it did; the file
is named by the interpreter's cache tag (cpython-311) and marshal's version, like a .pyc.
A file that cannot be read or written is ignored: the texts are compiled, as before.
Only the command line installs it (`vramcalc.cli.main`); `import vramcalc.api` leaves
dataclasses as it is.
"""

from __future__ import annotations

import atexit
import marshal
import os
import sys
from pathlib import Path
from types import CodeType
from typing import Any

# texts kept at most: every class of the commands' imports is well under (252 for plan)
KEPT = 4096


def cache_file() -> Path:
    """Where the table lives: beside vramcalc's bytecode (its __pycache__, or under
    sys.pycache_prefix where one is set, as the .pyc files are)."""
    here = Path(__file__).resolve().parent
    name = f"dataclass_code.{sys.implementation.cache_tag}.m{marshal.version}.bin"
    if sys.pycache_prefix:
        return Path(sys.pycache_prefix + str(here)) / name
    return here / "__pycache__" / name


def _read(path: Path) -> dict[str, CodeType]:
    try:
        table = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, CodeType)}


class CachedExec:
    """dataclasses' `exec`: the code of a text from `table`, else compiled as exec() would
    and kept in `made`."""

    def __init__(self, table: dict[str, CodeType]) -> None:
        self.table = table
        self.made: dict[str, CodeType] = {}

    def __call__(self, source: Any, globals: Any = None, locals: Any = None) -> None:  # noqa: A002
        if type(source) is not str:
            exec(source, globals, locals)
            return
        code = self.table.get(source)
        if code is None:
            code = self.made[source] = compile(source, "<string>", "exec", dont_inherit=True)
        exec(code, globals, locals)


def install(path: Path | None = None) -> None:
    """Give dataclasses a `CachedExec` reading and writing `path` (None: `cache_file()`;
    module docstring); a no-op where dataclasses has an `exec` of its own already."""
    import dataclasses

    if getattr(dataclasses, "exec", None) is not None:
        return
    if path is None:
        path = cache_file()
    cached = CachedExec(_read(path))
    dataclasses.exec = cached  # type: ignore[attr-defined]
    if not sys.dont_write_bytecode:
        atexit.register(_write, path, cached)


def _write(path: Path, cached: CachedExec) -> None:
    """The table with this run's texts, where it compiled any (all of them replace a table
    past KEPT texts)."""
    made = cached.made
    if not made:
        return
    table = cached.table
    merged = {**table, **made} if len(table) + len(made) <= KEPT else made
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps(merged))
        os.replace(tmp, path)
    except OSError:
        pass
