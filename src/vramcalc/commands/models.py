"""`vramcalc models`: list the built-in model catalog."""

from __future__ import annotations

import re
from typing import Any

import typer

from vramcalc.commands.common import print_json, reports_errors
from vramcalc.models.spec import ModelSpec, catalog


def human_params(n: int) -> str:
    """A parameter count for people: '8.03 B', '494 M' (powers of 1000, as models are named)."""
    if n >= 10**9:
        return f"{n / 10**9:.2f} B"
    if n >= 10**6:
        return f"{n / 10**6:.0f} M"
    return f"{n:,}"


def _natural_key(name: str) -> list[Any]:
    """Sort 'llama-2-7b' before 'llama-2-13b'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def spec_summary(spec: ModelSpec) -> dict[str, Any]:
    """What `models --json` prints for one spec."""
    out: dict[str, Any] = {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "model_type": spec.model_type,
        "params": spec.num_params(),
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "linear_modules": spec.linear_names(),
        "source": spec.source,
    }
    if spec.is_moe:
        out["num_local_experts"] = spec.num_local_experts
        out["num_experts_per_tok"] = spec.num_experts_per_tok
    return out


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
    specs = sorted(catalog(), key=lambda s: _natural_key(s.name))
    if json_output:
        print_json([spec_summary(s) for s in specs])
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
    for s in specs:
        moe = f" ({s.num_local_experts}x)" if s.is_moe else ""
        table.add_row(
            s.name,
            human_params(s.num_params()) + moe,
            str(s.num_hidden_layers),
            str(s.hidden_size),
            f"{s.num_attention_heads} / {s.kv_heads}",
            str(s.vocab_size),
            "yes" if s.tie_word_embeddings else "no",
        )
    Console().print(table)
    typer.echo(
        f"{len(specs)} models. Aliases (hub ids) work too: 'vramcalc models --json' lists them.",
        err=True,
    )
