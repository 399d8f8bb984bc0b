"""Fitted corrections to the analytic estimate, per GPU family and software stack.

Three factors, each fitted by least squares on measured points (`vramcalc calibrate fit`):

- `k_act` scales what the estimator computes per step (activations, logits and loss,
  transients, LoRA gradients) over the static tensors it counts exactly:
  measured_alloc ~ static + k_act * (est_alloc - static), where static = quantized
  weights + quant constants + unquantized params + LoRA params + optimizer states +
  cuBLAS workspaces (components of the estimate at its peak phase);
- `k_slack` scales the allocator slack: measured_reserved - measured_alloc ~ k_slack * est_slack;
- `context_bytes` replaces the CUDA context constant:
  measured_device - measured_reserved - est_paged ~ context_bytes.

`k_act` and `k_slack` are fitted on relative residuals (each point weighted by 1 / its
measured value squared), so a 0.5B and a 70B model count alike. Everything here is pure
arithmetic on pydantic models: no torch; `select_corrections` reads two small JSON files.

Where corrections come from, and which one `plan` / `check` apply (`select_corrections`):

- shipped: `vramcalc/data/corrections.json` inside the package (fitted on the project's
  own measurements, calibration/ in the repo);
- user: `<user data dir>/corrections.json`, written by `vramcalc calibrate fit` on the
  user's own GPU; the folder is platformdirs' `user_data_dir("vramcalc")`
  (~/.local/share/vramcalc on Linux) or `$VRAMCALC_DATA_DIR`;
- `$VRAMCALC_CORRECTIONS=FILE` reads that one file instead of both ("" turns corrections off).

A user entry with the same GPU family and stack replaces the shipped one. An entry is
applied only when (1) its GPU family is the target GPU's, (2) its stack (torch
major.minor, transformers major.minor) is the installed one (no torch or transformers
installed: the stack is unknown and nothing is applied), and (3) its held-out
(leave-one-architecture-out) replay at fit time showed it reduces the error
(`helps`). Otherwise the raw estimate, and the note says why.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramcalc.corrections.selection import (
    ENV_PATH,
    Selection,
    without_files,
)
from vramcalc.memory.allocator.constants import CUDA_CONTEXT
from vramcalc.memory.result import Components, Estimate

SCHEMA_VERSION = 1
FILE_KIND = "vramcalc-corrections"

# Components that `k_act` leaves alone (bytes the estimator counts tensor by tensor).
STATIC_COMPONENTS: tuple[str, ...] = (
    "base_weights",
    "quant_constants",
    "unquantized_params",
    "expert_weights",
    "adapter_weights",
    "optimizer_states",
    "cublas_workspace",
)
# Components that `k_act` scales: the per-step part of the peak allocated bytes.
DYNAMIC_COMPONENTS: tuple[str, ...] = ("gradients", "activations", "logits_loss", "transient")

SHIPPED = "shipped"  # origin label of the file inside the package (vramcalc/data/)
SHIPPED_RESOURCE = "data/corrections.json"  # relative to the vramcalc package
ENV_DATA_DIR = "VRAMCALC_DATA_DIR"  # the user data folder instead of platformdirs'
USER_FILE = "corrections.json"
VALIDATION_METHOD = "leave-one-architecture-out"
PEAKS = ("allocated", "reserved", "device")


# defer_build on every model here: `plan` without a GPU imports this module but reads no
# corrections, so their validators are built on first use, not at import (issue 9).


class Validation(BaseModel):
    """The held-out replay of an entry at fit time: each model's points predicted with
    factors fitted on the other models only, vs the raw estimate on the same points."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    method: str = VALIDATION_METHOD
    n_points: int = Field(default=0, ge=0)  # points with a held-out correction
    raw_median_abs_error: dict[str, float] = {}  # per peak: allocated / reserved / device
    corrected_median_abs_error: dict[str, float] = {}


