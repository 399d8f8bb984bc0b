"""The GPU catalog: NVIDIA cards by name, with the memory NVML reports for each.

The data is `vramcalc/data/gpus.yaml` (shipped in the wheel, read through importlib.resources).
Each entry says whether its memory figure was measured by us, copied from a public nvidia-smi
output, or derived from the nominal size (`memory_basis`, `source`).

Lookup is one index over names and aliases, built once. Keys are normalized: lower case, without
the words "nvidia", "geforce" and "tesla", spaces, dashes and underscores; so `rtx-4090`,
`RTX 4090` and `NVIDIA GeForce RTX 4090` are the same key.

This module never imports pynvml, torch, rich or typer.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    computed_field,
    model_validator,
)

from vramcalc.errors import SpecError, UnknownGpuError
from vramcalc.models.catalog_index import load_yaml

CATALOG_ORIGIN = "vramcalc/data/gpus.yaml"
MIB = 2**20
# What the driver keeps of memory.total on an empty card (NVML v2 `reserved`): 480 MiB of 81559
# on our H100 (driver 580.159.04, vramcalc.hardware.devices.DeviceInfo). An entry without a measured
# `reserved_mib` is taken to reserve the same share: a nominal figure, not checked on a card.
MEASURED_RESERVED_SHARE = 480 / 81559

Architecture = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell"]
MemoryBasis = Literal["measured", "reported", "nominal"]

# CUDA C++ Programming Guide, "Compute Capabilities": which architecture each capability is.
ARCHITECTURE_OF_CC: dict[str, Architecture] = {
    "7.0": "volta",
    "7.2": "volta",
    "7.5": "turing",
    "8.0": "ampere",
    "8.6": "ampere",
    "8.7": "ampere",
    "8.9": "ada",
    "9.0": "hopper",
    "10.0": "blackwell",
    "10.3": "blackwell",
    "12.0": "blackwell",
    "12.1": "blackwell",
}
# bf16 tensor-core math starts with Ampere, sm_80 (torch.cuda.is_bf16_supported checks the same).
BF16_MIN_CC = (8, 0)
# How far a detected card's memory may sit from its entry and still match it: ECC on a GDDR card
# keeps 1/16 (6.25 %), and drivers before R510 reported up to ~1.4 % less (V100: 16160 of 16384).
MATCH_TOLERANCE = 0.07

_IGNORED_WORDS = frozenset({"nvidia", "geforce", "tesla"})
_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_gpu_name(name: str) -> str:
    """The lookup key of a GPU name: `NVIDIA GeForce RTX 4090` -> `rtx4090`."""
    words = _SEPARATORS.sub(" ", name.lower()).split()
    return "".join(w for w in words if w not in _IGNORED_WORDS)


class GpuModel(BaseModel):
    """One NVIDIA GPU model; `memory_mib` is the usable total NVML reports (memory.total)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = Field(min_length=1)  # exactly as nvmlDeviceGetName returns
    memory_mib: PositiveInt
    reserved_mib: NonNegativeInt | None = None  # driver reservation, where measured
    compute_capability: str = Field(pattern=r"^\d{1,2}\.\d$")  # "8.9"
    architecture: Architecture
    memory_basis: MemoryBasis
    source: str = Field(min_length=1)
    notes: str | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> GpuModel:
        where = f"gpu '{self.name}'"
        arch = ARCHITECTURE_OF_CC.get(self.compute_capability)
        if arch is None:
            raise ValueError(
                f"{where}: unknown compute capability {self.compute_capability}; "
                f"known: {', '.join(ARCHITECTURE_OF_CC)}"
            )
        if arch != self.architecture:
            raise ValueError(
                f"{where}: compute capability {self.compute_capability} is {arch}, "
                f"not {self.architecture}"
            )
        if self.reserved_mib is not None and self.reserved_mib >= self.memory_mib:
            raise ValueError(f"{where}: reserved_mib must be less than memory_mib")
        if self.memory_basis == "reported" and "https://" not in self.source:
            raise ValueError(f"{where}: a reported figure needs the URL of the output in source")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @computed_field  # type: ignore[prop-decorator]
    @property
    def usable_bytes(self) -> int:
        """What an empty card of this model offers a new process: memory.total less the
        driver's reservation (measured `reserved_mib`, else MEASURED_RESERVED_SHARE of it),
        as `check` counts a detected card."""
        reserved = self.reserved_mib
        if reserved is None:
            reserved = round(self.memory_mib * MEASURED_RESERVED_SHARE)
        return (self.memory_mib - reserved) * MIB

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bf16_supported(self) -> bool:
        return self.cc >= BF16_MIN_CC


class GpuIndex(NamedTuple):
    """Lookup tables over a list of GPU models."""

    by_key: dict[str, GpuModel]  # normalized name / alias / unshared NVML name -> model
    by_nvml: dict[str, tuple[GpuModel, ...]]  # normalized NVML name -> every model with it


