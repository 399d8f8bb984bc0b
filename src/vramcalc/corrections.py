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
arithmetic on pydantic models: no torch; `find_corrections` reads one small JSON file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramcalc.allocator import CUDA_CONTEXT
from vramcalc.result import Components, Estimate

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

# calibration/corrections.json of a source checkout (src/vramcalc/ -> repo root).
REPO_CORRECTIONS = Path(__file__).resolve().parents[2] / "calibration" / "corrections.json"
ENV_PATH = "VRAMCALC_CORRECTIONS"  # points find_corrections at another file ("" disables)


class Corrections(BaseModel):
    """Correction factors fitted on the points of one GPU family and stack."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_family: str  # "H100"
    stack: str  # "torch2.11-transformers5"
    k_act: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    k_slack: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    context_bytes: int = Field(default=CUDA_CONTEXT, ge=0)
    n_points: int = Field(default=0, ge=0)
    models: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.gpu_family}/{self.stack}"


class CorrectionsFile(BaseModel):
    """calibration/corrections.json: every fitted entry."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: str = FILE_KIND
    entries: list[Corrections] = []


class Observation(BaseModel):
    """One measured point next to its raw estimate: what `fit` needs, all in bytes."""

    model_config = ConfigDict(frozen=True)

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
    """'NVIDIA H100 80GB HBM3' -> 'H100'; 'NVIDIA GeForce RTX 4090' -> 'RTX 4090'."""
    upper = name.upper().replace("NVIDIA", " ")
    for match in _FAMILY.finditer(upper):
        token = match.group(0)
        if re.fullmatch(r"\d+GB", token):
            continue
        return re.sub(r"\s+", " ", token.strip())
    return name.strip()


def stack_key(torch_version: str | None, transformers_version: str | None) -> str:
    """'2.11.0+cu130', '5.17.0' -> 'torch2.11-transformers5'."""
    def major_minor(v: str | None, parts: int) -> str:
        if not v or v == "missing":
            return "?"
        return ".".join(re.split(r"[.+]", v)[:parts])

    torch_part = major_minor(torch_version, 2)
    return f"torch{torch_part}-transformers{major_minor(transformers_version, 1)}"


def installed_stack() -> str | None:
    """Stack key of this environment from package metadata (never imports torch)."""
    try:
        return stack_key(version("torch"), version("transformers"))
    except PackageNotFoundError:
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
    unreleasable = est.required_device_bytes - est.peak_allocated_bytes - est.paged_bytes - (
        est.components.get("cuda_context", 0)
    )
    required = min(peak_device, peak_alloc + unreleasable + c.context_bytes + est.paged_bytes)
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


def save(path: Path, entries: Sequence[Corrections]) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    doc = CorrectionsFile(entries=list(entries))
    write_json_atomic(path, doc.model_dump(mode="json"))


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> list[Corrections]:
    """Entries of a corrections file; a missing file is empty, a broken one is reported
    on stderr and read as empty (never fatal: the raw estimate still works)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as err:
        print(f"warning: cannot read {path}: {err}; corrections ignored", file=sys.stderr)
        return []
    try:
        doc = CorrectionsFile.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]["msg"]
        print(f"warning: {path} is not a corrections file ({first}); ignored", file=sys.stderr)
        return []
    if doc.kind != FILE_KIND or doc.schema_version != SCHEMA_VERSION:
        print(f"warning: {path}: unsupported kind/schema_version; ignored", file=sys.stderr)
        return []
    return doc.entries


def default_path() -> Path:
    env = os.environ.get(ENV_PATH)
    if env is not None:
        return Path(env)
    return REPO_CORRECTIONS


@lru_cache(maxsize=8)
def _load_cached(path: str) -> tuple[Corrections, ...]:
    return tuple(load(Path(path)))


def choose(
    entries: Sequence[Corrections], gpu_name: str | None, stack: str | None
) -> Corrections | None:
    """The entry for this GPU's family, preferring this stack, else the one with the most
    points. No GPU name (planning for no particular device): the best-measured entry."""
    if gpu_name is not None:
        fam = gpu_family(gpu_name)
        entries = [e for e in entries if e.gpu_family == fam]
    if not entries:
        return None
    same = [e for e in entries if stack is not None and e.stack == stack]
    return max(same or entries, key=lambda e: e.n_points)


def find_corrections(gpu_name: str | None) -> Corrections | None:
    """The committed corrections matching `gpu_name` (see `choose`); None when there are
    none. Cheap: one small JSON file, read once per process; never imports torch."""
    path = default_path()
    if not str(path):
        return None
    return choose(_load_cached(str(path)), gpu_name, installed_stack())
