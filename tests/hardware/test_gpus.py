"""GPU detection (with a fake NVML), the GPU catalog, and the `gpus` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from vramcalc.commands.gpus import gpus as gpus_command
from vramcalc.errors import NoGpuError, SpecError, UnknownGpuError
from vramcalc.hardware.catalog import (
    ARCHITECTURE_OF_CC,
    MIB,
    catalog,
    match_detected,
    normalize_gpu_name,
    parse_catalog,
    resolve_gpu,
)
from vramcalc.hardware.devices import DeviceInfo, GpuProcess, query_devices

GIB = 2**30

# ---- a fake pynvml ---------------------------------------------------------------------------
# Codes and messages as in nvidia-ml-py's pynvml.py (NVML_ERROR_*, NVMLError._errcode_to_string).
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
_MESSAGES = {
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    value = 999

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    return type(name, (NVMLError,), {"value": code})


NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class(
    "NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND
)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)


@dataclass
class FakeGpu:
    name: str
    total: int
    free: int
    reserved: int = 0
    cc: tuple[int, int] = (8, 9)
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    processes_error: type[NVMLError] | None = None
    mig: dict[int, FakeGpu] | None = None  # None: no MIG support; {}: MIG on, no instance
    mig_slots: int = 7
    lost: bool = False

    @property
    def used(self) -> int:  # v2 semantics: allocated, without the reserved part
        return self.total - self.free - self.reserved


class FakeNvml:
    """The pynvml functions query_devices uses, over a list of FakeGpu."""

    NVMLError = NVMLError
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_DEVICE_MIG_ENABLE = 1
    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: type[NVMLError] | None = None,
        has_v2: bool = True,
        as_bytes: bool = False,
        driver_error: bool = False,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.has_v2 = has_v2
        self.as_bytes = as_bytes
        self.driver_error = driver_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.as_bytes else text

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        if self.driver_error:
            raise NVMLError_NotSupported()
        return self._s("580.159.04")

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str | bytes:
        return self._s(gpu.name)

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str | bytes:
        return self._s(gpu.uuid)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:
        return gpu.cc

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu, version: int | None = None) -> Any:
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if version is None:  # v1: used includes reserved, no `reserved` field
            return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.used + gpu.reserved)
        if not self.has_v2:
            raise NVMLError_FunctionNotFound()
        return SimpleNamespace(
            version=version, total=gpu.total, free=gpu.free, used=gpu.used, reserved=gpu.reserved
        )

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        if gpu.processes_error is not None:
            raise gpu.processes_error()
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in gpu.processes]

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> list[int]:
        if gpu.mig is None:
            raise NVMLError_NotSupported()
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGpu) -> int:
        return gpu.mig_slots

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGpu, index: int) -> FakeGpu:
        assert gpu.mig is not None
        if index not in gpu.mig:
            raise NVMLError_NotFound()
        return gpu.mig[index]


def fake(gpus: list[FakeGpu], **kwargs: Any) -> tuple[FakeNvml, ModuleType]:
    nvml = FakeNvml(gpus, **kwargs)
    return nvml, cast(ModuleType, nvml)


def rtx_4090(**kwargs: Any) -> FakeGpu:
    defaults: dict[str, Any] = {
        "name": "NVIDIA GeForce RTX 4090",
        "total": 24564 * MIB,
        "free": 24000 * MIB,
        "reserved": 300 * MIB,
        "uuid": "GPU-4090",
    }
    return FakeGpu(**{**defaults, **kwargs})


# ---- query_devices ---------------------------------------------------------------------------


def test_several_gpus_are_reported_in_bytes() -> None:
    a100 = FakeGpu("NVIDIA A100-SXM4-80GB", 81920 * MIB, 81000 * MIB, 500 * MIB, (8, 0), "GPU-a")
    t4 = FakeGpu("Tesla T4", 15360 * MIB, 14900 * MIB, 250 * MIB, (7, 5), "GPU-t")
    nvml, module = fake([rtx_4090(), a100, t4])

    devices = query_devices(module)

    assert [d.index for d in devices] == [0, 1, 2]
    assert [d.name for d in devices] == [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA A100-SXM4-80GB",
        "Tesla T4",
    ]
    first = devices[0]
    assert first.total_bytes == 24564 * MIB
    assert first.free_bytes == 24000 * MIB
    assert first.used_bytes == (24564 - 24000 - 300) * MIB
    assert first.reserved_bytes == 300 * MIB
    assert isinstance(first.total_bytes, int)
    assert first.compute_capability == (8, 9)
    assert first.driver_version == "580.159.04"
    assert first.cuda_driver_version == "13.0"
    assert first.uuid == "GPU-4090"
    assert not first.is_mig and first.mig_parent_index is None and first.label == "0"
    assert [d.bf16_supported for d in devices] == [True, True, False]
    assert nvml.init_calls == 1 and nvml.shutdown_calls == 1


def test_memory_falls_back_to_v1_without_reserved() -> None:
    _, module = fake([rtx_4090()], has_v2=False)
    (device,) = query_devices(module)
    assert device.reserved_bytes is None
    assert device.used_bytes == (24564 - 24000) * MIB  # v1 `used` includes the reserved part
    assert device.total_bytes == 24564 * MIB


def test_older_bindings_returning_bytes_are_decoded() -> None:
    _, module = fake([rtx_4090()], as_bytes=True)
    (device,) = query_devices(module)
    assert device.name == "NVIDIA GeForce RTX 4090"
    assert device.uuid == "GPU-4090"
    assert device.driver_version == "580.159.04"


def test_optional_system_queries_failing_give_none() -> None:
    _, module = fake([rtx_4090()], driver_error=True)
    (device,) = query_devices(module)
    assert device.driver_version is None
    assert device.total_bytes == 24564 * MIB


def test_mig_gpu_is_reported_as_its_instances() -> None:
    def instance(slot: int, profile: str, mib: int) -> FakeGpu:
        name = f"NVIDIA A100-SXM4-40GB MIG {profile}"
        return FakeGpu(name, mib * MIB, (mib - 13) * MIB, 0, (0, 0), f"MIG-{slot}")

    a100 = FakeGpu(
        "NVIDIA A100-SXM4-40GB",
        40960 * MIB,
        40000 * MIB,
        cc=(8, 0),
        uuid="GPU-parent",
        mig={0: instance(0, "3g.20gb", 19968), 2: instance(2, "1g.5gb", 4864)},
    )
    _, module = fake([rtx_4090(), a100])

    devices = query_devices(module)

    assert [d.label for d in devices] == ["0", "1:0", "1:2"]  # slot 1 is empty
    full, mig0, mig2 = devices
    assert not full.is_mig
    assert mig0.is_mig and mig0.mig_parent_index == 1 and mig0.index == 0
    assert mig0.name == "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    assert mig0.uuid == "MIG-0"
    assert mig0.total_bytes == 19968 * MIB
    assert mig2.total_bytes == 4864 * MIB
    assert mig0.compute_capability == (8, 0)  # the parent's, not the instance handle's
    assert mig0.bf16_supported


def test_only_mig_gpus_without_instances_is_no_gpu() -> None:
    a100 = FakeGpu("NVIDIA A100-SXM4-40GB", 40960 * MIB, 40000 * MIB, cc=(8, 0), mig={})
    _, module = fake([a100])
    with pytest.raises(NoGpuError) as info:
        query_devices(module)
    assert "MIG" in str(info.value) and "--gpu" in str(info.value)
    assert info.value.exit_code == 4


def test_busy_card_lists_other_processes() -> None:
    busy = rtx_4090(
        free=4000 * MIB,
        processes=[(1234, 18000 * MIB), (5678, None), (os.getpid(), 100 * MIB)],
    )
    _, module = fake([busy])

    (device,) = query_devices(module)

    assert device.processes == (
        GpuProcess(pid=1234, used_bytes=18000 * MIB),
        GpuProcess(pid=5678, used_bytes=None),
    )  # our own pid is not "another process"
    assert device.other_processes_bytes == 18000 * MIB  # unknown usage is not counted as 0
    assert device.usable_free_bytes == 4000 * MIB


def test_process_query_errors_are_not_fatal() -> None:
    _, module = fake([rtx_4090(processes_error=NVMLError_NoPermission)])
    (device,) = query_devices(module)
    assert device.processes == ()


@pytest.mark.parametrize(
    ("nvml_kwargs", "gpus", "expected"),
    [
        pytest.param(
            {"init_error": NVMLError_LibraryNotFound},
            [rtx_4090()],
            "no NVIDIA driver found (NVML: NVML Shared Library Not Found)",
            id="library-missing",
        ),
        pytest.param(
            {"init_error": NVMLError_DriverNotLoaded},
            [rtx_4090()],
            "no NVIDIA GPU detected (NVML: Driver Not Loaded)",
            id="driver-not-loaded",
        ),
        pytest.param(
            {"init_error": NVMLError_NoPermission},
            [rtx_4090()],
            "cannot read the NVIDIA GPUs (NVML: Insufficient Permissions)",
            id="no-permission",
        ),
        pytest.param(
            {},
            [rtx_4090(), rtx_4090(lost=True)],
            "an NVIDIA GPU stopped answering (NVML: GPU is lost)",
            id="gpu-lost",
        ),
        pytest.param({}, [], "no NVIDIA GPU detected (NVML found 0 devices)", id="zero-devices"),
    ],
)
def test_nvml_failures_are_one_line_no_gpu_errors(
    nvml_kwargs: dict[str, Any], gpus: list[FakeGpu], expected: str
) -> None:
    nvml, module = fake(gpus, **nvml_kwargs)
    with pytest.raises(NoGpuError) as info:
        query_devices(module)
    message = str(info.value)
    assert message.startswith(expected)
    assert "--gpu NAME" in message and "--gpu-memory GIB" in message
    assert "\n" not in message
    assert info.value.exit_code == 4
    assert nvml.shutdown_calls == (0 if "init_error" in nvml_kwargs else 1)


def test_missing_binding_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with pytest.raises(NoGpuError) as info:
        query_devices()
    assert "nvidia-ml-py" in str(info.value) and "--gpu" in str(info.value)
    assert info.value.exit_code == 4


def test_device_info_mig_fields_must_agree() -> None:
    with pytest.raises(ValidationError):
        DeviceInfo(
            index=0,
            name="x",
            uuid="GPU-x",
            total_bytes=1,
            free_bytes=1,
            used_bytes=0,
            compute_capability=(9, 0),
            is_mig=True,
        )


# ---- the catalog -----------------------------------------------------------------------------

CATALOG = catalog()


def test_catalog_is_large_and_names_are_unique() -> None:
    assert len(CATALOG) >= 30
    assert len({g.name for g in CATALOG}) == len(CATALOG)


@pytest.mark.parametrize("gpu", CATALOG, ids=lambda g: g.name)
def test_every_entry_is_sane(gpu: Any) -> None:
    assert gpu.memory_mib > 0 and gpu.memory_bytes == gpu.memory_mib * MIB
    assert gpu.compute_capability in ARCHITECTURE_OF_CC
    assert ARCHITECTURE_OF_CC[gpu.compute_capability] == gpu.architecture
    assert gpu.bf16_supported == (gpu.cc >= (8, 0))
    assert gpu.nvml_names
    if gpu.memory_basis == "reported":
        assert "https://" in gpu.source
    assert resolve_gpu(gpu.name) is gpu
    for alias in gpu.aliases:
        assert resolve_gpu(alias) is gpu
    for nvml_name in gpu.nvml_names:
        assert match_detected(nvml_name, gpu.memory_bytes) is gpu


# Figures the task gave (measured on our machines or read off nvidia-smi): pin them.
@pytest.mark.parametrize(
    ("name", "mib"),
    [
        ("h100-sxm", 81559),
        ("h200", 143771),
        ("a100-sxm4-80gb", 81920),
        ("a100-sxm4-40gb", 40960),
        ("rtx-4090", 24564),
        ("rtx-3090", 24576),
        ("t4", 15360),
        ("l4", 23034),
        ("a10g", 23028),
        ("v100-sxm2-16gb", 16384),
        ("v100-sxm2-32gb", 32768),
        ("l40s", 46068),
        ("rtx-3060-12gb", 12288),
    ],
)
def test_known_usable_memory(name: str, mib: int) -> None:
    assert resolve_gpu(name).memory_mib == mib


def test_measured_entries_are_ours() -> None:
    measured = {g.name for g in CATALOG if g.memory_basis == "measured"}
    assert measured == {"h100-sxm", "h200"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("rtx-4090", "rtx-4090"),
        ("4090", "rtx-4090"),
        ("RTX 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("GeForce RTX 4090", "rtx-4090"),  # as drivers before ~R470 name it
        ("nvidia_geforce_rtx_4090", "rtx-4090"),
        ("Tesla T4", "t4"),
        ("T4", "t4"),
        ("h100", "h100-sxm"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("A100-SXM4-80GB", "a100-sxm4-80gb"),
        ("rtx 4070 ti super", "rtx-4070-ti-super"),
        ("3060", "rtx-3060-12gb"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
    ],
)
def test_lookup_ignores_case_separators_and_brand_words(query: str, expected: str) -> None:
    assert resolve_gpu(query).name == expected


def test_normalize_gpu_name() -> None:
    assert normalize_gpu_name("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert normalize_gpu_name("Tesla V100-SXM2-16GB") == "v100sxm216gb"
    assert normalize_gpu_name(" rtx__4090 ") == "rtx4090"


def test_unknown_gpu_suggests_close_names() -> None:
    with pytest.raises(UnknownGpuError) as info:
        resolve_gpu("rtx 4095")
    message = str(info.value)
    assert message.startswith("unknown GPU 'rtx 4095'; did you mean 'rtx-4090'")
    assert "vramcalc gpus" in message and "--gpu-memory" in message
    assert info.value.exit_code == 1


def test_family_prefix_suggests_every_member() -> None:
    with pytest.raises(UnknownGpuError) as info:
        resolve_gpu("a100")
    for name in ("a100-pcie-40gb", "a100-sxm4-40gb", "a100-pcie-80gb", "a100-sxm4-80gb"):
        assert repr(name) in str(info.value)


def test_nothing_close_gives_no_suggestion() -> None:
    with pytest.raises(UnknownGpuError) as info:
        resolve_gpu("quantum-abacus")
    assert "did you mean" not in str(info.value)


def test_shared_nvml_name_is_ambiguous() -> None:
    with pytest.raises(UnknownGpuError) as info:
        resolve_gpu("NVIDIA GeForce RTX 3080")
    assert "ambiguous" in str(info.value)
    assert "'rtx-3080-10gb'" in str(info.value) and "'rtx-3080-12gb'" in str(info.value)


@pytest.mark.parametrize(
    ("nvml_name", "mib", "expected"),
    [
        ("NVIDIA GeForce RTX 3080", 10240, "rtx-3080-10gb"),
        ("NVIDIA GeForce RTX 3080", 12288, "rtx-3080-12gb"),
        ("NVIDIA GeForce RTX 4060 Ti", 16380, "rtx-4060-ti-16gb"),
        ("Tesla V100-SXM2-16GB", 16160, "v100-sxm2-16gb"),  # an R440 driver's figure
        ("A100-SXM-80GB", 81252, "a100-sxm4-80gb"),  # an R450 driver's name and figure
        ("NVIDIA RTX A6000", 46068, "rtx-a6000"),  # ECC on
        ("NVIDIA GeForce RTX 3060", 8192, None),  # the 8 GB variant is not in the catalog
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19968, None),
        ("NVIDIA Quantum Abacus", 8192, None),
    ],
)
def test_match_detected(nvml_name: str, mib: int, expected: str | None) -> None:
    found = match_detected(nvml_name, mib * MIB)
    assert (found.name if found else None) == expected


ENTRY = """
  - name: {name}
    aliases: [{aliases}]
    nvml_names: ["{nvml}"]
    memory_mib: 1024
    compute_capability: "{cc}"
    architecture: {arch}
    memory_basis: {basis}
    source: {source}
