"""vramcalc/code_cache.py: dataclasses and string annotations made from the kept code
objects are those the libraries make themselves, in fresh interpreters (the table written by
one, read by the next)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Prints, for dataclasses of the command line's libraries and one of its own with every
# kind of generated method, each method's code (bytecode, constants, names, annotations,
# defaults) and a few calls, and how many texts were compiled here rather than read.
_PROBE = r"""
import dataclasses, json, sys
from pathlib import Path
cache = None
if sys.argv[1] == "cached":
    from vramcalc import code_cache
    cache = code_cache.install(Path(sys.argv[2]))
import typing
import typer._coercion, pydantic.fields, annotated_types, rich.table
from pydantic_core import core_schema

@dataclasses.dataclass(frozen=True, order=True)
class Point:
    x: int
    y: "list[int]" = dataclasses.field(default_factory=list)
    z: float = 1.5

def const(v):  # a nested code object by its content, not its address
    return [v.co_qualname, v.co_code.hex()] if hasattr(v, "co_code") else repr(v)

def code_of_code(c):
    return [c.co_code.hex(), [const(v) for v in c.co_consts], c.co_names, c.co_flags,
            c.co_filename, c.co_qualname]

def code_of(f):
    c = f.__code__
    return [c.co_code.hex(), [const(v) for v in c.co_consts], c.co_names, c.co_varnames,
            c.co_qualname, c.co_filename, c.co_firstlineno, c.co_flags, repr(f.__defaults__),
            repr(f.__kwdefaults__), repr(getattr(f, "__annotations__", None)), f.__qualname__]

out = {}
for cls in (typer._coercion.TypeDescriptor, pydantic.fields.ComputedFieldInfo,
            annotated_types.Gt, rich.table.Column, Point):
    out[cls.__qualname__] = {name: code_of(f) for name, f in sorted(vars(cls).items())
                             if callable(f) and hasattr(f, "__code__")}
p = Point(1, [2], 3.0)
try:
    p.x = 2
    frozen = "assigned"
except dataclasses.FrozenInstanceError as err:
    frozen = str(err)
out["calls"] = [repr(p), p == Point(1, [2], 3.0), p < Point(2), hash(Point(1, (), 2.0)) ==
                hash(Point(1, (), 2.0)), frozen, repr(annotated_types.Gt(3))]
# string annotations (typing.ForwardRef compiles each): core_schema's TypedDicts, and
# ones evaluated here
refs = [(f"{td.__name__}.{k}", v) for td in (core_schema.IntSchema, core_schema.ModelSchema)
        for k, v in td.__annotations__.items()]
refs += [("made", typing.ForwardRef("dict[str, list[int]] | None")),
         ("unpacked", typing.ForwardRef("*tuple[int, str]"))]
out["refs"] = [[name, ref.__forward_arg__, code_of_code(ref.__forward_code__),
                repr(eval(ref.__forward_code__, vars(core_schema)))] for name, ref in refs]
try:
    typing.ForwardRef("not an expression (")
    bad = "compiled"
except SyntaxError as err:
    bad = str(err)
out["bad"] = bad
# namedtuples (collections evaluates each __new__ from a text)
import collections
Pair = collections.namedtuple("Pair", "left right", defaults=[0])
out["tuples"] = [[cls.__name__, code_of(cls.__new__), repr(cls._field_defaults)]
                 for cls in (Pair, rich.table._Cell)]
out["pair"] = [repr(Pair(1)), Pair(1, 2) == (1, 2)]
out["compiled_here"] = None if cache is None else len(cache.made)
print(json.dumps(out))
"""


def _probe(mode: str, table: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode, str(table)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_classes_from_the_kept_code_are_the_classes_dataclasses_makes(tmp_path: Path) -> None:
    table = tmp_path / "table.bin"
    plain = _probe("plain", table)
    first = _probe("cached", table)  # compiles every text, writes the table at exit
    assert table.is_file()
    second = _probe("cached", table)  # reads them all
    assert plain.pop("compiled_here") is None
    assert first.pop("compiled_here") > 0  # type: ignore[operator]
    assert second.pop("compiled_here") == 0
    assert first == plain
    assert second == plain
    assert plain["calls"][4] == "cannot assign to field 'x'"  # type: ignore[index]
    assert len(plain["refs"]) > 10  # type: ignore[arg-type]
    assert plain["bad"].startswith("Forward reference must be an expression")  # type: ignore[union-attr]


def test_an_unreadable_table_is_compiled_anew(tmp_path: Path) -> None:
    table = tmp_path / "table.bin"
    table.write_bytes(b"not marshal data")
    plain = _probe("plain", tmp_path / "unused.bin")
    broken = _probe("cached", table)
    assert broken.pop("compiled_here") > 0  # type: ignore[operator]
    plain.pop("compiled_here")
    assert broken == plain


def test_only_the_light_commands_keep_their_code() -> None:
    """`vramcalc plan` installs the table (its own); `calibrate` (torch) and no command do
    not: their libraries' texts would make every table slower to read."""
    probe = ("import sys; sys.argv = ['vramcalc', *sys.argv[1:]]; import dataclasses, typing, "
             "collections, vramcalc.cli; ex = getattr(dataclasses, 'exec', None); "
             "print(ex is not None, getattr(typing, 'compile', None) is not None, "
             "getattr(collections, 'eval', None) is not None)")
    for argv, want in ((["plan"], "True True True"), (["calibrate"], "False False False"),
                       ([], "False False False"), (["--help"], "False False False")):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                              text=True, check=True)
        assert done.stdout.strip() == want, argv


def test_a_table_of_another_bytecode_is_not_read(tmp_path: Path) -> None:
    """A table begins with the bytecode's MAGIC_NUMBER (as a .pyc): one written by another
    interpreter's bytecode is ignored, every text compiled anew."""
    table = tmp_path / "table.bin"
    _probe("cached", table)  # writes it
    data = table.read_bytes()
    table.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # another magic number
    again = _probe("cached", table)
    assert again.pop("compiled_here") > 0  # type: ignore[operator]
    plain = _probe("plain", tmp_path / "unused.bin")
    plain.pop("compiled_here")
    assert again == plain