class Corrections(BaseModel):
    """Correction factors fitted on the points of one GPU family and stack."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    gpu_family: str  # "H100"
    stack: str  # "torch2.11-transformers5.17"
    k_act: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    k_slack: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    context_bytes: int = Field(default=CUDA_CONTEXT, ge=0)
    n_points: int = Field(default=0, ge=0)
    models: tuple[str, ...] = ()
    # Verdict of the held-out replay (`validation`): True when the corrected estimate's
    # median error is lower than the raw one's. None: never validated (not applied).
    helps: bool | None = None
    validation: Validation | None = None

    @property
    def key(self) -> str:
        return f"{self.gpu_family}/{self.stack}"


class CorrectionsFile(BaseModel):
    """A corrections file (vramcalc/data/corrections.json, the user's): fitted entries."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    schema_version: int = SCHEMA_VERSION
    kind: str = FILE_KIND
    entries: list[Corrections] = []


class Observation(BaseModel):
    """One measured point next to its raw estimate: what `fit` needs, all in bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    model: str
    gpu_family: str
    stack: str
    static: int  # sum of STATIC_COMPONENTS of the estimate
    est_alloc: int
    est_slack: int
    est_paged: int
    meas_alloc: int
    meas_reserved: int | None = None
    meas_device: int | None = None


# ---- keys ----------------------------------------------------------------------------------

_FAMILY = re.compile(r"RTX\s*A?\d{4}\b(?:\s*TI\b)?|\b(?:[A-Z]{1,2}\d{1,3}S?)\b")


def gpu_family(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; 'NVIDIA GeForce RTX 4090', 'rtx-4090' -> 'RTX 4090'."""
    upper = name.upper().replace("NVIDIA", " ").replace("-", " ")  # catalog: "rtx-4090"
    for match in _FAMILY.finditer(upper):
        token = match.group(0)
        if re.fullmatch(r"\d+GB", token):
            continue
        return re.sub(r"\s+", " ", token.strip())
    return name.strip()


def stack_key(torch_version: str | None, transformers_version: str | None) -> str:
    """'2.11.0+cu130', '5.17.0' -> 'torch2.11-transformers5.17' (major.minor of each)."""
    def major_minor(v: str | None) -> str:
        if not v or v == "missing":
            return "?"
        return ".".join(re.split(r"[.+]", v)[:2])

    return f"torch{major_minor(torch_version)}-transformers{major_minor(transformers_version)}"


@lru_cache(maxsize=1)
def installed_stack() -> str | None:
    """Stack key of this environment from package metadata (never imports torch);
    None when torch or transformers is not installed (the light install). Read once per
    process: `compare` asks once per catalog GPU of a corrected family."""
    found = _scanned_versions(("torch", "transformers"))
    if found is None:  # a layout the scan leaves to importlib.metadata
        from importlib.metadata import PackageNotFoundError, version

        try:
            return stack_key(version("torch"), version("transformers"))
        except PackageNotFoundError:
            return None
    torch_version, transformers_version = found
    if torch_version is None or transformers_version is None:
        return None
    return stack_key(torch_version, transformers_version)


def _normalized(name: str) -> str:
    # importlib.metadata Prepared.normalize (Python 3.10-3.13)
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _scanned_versions(names: Sequence[str]) -> list[str | None] | None:
    """importlib.metadata.version of each name (None: not installed) where every sys.path
    entry is a folder or absent, without importing importlib.metadata (~10 ms of a cold
    `compare`: email, zipfile, csv). The same search: Python 3.11 importlib/metadata
    MetadataPathFinder over sys.path in order, each folder's `*.dist-info` / `*.egg-info`
    children named by Prepared.normalize in os.listdir order (FastPath, Lookup), the
    first found giving its METADATA (else PKG-INFO) `Version` header. None, for
    importlib.metadata to answer, where anything else could take part: another meta path
    finder that finds distributions, a zip or an .egg on sys.path, an .egg child, a
    metadata folder without the header. tests/corrections checks both agree on every
    installed distribution."""
    import importlib.machinery

    for finder in sys.meta_path:
        if (getattr(finder, "find_distributions", None) is not None
                and finder is not importlib.machinery.PathFinder):
            return None
    wanted = {_normalized(n): i for i, n in enumerate(names)}
    found: list[str | None] = [None] * len(names)
    for root in sys.path:
        folder = root or "."
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                return None  # a zip file on sys.path
            continue
        if os.path.basename(root).lower().endswith(".egg"):
            return None
        try:
            children = os.listdir(folder)
        except OSError:
            return None
        for child in children:
            low = child.lower()
            if low.endswith(".egg"):
                if low.rpartition(".")[0].partition("-")[0].replace("-", "_") in wanted:
                    return None
                continue
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            i = wanted.get(_normalized(low.rpartition(".")[0].partition("-")[0]))
            if i is None or found[i] is not None:
                continue
            version = _metadata_version(os.path.join(folder, child))
            if version is None:
                return None
            found[i] = version
        if all(v is not None for v in found):
            break
    return found


def _metadata_version(info: str) -> str | None:
    """The `Version:` header of a metadata folder's METADATA (else PKG-INFO) file."""
    for file in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, file), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        return None  # the headers end: no Version
                    key, sep, value = line.partition(":")
                    if sep and key.strip().lower() == "version":
                        return value.strip()
        except OSError:
            continue
        return None
    return None


