"""The cards a command answers for: `--gpu NAME` (the catalog), `--gpu-memory GIB` (a card of
that size) or, for check, this machine's GPUs (NVML).

plan and check, and their `--task infer|merge` forms (task_options.py), all take their
cards from here, so that none of those modules imports another (no import circle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramcalc.commands.options import gpu_memory_bytes
from vramcalc.errors import PlanError

if TYPE_CHECKING:
    from vramcalc.hardware.devices import DeviceInfo
    from vramcalc.sizing.verdict import Target


def detect_devices() -> list[DeviceInfo]:
    """The GPUs NVML sees; tests replace this function with a fake."""
    from vramcalc.hardware.devices import query_devices  # pynvml loads inside

    return query_devices()


def plan_target(gpu: str | None, gpu_memory: float | None) -> Target | None:
    """plan's one card, or None: plan without a card shows the estimate alone."""
    from vramcalc.sizing.verdict import catalog_target, sized_target

    if gpu is not None and gpu_memory is not None:
        raise PlanError("give either --gpu NAME or --gpu-memory GIB, not both")
    if gpu is not None:
        from vramcalc.hardware.catalog import resolve_gpu

        return catalog_target(resolve_gpu(gpu))
    if gpu_memory is not None:
        return sized_target(gpu_memory_bytes(gpu_memory), f"{gpu_memory:g} GiB card")
    return None


def check_targets(gpu: list[str], gpu_memory: float | None) -> list[Target]:
    """check's cards: each --gpu once, else the --gpu-memory card, else the detected GPUs."""
    from vramcalc.sizing.verdict import catalog_target, detected_target, sized_target

    if gpu:
        from vramcalc.hardware.catalog import resolve_gpu

        return [catalog_target(resolve_gpu(name)) for name in dict.fromkeys(gpu)]
    if gpu_memory is not None:
        return [sized_target(gpu_memory_bytes(gpu_memory), f"{gpu_memory:g} GiB card")]
    return [detected_target(d) for d in detect_devices()]