def build_index(gpus: Iterable[GpuModel], origin: str = CATALOG_ORIGIN) -> GpuIndex:
    """Index names, aliases and NVML names; a key that names two models is a load error.

    An NVML name shared by several models (RTX 3080 10 GB / 12 GB) stays out of `by_key`:
    looking it up by name is ambiguous, matching a detected card uses its memory.
    """
    by_key: dict[str, GpuModel] = {}
    by_nvml: dict[str, list[GpuModel]] = {}

    def claim(key: str, gpu: GpuModel) -> None:
        k = normalize_gpu_name(key)
        if not k:
            raise SpecError(f"{origin}: gpu '{gpu.name}': '{key}' is empty once normalized")
        owner = by_key.setdefault(k, gpu)
        if owner is not gpu:
            raise SpecError(
                f"{origin}: gpu '{gpu.name}': '{key}' is already used by '{owner.name}'"
            )

    for gpu in gpus:
        for key in (gpu.name, *gpu.aliases):
            claim(key, gpu)
        for nvml_name in gpu.nvml_names:
            owners = by_nvml.setdefault(normalize_gpu_name(nvml_name), [])
            if gpu not in owners:
                owners.append(gpu)
    for key, owners in by_nvml.items():
        if len(owners) == 1:
            claim(key, owners[0])
        elif key in by_key:
            raise SpecError(
                f"{origin}: '{key}' is both a name and an NVML name shared by "
                f"{', '.join(g.name for g in owners)}"
            )
    return GpuIndex(by_key, {k: tuple(v) for k, v in by_nvml.items()})


def _format_validation_error(origin: str, position: int, data: Any, err: ValidationError) -> str:
    first = err.errors()[0]
    name = data.get("name") if isinstance(data, dict) else None
    where = f"gpu '{name}'" if name else f"entry {position + 1}"
    loc = ".".join(str(p) for p in first["loc"]) or "(entry)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (see vramcalc.hardware.catalog.GpuModel for the keys)"
    return f"{origin}: {where}: key '{loc}': {msg}"


def _catalog_yaml(text: str, origin: str) -> Any:
    import yaml

    try:
        return load_yaml(text)  # libyaml's C loader where PyYAML has it: ~2 ms, not ~20
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{origin}: malformed YAML{where}") from None


def parse_catalog(text: str, origin: str = CATALOG_ORIGIN) -> tuple[GpuModel, ...]:
    """Validate catalog YAML text: a top-level `gpus:` list of GpuModel mappings."""
    return _catalog_from(_catalog_yaml(text, origin), origin)


def _catalog_from(data: Any, origin: str) -> tuple[GpuModel, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise SpecError(f"{origin}: expected a top-level key 'gpus' holding a list")
    gpus: list[GpuModel] = []
    for position, item in enumerate(data["gpus"]):
        try:
            gpus.append(GpuModel.model_validate(item))
        except ValidationError as err:
            raise SpecError(_format_validation_error(origin, position, item, err)) from None
    build_index(gpus, origin)  # duplicate keys fail here, at load
    return tuple(gpus)


@functools.cache
def _catalog() -> tuple[tuple[GpuModel, ...], GpuIndex]:
    from vramcalc.data import shipped_yaml

    data = shipped_yaml("gpus.yaml", lambda text: _catalog_yaml(text, CATALOG_ORIGIN))
    gpus = _catalog_from(data, CATALOG_ORIGIN)
    return gpus, build_index(gpus)


def catalog() -> tuple[GpuModel, ...]:
    """Every GPU of the built-in catalog, in file order."""
    return _catalog()[0]


def _suggestions(key: str, index: GpuIndex, limit: int = 4) -> list[str]:
    """Names whose keys start with `key` (`a100` -> every A100), then difflib's close ones."""
    prefixed = [k for k in index.by_key if len(key) >= 2 and k.startswith(key)]
    close = difflib.get_close_matches(key, list(index.by_key), n=8, cutoff=0.6)
    return list(dict.fromkeys(index.by_key[k].name for k in (*prefixed, *close)))[:limit]


def resolve_gpu(name: str) -> GpuModel:
    """Look a GPU up by name, alias or NVML name; suggest close names on a miss.

    Raises:
        UnknownGpuError: no entry has that key, or several do (an NVML name two models share).
    """
    _, index = _catalog()
    key = normalize_gpu_name(name)
    found = index.by_key.get(key)
    if found is not None:
        return found
    shared = index.by_nvml.get(key)
    if shared:
        choices = ", ".join(repr(g.name) for g in shared)
        raise UnknownGpuError(f"GPU '{name}' is ambiguous: it can be {choices}; name one of them")
    names = _suggestions(key, index)
    hint = f"; did you mean {', '.join(repr(n) for n in names)}?" if names else ""
    raise UnknownGpuError(
        f"unknown GPU '{name}'{hint} (see 'vramcalc gpus', or give the memory with "
        "--gpu-memory GIB)"
    )


def _within_tolerance(gpu: GpuModel, memory_bytes: int) -> bool:
    return abs(gpu.memory_bytes - memory_bytes) <= MATCH_TOLERANCE * gpu.memory_bytes


def match_detected(name_from_nvml: str, memory_bytes: int) -> GpuModel | None:
    """The catalog entry for a card NVML reported, or None if no entry fits.

    The NVML name picks the candidates (several when two models share it, as the RTX 3080
    10 GB and 12 GB do); the reported total memory picks among them and must sit within
    MATCH_TOLERANCE of the entry, so an unlisted variant (an 8 GB RTX 3060) or a MIG instance
    is None rather than a wrong match.
    """
    _, index = _catalog()
    key = normalize_gpu_name(name_from_nvml)
    candidates = index.by_nvml.get(key)
    if candidates is None:
        found = index.by_key.get(key)
        candidates = (found,) if found is not None else ()
    fitting = [g for g in candidates if _within_tolerance(g, memory_bytes)]
    if not fitting:
        return None
    return min(fitting, key=lambda g: abs(g.memory_bytes - memory_bytes))
