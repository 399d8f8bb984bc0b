"""The GPUs of this machine, read through NVML (the nvidia-ml-py binding, `import pynvml`).

`query_devices()` imports pynvml inside its body, so importing this module stays cheap, and
takes an injected module instead for tests. Memory is integer bytes exactly as NVML reports
it (`nvmlDeviceGetMemoryInfo`). A device in MIG mode is reported as its MIG instances, each an
entry of its own, because CUDA sees the instances, not the parent.

No driver, no library, no permission, a lost GPU or zero devices raise `NoGpuError` with one
line that says what was found and how to go on; never a silent 0 GiB.

This module never imports torch, rich or typer.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, NonNegativeInt, computed_field, model_validator

from vramcalc.errors import NoGpuError

T = TypeVar("T")

NO_GPU_HINT = "plan for a GPU by name with --gpu NAME (see 'vramcalc gpus') or --gpu-memory GIB"
BF16_MIN_CC = (8, 0)  # as vramcalc.hardware.catalog: bf16 tensor cores start with Ampere (sm_80)


class GpuProcess(BaseModel):
    """A compute process holding memory on a device (nvmlDeviceGetComputeRunningProcesses)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    used_bytes: NonNegativeInt | None  # None: NVML cannot tell (no permission, WDDM, ...)


class DeviceInfo(BaseModel):
    """One CUDA device as NVML reports it: a full GPU, or one MIG instance of a GPU.

    With the v2 memory query total = free + used + reserved (seen on our H100, driver
    580.159.04: 81559 MiB = 81079 free + 0 used + 480 reserved); v1 folds reserved into used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: NonNegativeInt  # NVML index of the GPU; of a MIG instance, its slot in the parent
    name: str
    uuid: str  # "GPU-..." or "MIG-..."; what CUDA_VISIBLE_DEVICES accepts
    total_bytes: NonNegativeInt  # memory.total: usable total (reserved included, ECC excluded)
    free_bytes: NonNegativeInt  # what a new process can still allocate
    used_bytes: NonNegativeInt  # allocated; with the v2 query, without `reserved_bytes`
    reserved_bytes: NonNegativeInt | None = None  # driver/firmware; None with the v1 query
    compute_capability: tuple[int, int]
    driver_version: str | None = None  # "580.159.04"
    cuda_driver_version: str | None = None  # the CUDA version the driver supports, "13.0"
    is_mig: bool = False
    mig_parent_index: NonNegativeInt | None = None  # NVML index of the parent GPU
    processes: tuple[GpuProcess, ...] = ()  # other processes' compute contexts

    @model_validator(mode="after")
    def _check_mig(self) -> DeviceInfo:
        if self.is_mig != (self.mig_parent_index is not None):
            raise ValueError("mig_parent_index is set exactly for MIG instances")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """`0` for GPU 0, `0:1` for MIG instance 1 of GPU 0."""
        if self.mig_parent_index is None:
            return str(self.index)
        return f"{self.mig_parent_index}:{self.index}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bf16_supported(self) -> bool:
        return self.compute_capability >= BF16_MIN_CC

    @computed_field  # type: ignore[prop-decorator]
    @property
    def other_processes_bytes(self) -> int:
        """Memory held by other processes, where NVML tells (a lower bound)."""
        return sum(p.used_bytes for p in self.processes if p.used_bytes is not None)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def usable_free_bytes(self) -> int:
        """What a new training process can claim now: NVML's free memory.

        Other processes and the driver's reservation are already out of it; the new
        process's own CUDA context (a few hundred MiB) is not, the estimate counts that.
        """
        return self.free_bytes


def _text(value: str | bytes) -> str:
    """Older bindings return bytes for names, UUIDs and versions."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _is_error(nvml: ModuleType, err: BaseException, *codes: str) -> bool:
    value = getattr(err, "value", None)
    return value is not None and any(value == getattr(nvml, c, object()) for c in codes)


def _or_none(nvml: ModuleType, call: Callable[[], T]) -> T | None:
    """A value that is nice to have: any NVML error gives None."""
    try:
        return call()
    except nvml.NVMLError:
        return None


def _no_gpu(nvml: ModuleType, err: BaseException) -> NoGpuError:
    if _is_error(nvml, err, "NVML_ERROR_LIBRARY_NOT_FOUND"):
        what = f"no NVIDIA driver found (NVML: {err})"
    elif _is_error(nvml, err, "NVML_ERROR_DRIVER_NOT_LOADED"):
        what = f"no NVIDIA GPU detected (NVML: {err})"
    elif _is_error(nvml, err, "NVML_ERROR_NO_PERMISSION"):
        what = f"cannot read the NVIDIA GPUs (NVML: {err}); check access to /dev/nvidia*, or"
    elif _is_error(nvml, err, "NVML_ERROR_GPU_IS_LOST"):
        what = f"an NVIDIA GPU stopped answering (NVML: {err}); reset it or reboot, or"
    else:
        what = f"cannot query the NVIDIA GPUs (NVML: {err})"
    sep = " " if what.endswith(" or") else "; "
    return NoGpuError(f"{what}{sep}{NO_GPU_HINT}")


