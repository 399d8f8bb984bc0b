"""`vramcalc gpus`: list the GPU catalog that `--gpu NAME` plans against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from vramcalc.commands.common import print_json, reports_errors

if TYPE_CHECKING:
    from vramcalc.hardware.catalog import GpuModel

GIB = 2**30


def _render_table(models: tuple[GpuModel, ...]) -> None:
    from rich.console import Console  # rich loads only when a table is printed
    from rich.table import Table

    table = Table(title="GPU catalog (memory as NVML reports it; GiB = 2**30 bytes)")
    table.add_column("Name", no_wrap=True)
    table.add_column("Memory GiB", justify="right")
    table.add_column("CC", justify="right")
    table.add_column("bf16")
    table.add_column("Basis")
    table.add_column("Aliases")
    for gpu in models:
        table.add_row(
            gpu.name,
            f"{gpu.memory_bytes / GIB:.2f}",
            gpu.compute_capability,
            "yes" if gpu.bf16_supported else "no",
            gpu.memory_basis,
            ", ".join(gpu.aliases),
        )
    Console().print(table)


@reports_errors
def gpus(
    json_output: bool = typer.Option(False, "--json", help="Print the catalog as JSON."),
) -> None:
    """List the GPUs that --gpu NAME accepts, with the memory NVML reports.

    Memory is the usable total (nvidia-smi's memory.total), not the marketing
    size: an "80GB" H100 has 81559 MiB = 79.65 GiB (GiB = 2**30 bytes).

    Basis says where each figure comes from: measured by us; reported in a
    public nvidia-smi output (its URL is the JSON's "source"); or nominal,
    derived from the nominal size and not checked against a card.

    Names match ignoring case, spaces, dashes and NVIDIA / GeForce / Tesla.

    \b
    Examples:
      vramcalc gpus
      vramcalc gpus --json
    """
    from vramcalc.api import gpus as list_gpus  # the YAML loads only when listed

    models = list_gpus()
    if json_output:
        print_json([gpu.model_dump(mode="json") for gpu in models])
        return
    _render_table(models)
