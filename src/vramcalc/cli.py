"""The `vramcalc` command line: parse, call, render, choose the exit code.

Each command lives in `vramcalc.commands.<name>` and is imported only when it runs:
`vramcalc plan` loads the estimator and nothing of `calibrate`, and `vramcalc --help`
loads no command at all (its listing uses the one-line summaries in COMMANDS, which a
test keeps equal to the commands' own docstrings). Heavy libraries (torch, transformers,
bitsandbytes, peft, pynvml) are imported inside command bodies only.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import os
import sys
import types
import typing
from typing import Any, NamedTuple

from vramcalc import code_cache

# The commands whose imports code_cache keeps compiled, one table each (not `calibrate`,
# which imports torch, nor `serve`, which runs for long); a command is `sys.argv[1]`, as
# `vramcalc plan ...` and `python -m vramcalc plan ...` give it.
CACHED_COMMANDS = ("plan", "check", "compare", "fit", "sweep", "models", "gpus")
if len(sys.argv) > 1 and sys.argv[1] in CACHED_COMMANDS:
    # before typer, pydantic and rich compile their dataclasses and annotations
    code_cache.install(code_cache.cache_file(sys.argv[1]))

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from vramcalc import __version__  # noqa: E402


class LazyCommand(NamedTuple):
    module: str  # vramcalc.commands.<name>
    attr: str  # a command function, or a typer.Typer group
    summary: str  # first line of its help, shown by `vramcalc --help`


COMMANDS: dict[str, LazyCommand] = {
    "models": LazyCommand(
        "vramcalc.commands.models", "models",
        "List the built-in models: parameters, layers, sizes, heads."),
    "plan": LazyCommand(
        "vramcalc.commands.plan", "plan",
        "Estimate the peak GPU memory of a training step, an inference or a merge."),
    "check": LazyCommand(
        "vramcalc.commands.check", "check",
        "List this machine's GPUs, or check whether a plan fits them."),
    "sweep": LazyCommand(
        "vramcalc.commands.sweep", "sweep",
        "Peak memory against sequence length, batch size or LoRA rank, with GPU lines."),
    "compare": LazyCommand(
        "vramcalc.commands.compare", "compare",
        "Compare full fine-tuning, LoRA, QLoRA and 8-bit LoRA of one model."),
    "fit": LazyCommand(
        "vramcalc.commands.fit", "fit",
        "Every catalog model and method that fits one GPU, with its largest batch."),
    "gpus": LazyCommand(
        "vramcalc.commands.gpus", "gpus",
        "List the GPUs that --gpu NAME accepts, with the memory NVML reports."),
    "serve": LazyCommand(
        "vramcalc.commands.serve", "serve",
        "Open a local page to play with a plan: sliders, breakdown chart, verdicts, exports."),
    "calibrate": LazyCommand(
        "vramcalc.commands.calibrate", "app",
        "Measure real QLoRA steps on a GPU, fit corrections, replay the measurements."),
}


_SCALARS = (str, int, float, bool)


class _AlreadyTyped:
    """Coercion of one option that skips typer's when the value already has the option's type.

    typer 0.26+ coerces every value, defaults included, through a pydantic TypeAdapter that
    it builds per option on first use; `plan` has ~45 options, so building them (and
    importing typer._adapters) was a large part of a cold `vramcalc plan` (issue 9). A
    single-valued option's None is None in typer's coercion too; for a plain str / int /
    float / bool option (optionally `| None`) without parser, min or max, typer's adapter
    returns a value of that exact type unchanged, so this returns it as is. Any other value
    (a command-line "4" for an int option) goes to typer's own coercion, built then.
    """

    def __init__(self, param: Any, kind: type | None) -> None:
        self._param = param
        self._kind = kind
        self._typer: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or type(value) is self._kind:
            return value
        if self._typer is None:
            from typer._coercion import build_runtime_param

            self._typer = build_runtime_param(self._param.type_descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)


def _plain_scalar(annotation: Any) -> type | None:
    """str, int, float or bool for `X` or `X | None` with X one of them, else None."""
    if annotation in _SCALARS:
        return typing.cast(type, annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return typing.cast(type, args[0])
    return None


def _skip_coercion_of(param: Any) -> None:
    """Give one single-valued option `_AlreadyTyped`, through typer's lazy `_runtime_param`
    slot; an option (or a typer) without that slot keeps typer's own coercion."""
    desc = getattr(param, "type_descriptor", None)
    info = getattr(desc, "parameter_info", None)
    if (desc is None or info is None or getattr(param, "_runtime_param", 0) is not None
            or param.multiple or param.nargs != 1):
        return
    plain = getattr(desc, "file_annotation", 0) is None and all(
        getattr(info, k, 0) is None for k in ("parser", "min", "max"))
    param._runtime_param = _AlreadyTyped(param, _plain_scalar(desc.annotation) if plain
                                         else None)