# ---- applying --------------------------------------------------------------------------------


def static_part(est: Estimate) -> int:
    return sum(est.components.get(k, 0) for k in STATIC_COMPONENTS)


def corrected(est: Estimate, c: Corrections) -> Estimate:
    """`est` with the fitted factors applied; components still add up to peak device."""
    comps = dict(est.components.items())
    static = static_part(est)
    dynamic = est.peak_allocated_bytes - static
    for name in DYNAMIC_COMPONENTS:
        comps[name] = round(c.k_act * comps.get(name, 0))
    peak_alloc = static + round(c.k_act * dynamic) if dynamic > 0 else est.peak_allocated_bytes
    # keep the parts summing to the total despite per-component rounding
    drift = peak_alloc - (static + sum(comps[n] for n in DYNAMIC_COMPONENTS))
    comps["activations"] = comps.get("activations", 0) + drift
    slack = max(0, round(c.k_slack * est.components.get("allocator_slack", 0)))
    comps["allocator_slack"] = slack
    comps["cuda_context"] = c.context_bytes
    peak_reserved = peak_alloc + slack
    peak_device = peak_reserved + c.context_bytes + est.paged_bytes
    # the unreleasable part of the slack is not rescaled: it was set on out-of-memory runs
    shift = (peak_alloc + c.context_bytes) - (est.peak_allocated_bytes
                                              + est.components.get("cuda_context", 0))
    required, required_low = est.required_device_bytes + shift, est.required_low + shift
    phases = {
        name: (static + round(c.k_act * (v - static)) if v > static else v)
        for name, v in est.phases.items()
    }
    return est.model_copy(
        update={
            "components": Components(**comps),
            "phases": phases,
            "peak_allocated_bytes": peak_alloc,
            "peak_reserved_bytes": peak_reserved,
            "peak_device_bytes": peak_device,
            "required_device_bytes": required,
            "required_device_low_bytes": required_low,
        }
    )


def observation(
    est: Estimate,
    *,
    model: str,
    gpu: str,
    stack: str,
    meas_alloc: int,
    meas_reserved: int | None,
    meas_device: int | None,
) -> Observation:
    return Observation(
        model=model,
        gpu_family=gpu_family(gpu),
        stack=stack,
        static=static_part(est),
        est_alloc=est.peak_allocated_bytes,
        est_slack=est.components.get("allocator_slack", 0),
        est_paged=est.paged_bytes,
        meas_alloc=meas_alloc,
        meas_reserved=meas_reserved,
        meas_device=meas_device,
    )


# ---- fitting ---------------------------------------------------------------------------------


def _ratio_fit(pairs: Iterable[tuple[float, float, float]], default: float) -> float:
    """k minimizing sum(((y - k x) / w)^2) over (x, y, w): sum(x y / w^2) / sum(x^2 / w^2)."""
    num = den = 0.0
    for x, y, w in pairs:
        num += x * y / (w * w)
        den += x * x / (w * w)
    return num / den if den > 0 else default


def fit_one(obs: Sequence[Observation], gpu_family: str, stack: str) -> Corrections:
    """Least-squares factors from `obs` (all of one family and stack)."""
    k_act = _ratio_fit(
        ((o.est_alloc - o.static, o.meas_alloc - o.static, o.meas_alloc) for o in obs
         if o.meas_alloc > 0),
        1.0,
    )
    k_slack = _ratio_fit(
        ((o.est_slack, o.meas_reserved - o.meas_alloc, o.meas_reserved) for o in obs
         if o.meas_reserved), 1.0,
    )
    ctx = [o.meas_device - o.meas_reserved - o.est_paged for o in obs
           if o.meas_device and o.meas_reserved]
    return Corrections(
        gpu_family=gpu_family,
        stack=stack,
        k_act=round(k_act, 6),
        k_slack=round(k_slack, 6),
        context_bytes=round(sum(ctx) / len(ctx)) if ctx else CUDA_CONTEXT,
        n_points=len(obs),
        models=tuple(sorted({o.model for o in obs})),
    )


def fit(obs: Sequence[Observation]) -> list[Corrections]:
    """One Corrections per (GPU family, stack) present in `obs`."""
    groups: dict[tuple[str, str], list[Observation]] = {}
    for o in obs:
        groups.setdefault((o.gpu_family, o.stack), []).append(o)
    return [fit_one(g, fam, stack) for (fam, stack), g in sorted(groups.items())]


# ---- files -----------------------------------------------------------------------------------


