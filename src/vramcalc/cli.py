"""The `vramcalc` command line: parse, call, render, choose the exit code.

Each command lives in `vramcalc.commands.<name>` and is imported only when it runs:
`vramcalc plan` loads the estimator and nothing of `calibrate`, and `vramcalc --help`
loads no command at all (its listing uses the one-line summaries in COMMANDS, which a
test keeps equal to the commands' own docstrings). Heavy libraries (torch, transformers,
bitsandbytes, peft, pynvml) are imported inside command bodies only.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup

from vramcalc import __version__


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
        "Estimate the peak GPU memory of one QLoRA / LoRA training step."),
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
    "calibrate": LazyCommand(
        "vramcalc.commands.calibrate", "app",
        "Measure real QLoRA steps on a GPU, fit corrections, replay the measurements."),
}


def load_command(name: str) -> Any:
    """The real click command behind `name` (imports its module)."""
    entry = COMMANDS[name]
    obj = getattr(importlib.import_module(entry.module), entry.attr)
    if isinstance(obj, typer.Typer):
        group = typer.main.get_command(obj)
        group.name = name
        return group
    single = typer.Typer(
        pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None
    )
    single.command(name)(obj)
    return typer.main.get_command(single)


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
        return self.commands[cmd_name]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._formatting_help = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._formatting_help = False


app = typer.Typer(
    name="vramcalc",
    cls=LazyGroup,
    help="How much GPU memory will this QLoRA / LoRA fine-tune take, and does it fit?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a traceback always means a bug
    # Plain click help and errors: option names never cut at 80 columns, and a usage error
    # is one `Error: ...` line (after Usage/Try) like ours, not a rich box.
    rich_markup_mode=None,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vramcalc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Predict the GPU memory of a QLoRA / LoRA fine-tune before it runs."""


def main() -> None:
    app()
