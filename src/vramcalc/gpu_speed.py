"""GPU throughput for the time model: dense peaks and bandwidth per catalog GPU, and the
share of them a step reaches per architecture generation.

The data is `vramcalc/data/gpu_speed.yaml` (keys: `vramcalc/data/gpus.yaml` names). Each
efficiency says whether it was measured on our cards, derived (transferred by generation
or assumed) or calibrated by the user (`TimeBasis`). Never imports torch.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from vramcalc.errors import SpecError
from vramcalc.gpu_catalog import GpuModel
from vramcalc.step_time import GpuSpeed, TimeBasis

SPEED_ORIGIN = "vramcalc/data/gpu_speed.yaml"
TERA = 1e12
GIGA = 1e9


class Efficiency(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    matmul: float = Field(gt=0, le=1)
    attention: float = Field(gt=0, le=1)
    memory: float = Field(gt=0, le=1)
    basis: TimeBasis


class Peaks(BaseModel):
    """One card's dense figures as the yaml gives them (TFLOP/s, TOPS, GB/s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor16: PositiveFloat | None = None
    tensor16_from: str | None = None  # "fp32x2": GeForce fp32-accumulate tensor rate
    fp32: PositiveFloat
    int8: PositiveFloat | None = None
    bandwidth: PositiveFloat
    source: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_tensor16(self) -> Peaks:
        if (self.tensor16 is None) == (self.tensor16_from is None):
            raise ValueError("give exactly one of tensor16 and tensor16_from")
        if self.tensor16_from not in (None, "fp32x2"):
            raise ValueError("tensor16_from must be fp32x2")
        return self

    @property
    def tensor16_tflops(self) -> float:
        return self.tensor16 if self.tensor16 is not None else 2 * self.fp32


class SpeedTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    efficiencies: dict[str, Efficiency]
    gpus: dict[str, Peaks]


def load_yaml(text: str) -> Any:
    """yaml.safe_load through libyaml when PyYAML has it (65 ms -> 1.5 ms for
    gpu_speed.yaml on the dev machine), else the pure-Python loader."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


def parse_speed_table(text: str, origin: str = SPEED_ORIGIN) -> SpeedTable:
    try:
        data: Any = load_yaml(text)
        return SpeedTable.model_validate(data)
    except yaml.YAMLError:
        raise SpecError(f"{origin}: malformed YAML") from None
    except ValueError as err:
        first = str(err).splitlines()
        raise SpecError(f"{origin}: {' '.join(first[:3])}") from None


@functools.cache
def speed_table() -> SpeedTable:
    text = (resources.files("vramcalc") / "data" / "gpu_speed.yaml").read_text(encoding="utf-8")
    return parse_speed_table(text)


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
