"""GPU throughput for the time model: dense peaks and bandwidth per catalog GPU, and the
share of them a step reaches per architecture generation.

The data is `vramcalc/data/gpu_speed.yaml` (keys: `vramcalc/data/gpus.yaml` names). Each
efficiency says whether it was measured on our cards, derived (transferred by generation
or assumed) or calibrated by the user (`TimeBasis`). Never imports torch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, get_args

from vramcalc.errors import SpecError
from vramcalc.hardware.catalog import GpuModel
from vramcalc.models.catalog_index import load_yaml
from vramcalc.timing.step_time import GpuSpeed, TimeBasis

SPEED_ORIGIN = "vramcalc/data/gpu_speed.yaml"
TERA = 1e12
GIGA = 1e9


class Efficiency(NamedTuple):
    matmul: float
    attention: float
    memory: float
    basis: TimeBasis


class Peaks(NamedTuple):
    """One card's dense figures as the yaml gives them (TFLOP/s, TOPS, GB/s)."""

    fp32: float
    bandwidth: float
    source: str
    tensor16: float | None = None
    tensor16_from: str | None = None  # "fp32x2": GeForce fp32-accumulate tensor rate
    int8: float | None = None

    @property
    def tensor16_tflops(self) -> float:
        return self.tensor16 if self.tensor16 is not None else 2 * self.fp32


class Link(NamedTuple):
    """How a card reaches its peers inside one machine (gpu_speed.yaml `links`): bytes/s
    each way per GPU, and the share of it a large NCCL collective's bus bandwidth reaches."""

    kind: str
    bandwidth: float  # bytes/s, per direction
    efficiency: float
    basis: TimeBasis
    source: str


class SpeedTable(NamedTuple):
    efficiencies: dict[str, Efficiency]
    gpus: dict[str, Peaks]
    links: dict[str, Link] = {}  # catalog GPU name -> its link


