"""What every command shares: the error formatter and the output helpers."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from vramcalc.errors import VramcalcError

if TYPE_CHECKING:
    from vramcalc.api import MaxResult
    from vramcalc.models.spec import ModelSpec

P = ParamSpec("P")
R = TypeVar("R")


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a VramcalcError into one `Error: ...` line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except VramcalcError as err:
            typer.echo(f"Error: {one_line(str(err))}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None

    return wrapper


def one_line(text: str) -> str:
    """`text` with control characters (a typed \r or \n in a value) escaped: one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def print_json(obj: Any) -> None:
    """One JSON object on stdout (warnings and hints go to stderr)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def warn(message: str) -> None:
    typer.echo(message, err=True)


def resolve_model_arg(arg: str) -> ModelSpec:
    """--model through the one door (models/resolve.py `resolve`), its warnings and notes
    on stderr."""
    from vramcalc.models.resolve import resolve

    found = resolve(arg)
    for line in found.lines():
        warn(line)
    return found.spec


def uninstalled(names: list[str] | tuple[str, ...], find: Any = None) -> list[str]:
    """The modules of `names` that cannot be imported (not installed), in order; `find`
    replaces importlib.util.find_spec (tests)."""
    import importlib.util

    find = find or importlib.util.find_spec
    missing = []
    for name in names:
        try:
            found = find(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def echo_max(result: MaxResult, at: str) -> None:
    """`plan --max`'s line (training and inference): the value, or that not even 1 fits."""
    from vramcalc.units import GiB

    where = (f"{result.gpu} ({result.gpu_memory_bytes / GiB:.2f} GiB, margin "
             f"{result.margin_bytes / GiB:.2f}) at {at}")
    typer.echo(f"largest {result.max} that fits {where}: {result.value}" if result.fits
               else f"nothing fits {where}, not even {result.max} 1")
