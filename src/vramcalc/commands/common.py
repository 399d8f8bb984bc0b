"""What every command shares: the error formatter and the output helpers."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from vramcalc.errors import VramcalcError

if TYPE_CHECKING:
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
    """--model as the user meant it: a catalog name, alias, spec YAML or config.json.

    A bare name that is both a catalog entry and a folder here goes to the catalog, unless the
    folder holds a config.json; either way a warning says which was used. `./name` is always
    the folder.
    """
    from vramcalc.errors import PlanError, SpecError, UnknownModelError
    from vramcalc.models.resolve import resolve_model
    from vramcalc.models.spec import get_spec

    if not arg.strip():
        raise PlanError("--model is empty; give a catalog name (see 'vramcalc models'), "
                        "a config.json or its folder, or a spec YAML")
    import stat

    from vramcalc.user_files import probe

    path = Path(arg).expanduser()
    path_like = arg.startswith((".", "/", "~")) or path.suffix in {".json", ".yaml", ".yml"}
    found = probe(path, arg, SpecError)  # a locked folder on the way: one line
    if not path_like and found is not None and stat.S_ISDIR(found.st_mode):
        try:
            spec = get_spec(arg)
        except UnknownModelError:
            pass
        else:
            config = probe(path / "config.json", f"{arg}/config.json", SpecError)
            if config is None or not stat.S_ISREG(config.st_mode):
                warn(f"warning: '{arg}' is a catalog model and a folder here without "
                     f"config.json; using the catalog model (write ./{arg} for the folder)")
                return spec
            warn(f"warning: '{arg}' is a catalog model and a folder here with a config.json; "
                 "using the folder's config.json (use an alias from 'vramcalc models --json' "
                 "for the catalog model)")
    if found is not None and not (stat.S_ISDIR(found.st_mode) or stat.S_ISREG(found.st_mode)):
        raise SpecError(f"{arg}: not a file or folder; give a config.json, its folder or a "
                        "spec YAML")
    return resolve_model(arg)


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