def save(path: Path, entries: Sequence[Corrections], what: str = "corrections file") -> None:
    """Write atomically, never over anything but a regular file (vramcalc.user_files)."""
    doc = CorrectionsFile(entries=list(entries))
    write_json_atomic(path, doc.model_dump(mode="json"), what)


def write_json_atomic(path: Path, obj: object, what: str = "output file") -> None:
    """JSON to `path` through a temporary file in the same folder, then os.replace, by the
    rules of vramcalc.user_files (regular files and new paths only, modes kept); a `.gz`
    path is written gzip-compressed and compact (the allocator traces)."""
    from vramcalc.user_files import write_json

    write_json(path, obj, what)


def load(path: Path) -> list[Corrections]:
    """Entries of a corrections file; a missing file is empty, a broken one is reported
    on stderr and read as empty (never fatal: the raw estimate still works)."""
    from vramcalc.errors import VramcalcError
    from vramcalc.user_files import read_text

    try:
        os.lstat(path)
        text = read_text(path, str(path), VramcalcError)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:  # a locked folder on the way
        print(f"warning: cannot read {path}: {err.strerror or err}; corrections ignored",
              file=sys.stderr)
        return []
    except VramcalcError as err:
        print(f"warning: {err}; corrections ignored", file=sys.stderr)
        return []
    return _parse(text, str(path))


def read_entries(path: Path, what: str) -> list[Corrections]:
    """The entries of a corrections file about to be rewritten: a missing file is empty,
    and one that cannot be read or is not a corrections file is a CalibrationError (the
    file would otherwise be replaced by the new entries alone)."""
    from vramcalc.errors import CalibrationError
    from vramcalc.user_files import read_text

    if not os.path.lexists(path):
        return []
    text = read_text(path, f"{what} {path}", CalibrationError)
    if not text.strip():  # an empty file holds nothing to keep
        return []
    hint = "not replaced: move it away or give another --out"
    try:
        doc = CorrectionsFile.model_validate_json(text)
    except ValidationError as err:
        raise CalibrationError(f"{what} {path}: not a corrections file "
                               f"({err.errors()[0]['msg']}); {hint}") from None
    if doc.kind != FILE_KIND or doc.schema_version != SCHEMA_VERSION:
        raise CalibrationError(f"{what} {path}: unsupported kind/schema_version; {hint}")
    return doc.entries


def user_data_dir() -> Path:
    """Where a user's own calibration goes: $VRAMCALC_DATA_DIR, else platformdirs'
    user_data_dir("vramcalc") (~/.local/share/vramcalc on Linux,
    ~/Library/Application Support/vramcalc on macOS, %LOCALAPPDATA%\\vramcalc on Windows)."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir as platform_dir

    return Path(platform_dir("vramcalc", appauthor=False))


def user_corrections_path() -> Path:
    return user_data_dir() / USER_FILE


@lru_cache(maxsize=8)
def _load_cached(path: str) -> tuple[Corrections, ...]:
    return tuple(load(Path(path)))


@lru_cache(maxsize=1)
def shipped_entries() -> tuple[Corrections, ...]:
    """The entries of vramcalc/data/corrections.json inside the installed package."""
    try:
        from vramcalc.models.catalog_index import package_folder

        text = (package_folder("vramcalc") / SHIPPED_RESOURCE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return ()
    return tuple(_parse(text, f"vramcalc/{SHIPPED_RESOURCE}"))


def _parse(text: str, where: str) -> list[Corrections]:
    try:
        doc = CorrectionsFile.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]["msg"]
        print(f"warning: {where} is not a corrections file ({first}); ignored", file=sys.stderr)
        return []
    if doc.kind != FILE_KIND or doc.schema_version != SCHEMA_VERSION:
        print(f"warning: {where}: unsupported kind/schema_version; ignored", file=sys.stderr)
        return []
    return doc.entries


def none_installed() -> str:
    """Why `available()` is empty: 'no corrections installed', or what is wrong with the
    file VRAMCALC_CORRECTIONS names (missing, not a file, holding no entries)."""
    env = os.environ.get(ENV_PATH)
    if env is None:
        return "no corrections installed"
    if not env:
        return f"turned off: {ENV_PATH} is empty"
    if not os.path.lexists(env):
        return f"{ENV_PATH}={env}: no such file"
    if not os.path.isfile(env):
        return f"{ENV_PATH}={env}: not a regular file"
    return f"{ENV_PATH}={env}: no usable corrections in it"


def available() -> list[tuple[Corrections, str]]:
    """Every entry `plan` / `check` may apply, with its origin ("shipped" or a file path);
    a user entry replaces the shipped one of the same GPU family and stack."""
    env = os.environ.get(ENV_PATH)
    if env is not None:
        return [(e, env) for e in _load_cached(env)] if env else []
    merged: dict[str, tuple[Corrections, str]] = {e.key: (e, SHIPPED) for e in shipped_entries()}
    user = str(user_corrections_path())
    for e in _load_cached(user):
        merged[e.key] = (e, user)
    return list(merged.values())


def match(
    entries: Sequence[Corrections], gpu_name: str, stack: str | None
) -> Corrections | None:
    """The entry of this GPU's family and this stack, if any (pure)."""
    fam = gpu_family(gpu_name)
    found = [e for e in entries if e.gpu_family == fam and e.stack == stack]
    return max(found, key=lambda e: e.n_points) if found else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def verdict_text(c: Corrections) -> str:
    """'held-out median device error 1.60% raw -> 1.20% corrected' (or why unknown)."""
    v = c.validation
    if v is None or not v.n_points:
        return "no held-out validation recorded"
    peak = "device" if "device" in v.raw_median_abs_error else "allocated"
    return (f"held-out median {peak} error {_pct(v.raw_median_abs_error.get(peak))} raw -> "
            f"{_pct(v.corrected_median_abs_error.get(peak))} corrected, {v.n_points} points")


