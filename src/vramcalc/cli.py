"""The `vramcalc` command line: parse, call, render, choose the exit code.

Each command lives in `vramcalc.commands.<name>`; heavy libraries (torch, transformers,
bitsandbytes, peft, pynvml) are imported inside command bodies only, so `plan` and
`check` start fast.
"""

from __future__ import annotations

import typer

from vramcalc import __version__
from vramcalc.commands import calibrate as calibrate_cmd
from vramcalc.commands import check as check_cmd
from vramcalc.commands import gpus as gpus_cmd
from vramcalc.commands import models as models_cmd
from vramcalc.commands import plan as plan_cmd
from vramcalc.commands import sweep as sweep_cmd

app = typer.Typer(
    name="vramcalc",
    help="How much GPU memory will this QLoRA / LoRA fine-tune take, and does it fit?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a traceback always means a bug
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


app.command("models")(models_cmd.models)
app.command("plan")(plan_cmd.plan)
app.command("check")(check_cmd.check)
app.command("sweep")(sweep_cmd.sweep)
app.command("gpus")(gpus_cmd.gpus)
app.add_typer(calibrate_cmd.app, name="calibrate")


def main() -> None:
    app()