def _help_option_skipping_coercion(get_help_option: Any, ctx: Any) -> Any:
    """A command's --help option (click makes it on first use), its coercion skipped too."""
    option = get_help_option(ctx)
    if option is not None:
        _skip_coercion_of(option)
    return option


def _skip_needless_coercion(command: Any) -> None:
    """`_AlreadyTyped` for every option of `command` and its subcommands, --help included."""
    for sub in getattr(command, "commands", {}).values():
        _skip_needless_coercion(sub)
    for param in getattr(command, "params", ()):
        _skip_coercion_of(param)
    command.get_help_option = functools.partial(_help_option_skipping_coercion,
                                                command.get_help_option)


def load_command(name: str) -> Any:
    """The real click command behind `name` (imports its module)."""
    entry = COMMANDS[name]
    obj = getattr(importlib.import_module(entry.module), entry.attr)
    if isinstance(obj, typer.Typer):
        group = typer.main.get_command(obj)
        group.name = name
        _skip_needless_coercion(group)
        return group
    single = typer.Typer(
        pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None
    )
    single.command(name)(obj)
    command = typer.main.get_command(single)
    _skip_needless_coercion(command)
    return command


_freeze_loaded = False  # set by main(): freeze what a command loads (see main)
# The youngest generation's threshold while a command runs (CPython's default: 700); see main
COMMAND_GC_THRESHOLD = 100_000


class LazyGroup(TyperGroup):
    """A group whose commands are imported on first use.

    `get_command` loads the real command (to parse, run or show `vramcalc CMD --help`),
    except while the group formats its own help, where a stub carrying the summary is
    enough and keeps `vramcalc --help` free of every command module.
    """

    _formatting_help = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if self._formatting_help:
            summary = COMMANDS[cmd_name].summary
            return TyperCommand(name=cmd_name, help=summary, short_help=summary)
        if cmd_name not in self.commands:
            self.commands[cmd_name] = load_command(cmd_name)
            if _freeze_loaded:
                gc.freeze()  # the command's modules and classes too: see main()
                gc.set_threshold(COMMAND_GC_THRESHOLD, *gc.get_threshold()[1:])
                gc.enable()
        return self.commands[cmd_name]

    def get_help_option(self, ctx: Any) -> Any:
        return _help_option_skipping_coercion(super().get_help_option, ctx)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._formatting_help = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._formatting_help = False