def _origin_text(origin: str) -> str:
    return "the shipped file" if origin == SHIPPED else origin


def select_corrections(gpu_name: str | None) -> Selection:
    """The corrections `plan` / `check` apply for `gpu_name`, by the three rules of the
    module docstring; cheap: two small JSON files, package metadata, never torch."""
    early = without_files(gpu_name)
    if early is not None:
        return early
    assert gpu_name is not None
    entries = available()
    if not entries:
        return Selection(None, None, f"calibration: raw estimate ({none_installed()})")
    fam = gpu_family(gpu_name)
    same_family = [(e, o) for e, o in entries if e.gpu_family == fam]
    if not same_family:
        have = ", ".join(sorted({e.gpu_family for e, _ in entries}))
        return Selection(None, None, (
            f"calibration: raw estimate (no corrections for {fam}; there are for {have}; "
            "'vramcalc calibrate run' + 'fit' on your GPU adds them)"))
    stack = installed_stack()
    stacks = ", ".join(sorted({e.stack for e, _ in same_family}))
    if stack is None:
        return Selection(None, None, (
            f"calibration: raw estimate (torch/transformers not installed, so the software "
            f"stack the {fam} corrections were fitted on ({stacks}) cannot be checked)"))
    found = [(e, o) for e, o in same_family if e.stack == stack]
    if not found:
        return Selection(None, None, (
            f"calibration: raw estimate ({fam} corrections were fitted on {stacks}; this "
            f"environment has {stack})"))
    c, origin = max(found, key=lambda eo: eo[0].n_points)
    where = _origin_text(origin)
    if c.helps is not True:
        why = ("did not reduce the error" if c.helps is False
               else "carry no held-out verdict; refit with 'vramcalc calibrate fit'")
        return Selection(None, origin, (
            f"calibration: raw estimate ({c.key} corrections from {where} {why}: "
            f"{verdict_text(c)})"))
    user_over = origin != SHIPPED and any(e.key == c.key for e in shipped_entries())
    return Selection(c, origin, (
        f"calibration: applied {c.gpu_family} corrections ({c.stack}, {c.n_points} measured "
        f"points; {verdict_text(c)}) from {where}"
        f"{' (user entry, replaces the shipped one)' if user_over else ''}; "
        f"--no-calibration for the raw estimate"))


def validation_of(
    raw_errors: dict[str, list[float]], corrected_errors: dict[str, list[float]]
) -> tuple[bool, Validation]:
    """(helps, Validation) from absolute relative errors per peak, raw and held-out
    corrected on the same points. Helps: the corrected median is lower for peak device
    (what decides fits), or for peak allocated when no device peak was measured, and
    not higher for any other peak."""
    import statistics

    raw = {k: statistics.median(v) for k, v in raw_errors.items() if v}
    cor = {k: statistics.median(v) for k, v in corrected_errors.items() if v}
    n = len(corrected_errors.get("allocated", []))
    v = Validation(n_points=n, raw_median_abs_error={k: round(x, 6) for k, x in raw.items()},
                   corrected_median_abs_error={k: round(x, 6) for k, x in cor.items()})
    main = "device" if "device" in raw and "device" in cor else "allocated"
    if n == 0 or main not in raw or main not in cor:
        return False, v
    helps = cor[main] < raw[main] and all(cor[k] <= raw[k] for k in raw if k in cor)
    return helps, v
