"""`--dataset-tokens`, `--epochs`, `--price GPU=USD` and `--prices FILE`: how long a plan
takes on a catalog GPU and what it costs (vramcalc.timing.cost). Shared by `plan`, `check`,
`compare` and `fit`; each command says where the time applies and refuses the options
where it does not."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from vramcalc.errors import PlanError

if TYPE_CHECKING:
    from vramcalc.timing.cost import PriceTable

DatasetTokensOpt = Annotated[
    int | None,
    typer.Option("--dataset-tokens", help="Training tokens per epoch: adds the wall time "
                 "(and the cost where the GPU has a price) for the named GPU."),
]
EpochsOpt = Annotated[
    float | None,
    typer.Option("--epochs", help="Passes over --dataset-tokens (default 1)."),
]
PriceOpt = Annotated[
    list[str] | None,
    typer.Option("--price", help="$/GPU-hour for a catalog GPU, GPU=USD (repeatable); "
                 "beats the shipped table and --prices."),
]
PricesOpt = Annotated[
    Path | None,
    typer.Option("--prices", help="A price table (YAML or JSON, the schema of "
                 "vramcalc/data/prices.yaml) that overrides the shipped one."),
]


class TimeSettings(NamedTuple):
    dataset_tokens: int | None
    epochs: float
    price: list[str]
    prices_file: Path | None

    @property
    def given(self) -> list[str]:
        """The time options the user gave, as flags."""
        flags = []
        if self.dataset_tokens is not None:
            flags.append("--dataset-tokens")
        if self.epochs != 1.0:
            flags.append("--epochs")
        if self.price:
            flags.append("--price")
        if self.prices_file is not None:
            flags.append("--prices")
        return flags

    def table(self) -> PriceTable:
        from vramcalc.timing.cost import price_table

        return price_table(self.prices_file, self.price)

    def refuse(self, why: str) -> None:
        """An error when time options were given where `why` says they cannot apply."""
        if self.given:
            raise PlanError(f"{', '.join(self.given)}: {why}")


def time_settings(dataset_tokens: int | None, epochs: float | None, price: list[str] | None,
                  prices: Path | None) -> TimeSettings:
    """Validate the time options (prices are parsed here, so a bad one fails before the
    model loads)."""
    if dataset_tokens is not None and dataset_tokens < 1:
        raise PlanError(f"--dataset-tokens must be a positive number of tokens, got "
                        f"{dataset_tokens}")
    if epochs is not None:
        if dataset_tokens is None:
            raise PlanError("--epochs needs --dataset-tokens N (the tokens of one epoch)")
        if not epochs > 0:
            raise PlanError(f"--epochs must be more than 0, got {epochs}")
    settings = TimeSettings(dataset_tokens, 1.0 if epochs is None else float(epochs),
                            list(price or []), prices)
    if settings.price or settings.prices_file is not None:
        settings.table()
    return settings