def _number(where: str, value: Any, *, at_most_one: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (at_most_one and value > 1):
        bound = "in (0, 1]" if at_most_one else "a positive number"
        raise ValueError(f"{where} must be {bound}, got {value!r}")
    return float(value)


def _keys(where: str, entry: Any, required: set[str], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping")
    extra = set(entry) - allowed
    missing = required - set(entry)
    if extra:
        raise ValueError(f"{where}: unknown key {sorted(extra)[0]!r}")
    if missing:
        raise ValueError(f"{where}: missing key {sorted(missing)[0]!r}")
    return entry


def _efficiency(arch: str, entry: Any) -> Efficiency:
    where = f"efficiencies: {arch}"
    e = _keys(where, entry, {"matmul", "attention", "memory", "basis"},
              {"matmul", "attention", "memory", "basis"})
    if e["basis"] not in get_args(TimeBasis):
        raise ValueError(f"{where}: basis must be one of {', '.join(get_args(TimeBasis))}")
    return Efficiency(matmul=_number(f"{where}: matmul", e["matmul"], at_most_one=True),
                      attention=_number(f"{where}: attention", e["attention"],
                                        at_most_one=True),
                      memory=_number(f"{where}: memory", e["memory"], at_most_one=True),
                      basis=e["basis"])


def _peaks(name: str, entry: Any) -> Peaks:
    where = f"gpu {name!r}"
    g = _keys(where, entry, {"fp32", "bandwidth", "source"},
              {"tensor16", "tensor16_from", "fp32", "int8", "bandwidth", "source"})
    if ("tensor16" in g) == ("tensor16_from" in g):
        raise ValueError(f"{where}: give exactly one of tensor16 and tensor16_from")
    if "tensor16_from" in g and g["tensor16_from"] != "fp32x2":
        raise ValueError(f"{where}: tensor16_from must be fp32x2")
    if not isinstance(g["source"], str) or not g["source"]:
        raise ValueError(f"{where}: source must be a non-empty string")
    return Peaks(
        tensor16=_number(f"{where}: tensor16", g["tensor16"]) if "tensor16" in g else None,
        tensor16_from=g.get("tensor16_from"), fp32=_number(f"{where}: fp32", g["fp32"]),
        int8=_number(f"{where}: int8", g["int8"]) if "int8" in g else None,
        bandwidth=_number(f"{where}: bandwidth", g["bandwidth"]), source=g["source"])


def _links(entries: Any, gpus: dict[str, Peaks]) -> dict[str, Link]:
    """`links`: kind -> {bandwidth, efficiency, basis, gpus, source}; each GPU of `gpus`
    in at most one kind."""
    if not isinstance(entries, dict):
        raise ValueError("links must be a mapping")
    out: dict[str, Link] = {}
    for kind, entry in entries.items():
        where = f"links: {kind}"
        e = _keys(where, entry, {"bandwidth", "efficiency", "basis", "gpus", "source"},
                  {"bandwidth", "efficiency", "basis", "gpus", "source"})
        if e["basis"] not in get_args(TimeBasis):
            raise ValueError(f"{where}: basis must be one of {', '.join(get_args(TimeBasis))}")
        if not isinstance(e["source"], str) or not e["source"]:
            raise ValueError(f"{where}: source must be a non-empty string")
        if not isinstance(e["gpus"], list) or not e["gpus"]:
            raise ValueError(f"{where}: gpus must be a non-empty list")
        link = Link(kind=str(kind), bandwidth=_number(f"{where}: bandwidth", e["bandwidth"]) * GIGA,
                    efficiency=_number(f"{where}: efficiency", e["efficiency"], at_most_one=True),
                    basis=e["basis"], source=e["source"])
        for name in e["gpus"]:
            if name not in gpus:
                raise ValueError(f"{where}: {name!r} is not a GPU of this file")
            if name in out:
                raise ValueError(f"{where}: {name!r} is also under {out[name].kind}")
            out[name] = link
    return out


def _speed_yaml(text: str, origin: str) -> Any:
    import yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError:
        raise SpecError(f"{origin}: malformed YAML") from None


def parse_speed_table(text: str, origin: str = SPEED_ORIGIN) -> SpeedTable:
    """Validate gpu_speed.yaml text: `efficiencies` per architecture, `gpus` per name."""
    return _speed_table_from(_speed_yaml(text, origin), origin)


def _speed_table_from(data: Any, origin: str) -> SpeedTable:
    try:
        top = _keys("the file", data, {"efficiencies", "gpus"},
                    {"efficiencies", "gpus", "links"})
        effs, gpus = top["efficiencies"], top["gpus"]
        if not isinstance(effs, dict) or not isinstance(gpus, dict):
            raise ValueError("efficiencies and gpus must be mappings")
        peaks = {str(k): _peaks(str(k), v) for k, v in gpus.items()}
        return SpeedTable({str(k): _efficiency(str(k), v) for k, v in effs.items()}, peaks,
                          _links(top.get("links", {}), peaks))
    except ValueError as err:
        raise SpecError(f"{origin}: {err}") from None


@functools.cache
def speed_table() -> SpeedTable:
    from vramcalc.data import shipped_yaml

    data = shipped_yaml("gpu_speed.yaml", lambda text: _speed_yaml(text, SPEED_ORIGIN))
    return _speed_table_from(data, SPEED_ORIGIN)


def gpu_speed(gpu: GpuModel, efficiency: Efficiency | None = None) -> GpuSpeed | None:
    """The time model's view of a catalog GPU, or None when its peaks are not known.
    `efficiency` replaces its generation's (a user's calibration)."""
    table = speed_table()
    peaks = table.gpus.get(gpu.name)
    eff = efficiency or table.efficiencies.get(gpu.architecture)
    if peaks is None or eff is None:
        return None
    return GpuSpeed(
        name=gpu.name, architecture=gpu.architecture,
        tensor16_flops=peaks.tensor16_tflops * TERA, fp32_flops=peaks.fp32 * TERA,
        int8_ops=peaks.int8 * TERA if peaks.int8 else None, bandwidth=peaks.bandwidth * GIGA,
        matmul_efficiency=eff.matmul, attention_efficiency=eff.attention,
        memory_efficiency=eff.memory, basis=eff.basis)


def gpu_link(gpu: GpuModel) -> Link | None:
    """The link `gpu` reaches its peers over inside one machine, or None when the file
    names none for it (no time on several GPUs)."""
    return speed_table().links.get(gpu.name)