def _cuda_version(raw: int) -> str:
    """nvmlSystemGetCudaDriverVersion's 12040 -> "12.4"."""
    return f"{raw // 1000}.{raw % 1000 // 10}"


def _memory(nvml: ModuleType, handle: Any) -> tuple[int, int, int, int | None]:
    """(total, free, used, reserved) in bytes; reserved is None where only v1 answers."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except TypeError:  # a binding whose nvmlDeviceGetMemoryInfo takes no version
            pass
        except nvml.NVMLError as err:
            unsupported = (
                "NVML_ERROR_NOT_SUPPORTED",
                "NVML_ERROR_FUNCTION_NOT_FOUND",
                "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
                "NVML_ERROR_INVALID_ARGUMENT",
            )
            if not _is_error(nvml, err, *unsupported):
                raise
        else:
            return int(mem.total), int(mem.free), int(mem.used), int(mem.reserved)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(mem.total), int(mem.free), int(mem.used), None


def _processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    """Other processes' compute contexts; an error here is not fatal (empty)."""
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return ()
    own = os.getpid()
    out = []
    for proc in running:
        used = getattr(proc, "usedGpuMemory", None)
        if proc.pid != own:
            out.append(GpuProcess(pid=proc.pid, used_bytes=int(used) if used is not None else None))
    return tuple(out)


def _mig_enabled(nvml: ModuleType, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError as err:
        if _is_error(nvml, err, "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND"):
            return False
        raise
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_handles(nvml: ModuleType, handle: Any) -> list[tuple[int, Any]]:
    """(slot, handle) of each MIG instance; empty slots answer NOT_FOUND and are skipped."""
    found = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            found.append((slot, nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)))
        except nvml.NVMLError as err:
            if not _is_error(nvml, err, "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT"):
                raise
    return found


def _device(
    nvml: ModuleType,
    handle: Any,
    *,
    index: int,
    compute_capability: tuple[int, int],
    versions: tuple[str | None, str | None],
    mig_parent_index: int | None = None,
) -> DeviceInfo:
    total, free, used, reserved = _memory(nvml, handle)
    return DeviceInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        total_bytes=total,
        free_bytes=free,
        used_bytes=used,
        reserved_bytes=reserved,
        compute_capability=compute_capability,
        driver_version=versions[0],
        cuda_driver_version=versions[1],
        is_mig=mig_parent_index is not None,
        mig_parent_index=mig_parent_index,
        processes=_processes(nvml, handle),
    )


def _enumerate(nvml: ModuleType) -> list[DeviceInfo]:
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise NoGpuError(f"no NVIDIA GPU detected (NVML found 0 devices); {NO_GPU_HINT}")
    driver = _or_none(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
    cuda = _or_none(nvml, lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion()))
    versions = (driver, cuda)
    devices: list[DeviceInfo] = []
    for i in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        # A MIG instance gets its parent's compute capability and the system's versions.
        build = functools.partial(
            _device, nvml, compute_capability=(int(major), int(minor)), versions=versions
        )
        if not _mig_enabled(nvml, handle):
            devices.append(build(handle, index=i))
            continue
        for slot, mig in _mig_handles(nvml, handle):
            devices.append(build(mig, index=slot, mig_parent_index=i))
    if not devices:  # every GPU is in MIG mode and none has an instance
        raise NoGpuError(
            f"found {count} NVIDIA GPU(s), all in MIG mode with no MIG instance (create one "
            f"with 'nvidia-smi mig -cgi PROFILE -C'); {NO_GPU_HINT}"
        )
    return devices


def query_devices(nvml: ModuleType | None = None) -> list[DeviceInfo]:
    """Every CUDA device NVML sees: full GPUs, and the instances of GPUs in MIG mode.

    Args:
        nvml: a module with pynvml's functions, for tests; None imports pynvml.

    Raises:
        NoGpuError: no binding, library, driver or permission; a lost GPU; zero devices.
    """
    if nvml is None:
        try:
            import pynvml  # nvidia-ml-py; kept out of module import time
        except ImportError as err:
            raise NoGpuError(
                f"cannot import pynvml ({err}; install nvidia-ml-py); {NO_GPU_HINT}"
            ) from None
        nvml = pynvml
    assert nvml is not None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        raise _no_gpu(nvml, err) from None
    try:
        return _enumerate(nvml)
    except nvml.NVMLError as err:
        raise _no_gpu(nvml, err) from None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