app = typer.Typer(
    name="vramcalc",
    cls=LazyGroup,
    help="How much GPU memory will this fine-tune (or inference) take, and does it fit?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a traceback always means a bug
    # Plain click help and errors: option names never cut at 80 columns, and a usage error
    # is one `Error: ...` line (after Usage/Try) like ours, not a rich box.
    rich_markup_mode=None,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        # which allocator replay the estimates run (allocator.replay.ENGINE): the compiled
        # one where setup.py could build it, else the pure-Python one (the same bytes)
        from vramcalc.memory.allocator.replay import ENGINE

        typer.echo(f"vramcalc {__version__} (replay: {ENGINE})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Predict the GPU memory of a fine-tune, inference or merge before it runs."""


def main(exit_now: bool = True) -> None:
    """Run the command line (the `vramcalc` console script, `python -m vramcalc`).
    `exit_now`: a light command's process ends without the interpreter's teardown
    (`_exit_now`); False: SystemExit is raised as click raises it, for a caller that goes
    on after the command (tests that read what it loaded)."""
    # What is loaded by now (typer, this module), and the command's modules once loaded,
    # lives as long as the process: gc.freeze() moves it out of the cyclic collector's
    # sight, which otherwise rescans it at every full collection while the command's
    # imports (pydantic, rich) run; ~15 ms of a cold `vramcalc plan` (issue 9). Nothing is
    # turned off: garbage made after a freeze is still collected. Only the real process
    # freezes (a test's CliRunner does not come through here).
    # The collector also waits while the command's modules load (no collection can free a
    # module), and then runs its youngest generation every COMMAND_GC_THRESHOLD container
    # allocations instead of every 700: an estimate's request program keeps ~10^5 objects
    # alive until its replay, which each young collection rescanned, and it leaves no
    # garbage cycle (gc.collect() after an estimate finds 0 unreachable objects). Measured
    # with gc.callbacks, 2026-12-07, check -m llama-3.1-8b --gpu rtx-4090 --batch 16
    # --seq-len 4096: 638 collections, 47 ms, before; none while the command runs with
    # this; fit --gpu rtx-4090 max RSS 55.7 -> 52.8 MB. Garbage cycles are still
    # collected, at most COMMAND_GC_THRESHOLD allocations later.
    global _freeze_loaded
    _freeze_loaded = True
    gc.disable()
    gc.freeze()
    # pydantic looks for plugins (observability hooks) by reading the entry points of every
    # installed distribution when it builds its first validator: ~5 ms here, more in a large
    # environment. The command line has no use for them; PYDANTIC_DISABLE_PLUGINS set to
    # anything (even empty) in the environment is left as the user set it.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    _skip_plugin_loader()
    try:
        app()
    except SystemExit as done:  # (click's standalone mode always ends so)
        if exit_now and len(sys.argv) > 1 and sys.argv[1] in CACHED_COMMANDS:
            _exit_now(done.code)
        raise


def _exit_now(code: object) -> None:
    """End a light command's process without the interpreter's teardown.

    Once the command is done, CPython's finalization (Py_FinalizeEx: module teardown, the
    last collections and frees of everything its ~300 modules made) took 6-12 ms of a
    cold `vramcalc plan` (2026-12-08: 177 -> 165 ms median wall over 15 alternating runs,
    os._exit after the command against a normal exit, load ~1). What the process owes the
    outside world first: the exit functions (code_cache's table, logging's flush; CPython
    runs each once: atexit._run_exitfuncs clears them), and stdout and stderr flushed.
    The light commands (CACHED_COMMANDS) write nothing else that is left open (their
    files are written and closed or replaced: user_files.write_bytes, sweep --plot) and
    start no thread. Where a flush fails (a closed pipe: `vramcalc plan | head -1`), the
    code is not an int (click's own message) or a profiler or tracer runs (`python -m
    cProfile` writes its stats after the program returns), the normal exit follows."""
    if code is not None and type(code) is not int:
        return
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return  # a profiler or a tracer (python -m cProfile, coverage) reports at its exit
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001  (the interpreter's exit reports it, as before)
        return
    os._exit(code or 0)


# PYDANTIC_DISABLE_PLUGINS values for which pydantic loads no plugin at all
# (pydantic 2.14 pydantic/plugin/_loader.py get_plugins: `disabled_plugins in ('__all__',
# '1', 'true')` returns ()).
_ALL_PLUGINS_OFF = ("__all__", "1", "true")


def _no_plugins() -> tuple[()]:
    return ()


def _skip_plugin_loader() -> None:
    """With every pydantic plugin turned off, the module that finds them is not imported.

    pydantic builds each validator through pydantic/plugin/_schema_validator.py
    create_schema_validator, which does `from ._loader import get_plugins`; _loader.py
    imports importlib.metadata at its top (~10 ms of a cold command: email, zipfile,
    csv...) although get_plugins returns () without reading any entry point when
    PYDANTIC_DISABLE_PLUGINS is one of _ALL_PLUGINS_OFF. A module with that one function
    answers the same; any other value (a list of plugin names, a user's own setting) keeps
    pydantic's loader. tests/test_light_imports.py checks that pydantic still asks
    _loader for get_plugins only, and that its answer is () as here."""
    import sys
    import types

    if (os.environ.get("PYDANTIC_DISABLE_PLUGINS") not in _ALL_PLUGINS_OFF
            or "pydantic.plugin._loader" in sys.modules):
        return
    loader = types.ModuleType("pydantic.plugin._loader", _skip_plugin_loader.__doc__)
    loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
    sys.modules["pydantic.plugin._loader"] = loader
