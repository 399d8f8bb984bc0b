"""Plain record classes: what `@dataclass` generated for the engine's small types, written once.

`dataclasses.dataclass` builds each class's __init__, __repr__, __eq__ (and, frozen,
__setattr__, __delattr__, __hash__) as source text and exec()s it when the module is
imported (CPython 3.11 Lib/dataclasses.py `_process_class`, `_create_fn`): 0.2-1.1 ms a
class on the shared 2-core dev machine; the 21 dataclasses that `import
vramcalc.corrections.planning` made (4 of program.infer's among them) took 9.8-11.1 ms of
it, timed around `dataclasses._process_class` (2026-12-08). A class here
writes its own __init__ (as fast as the generated one: the step program makes ~10^4 Buf
and Var per generation) and takes the rest from these bases, which read the class's
`_fields` (its fields, in the order the dataclass declared them):

- `Record`: __repr__ as the dataclass wrote it, `Name(field=value, ...)`; no __eq__
  (objects compare by identity: `@dataclass(eq=False)`).
- `Value`: also __eq__ by the fields' tuple, with an object of the very same class only,
  and no __hash__ (a mutable `@dataclass`).
- `Frozen`: a `Value` whose fields cannot be set or deleted after __init__
  (dataclasses.FrozenInstanceError) and that hashes as the tuple of its fields
  (`@dataclass(frozen=True)`). Its __init__ writes the fields through `self.__dict__`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn


class Record:
    """A class of named fields (`_fields`): repr like a dataclass's, identity equality."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({values})"


class Value(Record):
    """A `Record` equal to another of its class with equal fields (unhashable)."""

    __slots__ = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined, no-any-return]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class Frozen(Value):
    """A `Value` that cannot change after __init__ and hashes by its fields."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> NoReturn:
        _refuse(name)

    def __delattr__(self, name: str) -> NoReturn:
        _refuse(name)


def _refuse(name: str) -> NoReturn:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot assign to field {name!r}")
