"""`vramcalc models`: list the built-in model catalog."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from vramcalc.commands.common import print_json, reports_errors

if TYPE_CHECKING:
    from vramcalc.models.spec import ModelSpec


def human_params(n: int) -> str:
    """A parameter count for people: '8.03 B', '494 M' (powers of 1000, as models are named)."""
    if n >= 10**9:
        return f"{n / 10**9:.2f} B"
    if n >= 10**6:
        return f"{n / 10**6:.0f} M"
    return f"{n:,}"


def _natural_key(name: str) -> list[Any]:
    """Sort 'llama-2-7b' before 'llama-2-13b' (api._natural_key; serve.py uses this name)."""
    from vramcalc.api import _natural_key as key

    return key(name)


def spec_summary(spec: ModelSpec) -> dict[str, Any]:
    """What `models --json` prints for one spec (api.ModelSummary)."""
    from vramcalc.api import ModelSummary

    return ModelSummary.of(spec).to_json()


@reports_errors
def models(
    json_output: bool = typer.Option(
        False, "--json", help="Print a JSON list (name, aliases, params, architecture)."
    ),
) -> None:
    """List the built-in models: parameters, layers, sizes, heads.

    Every name and alias (hub id) works as MODEL in `plan` and `check`, in any case.

    A path to a model's config.json (or its folder) or to a spec YAML works too.

    \b
    Examples:
      vramcalc models
      vramcalc models --json
    """
    from vramcalc.api import models as list_models

    rows = list_models()
    if json_output:
        print_json([r.to_json() for r in rows])
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Built-in models", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("hidden", justify="right", no_wrap=True)
    table.add_column("heads/kv", justify="right", no_wrap=True)
    table.add_column("vocab", justify="right", no_wrap=True)
    table.add_column("tied", justify="center", no_wrap=True)
    for r in rows:
        moe = f" ({r.num_local_experts}x)" if r.num_local_experts is not None else ""
        table.add_row(
            r.name,
            human_params(r.params) + moe,
            str(r.num_hidden_layers),
            str(r.hidden_size),
            f"{r.num_attention_heads} / {r.num_key_value_heads}",
            str(r.vocab_size),
            "yes" if r.tie_word_embeddings else "no",
        )
    Console().print(table)
    typer.echo(
        f"{len(rows)} models. Aliases (hub ids) work too: 'vramcalc models --json' lists them.",
        err=True,
    )
