"""Code the command line's libraries compile from text at every start, kept between runs.

Three kinds of text are compiled anew in every process, for every class that has them:
- `@dataclass` writes each method of a class (__init__, __repr__, __eq__, __setattr__...)
  as source text and `exec`s it (CPython 3.11 Lib/dataclasses.py `_create_fn`:
  `exec(txt, globals, ns)`). A cold `vramcalc plan` meets 59 dataclasses of pydantic,
  annotated_types, typer and rich (252 methods); making them took 21.3-21.5 ms, 15.2-15.9
  of it in that exec (2026-12-08, timed around dataclasses._process_class and its exec,
  load average ~5 on the shared 2-core dev machine).
- `typing.ForwardRef` compiles each annotation given as a string (Lib/typing.py
  ForwardRef.__init__: `compile(arg_to_compile, '<string>', 'eval')`): the fields of
  pydantic_core.core_schema's 88 TypedDicts (its annotations are strings: `from
  __future__ import annotations`), and those pydantic and typer resolve. A cold plan
  compiles 1035 of them, 8.3 ms; compare 1210, 10.5 ms; check 1233, 9.7 ms (2026-12-08,
  timed around typing's compile, load average ~1.4).
- `collections.namedtuple` (and typing.NamedTuple through it) evaluates each class's
  __new__ as a lambda's text (Lib/collections/__init__.py namedtuple: `__new__ =
  eval(code, namespace)`): 50 classes in a cold plan, 2.5 ms; 67-68 in check and compare,
  3.1-3.2 ms (2026-12-08, timed around that eval).

`install` gives the dataclasses module an `exec`, the typing module a `compile` and the
collections module an `eval` that look the text up in one table of code objects read from
a marshal file (`cache_file`), compile a text the table does not hold as the library's own
call would (file name "<string>", no inherited __future__ flags: these three modules have
none), and, once the command is done, write the table back with the texts compiled in
this run (never where bytecode is not written: PYTHONDONTWRITEBYTECODE,
sys.dont_write_bytecode). The same text compiled by the same interpreter is the same code
object, so every class, annotation and tuple comes out as before; a text that does not
compile raises as before (and is not kept). With the table, a cold plan spends 0.4-0.6 ms
in dataclasses' exec, 0.6 in typing's compile and 0.24 in namedtuple's eval, 1.3 ms
reading the table (531 code objects, 241 KB). The file is named by the interpreter's
cache tag (cpython-311) and marshal's version, like a .pyc, and begins with the bytecode's
MAGIC_NUMBER, as a .pyc does; one that cannot be read or written, or of another bytecode,
is ignored (the texts are compiled, as before). Only the command line installs it
(`vramcalc.cli`), and only for the light commands (`vramcalc.cli.CACHED_COMMANDS`), one
table each: `calibrate` imports torch and transformers, whose thousands of dataclasses and
annotations would make every command's table slower to read than compiling its own
texts. `import vramcalc.api` leaves the three modules as they are.
"""

from __future__ import annotations

import atexit
import builtins
import marshal
import os
import sys
from importlib._bootstrap_external import MAGIC_NUMBER
from pathlib import Path
from types import CodeType
from typing import Any

# texts kept at most: every command's are well under (plan: 212 methods, ~1000 annotations)
KEPT = 8192

Key = tuple[str, str]  # (compile mode, source text)


def cache_file(command: str) -> Path:
    """Where the table of `command` lives: beside vramcalc's bytecode (its __pycache__, or
    under sys.pycache_prefix where one is set, as the .pyc files are)."""
    here = os.path.dirname(os.path.abspath(__file__))
    name = f"code_cache.{command}.{sys.implementation.cache_tag}.m{marshal.version}.bin"
    if sys.pycache_prefix:
        return Path(sys.pycache_prefix + here) / name
    return Path(here) / "__pycache__" / name


def _read(path: Path) -> dict[Key, CodeType]:
    """The table in `path`: {} where there is none, it is not one, or another bytecode
    (MAGIC_NUMBER, the .pyc files' first 4 bytes) wrote it."""
    try:
        data = path.read_bytes()
        if data[:4] != MAGIC_NUMBER:
            return {}
        table = marshal.loads(memoryview(data)[4:])
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items()
            if type(k) is tuple and len(k) == 2 and isinstance(v, CodeType)}


class CodeCache:
    """Code objects by (mode, text): from `table`, else compiled and kept in `made`."""

    def __init__(self, table: dict[Key, CodeType]) -> None:
        self.table = table
        self.made: dict[Key, CodeType] = {}

    def code(self, source: str, mode: str) -> CodeType:
        key = (mode, source)
        code = self.table.get(key)
        if code is None:
            code = self.made[key] = compile(source, "<string>", mode, dont_inherit=True)
        return code

    def exec(self, source: Any, globals: Any = None, locals: Any = None) -> None:  # noqa: A002
        """dataclasses' `exec(txt, globals, ns)`."""
        exec(self.code(source, "exec") if type(source) is str else source, globals, locals)

    def eval(self, source: Any, globals: Any = None, locals: Any = None) -> Any:  # noqa: A002
        """namedtuple's `eval(code, namespace)` (a text with leading blanks, which eval
        strips and compile would not, is evaluated as it is)."""
        if type(source) is str and source[:1] not in (" ", "\t"):
            return eval(self.code(source, "eval"), globals, locals)
        return eval(source, globals, locals)

    def compile(self, source: Any, filename: Any, mode: Any, flags: int = 0,
                dont_inherit: bool = False, optimize: int = -1) -> Any:
        """typing's `compile(arg, '<string>', 'eval')`; another call is compiled as it
        asks (with typing's own flags: none)."""
        if type(source) is str and filename == "<string>" and not flags and optimize == -1:
            return self.code(source, mode)
        return builtins.compile(source, filename, mode, flags, True, optimize)


def install(path: Path) -> CodeCache | None:
    """Give dataclasses, typing and collections the `exec`, `compile` and `eval` of one
    CodeCache reading and writing `path` (`cache_file`; module docstring). None (nothing
    done) where dataclasses has an `exec` of its own already."""
    import collections
    import dataclasses
    import typing

    if getattr(dataclasses, "exec", None) is not None:
        return None
    cache = CodeCache(_read(path))
    dataclasses.exec = cache.exec  # type: ignore[attr-defined]
    typing.compile = cache.compile  # type: ignore[attr-defined]
    collections.eval = cache.eval  # type: ignore[attr-defined]
    if not sys.dont_write_bytecode:
        atexit.register(_write, path, cache)
    return cache


def _write(path: Path, cache: CodeCache) -> None:
    """The table with this run's texts, where it compiled any (all of them replace a table
    past KEPT texts)."""
    made, table = cache.made, cache.table
    if not made:
        return
    merged = {**table, **made} if len(table) + len(made) <= KEPT else made
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(MAGIC_NUMBER + marshal.dumps(merged))
        os.replace(tmp, path)
    except OSError:
        try:  # a partly written table is not left behind (a full disk, say)
            tmp.unlink()
        except OSError:
            pass