"""


def entry(**kw: str) -> str:
    values = {
        "name": "card-a",
        "aliases": "",
        "nvml": "Card A",
        "cc": "8.9",
        "arch": "ada",
        "basis": "nominal",
        "source": "nominal",
    }
    return ENTRY.format(**{**values, **kw})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "gpus:" + entry() + entry(name="card-b", aliases="card-a", nvml="Card B"),
            "gpu 'card-b': 'card-a' is already used by 'card-a'",
        ),
        ("gpus:" + entry(cc="8.9", arch="hopper"), "compute capability 8.9 is ada, not hopper"),
        ("gpus:" + entry(cc="7.7", arch="volta"), "unknown compute capability 7.7"),
        ("gpus:" + entry(basis="reported"), "needs the URL of the output"),
        ("gpus:" + entry() + "    memroy_mib: 3\n", "key 'memroy_mib': unknown key"),
        ("gpus: {}", "expected a top-level key 'gpus' holding a list"),
        ("gpus: [\n", "malformed YAML"),
    ],
)
def test_catalog_errors_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_catalog(text, origin="test.yaml")
    assert str(info.value).startswith("test.yaml")
    assert message in str(info.value)


# ---- the `gpus` command ----------------------------------------------------------------------


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)  # only this command: cli.py may import
    app.command("gpus")(gpus_command)  # modules that other tasks have not written yet

    @app.callback()
    def _root() -> None:
        """Test app."""

    return app


def test_gpus_json_is_a_parsable_list(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["gpus", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == len(CATALOG)
    h100 = next(item for item in data if item["name"] == "h100-sxm")
    assert h100["memory_bytes"] == 81559 * MIB
    assert h100["compute_capability"] == "9.0" and h100["bf16_supported"] is True
    assert h100["memory_basis"] == "measured"


def test_gpus_table_lists_every_gpu_in_gib(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["gpus"])
    assert result.exit_code == 0, result.output
    assert "GiB" in result.stdout and "GB " not in result.stdout
    for gpu in CATALOG:
        assert gpu.name in result.stdout
    assert f"{81559 * MIB / GIB:.2f}" in result.stdout  # 79.65


# ---- import cost -----------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = (
        "import sys, vramcalc.hardware.devices, vramcalc.hardware.catalog; "
        "heavy = {'pynvml', 'torch', 'transformers', 'bitsandbytes', 'rich', 'typer'} "
        "& set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
