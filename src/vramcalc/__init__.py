"""vramcalc: predict the GPU memory of a fine-tune, inference or merge before it runs.

`from vramcalc import plan, check` loads the Python API (vramcalc.api) on first use, and
`from vramcalc import preflight` the check a training script runs (vramcalc.preflight_check:
a module of another name, so that `vramcalc.preflight` stays the function once that module
is imported); the package itself imports nothing else, so the CLI and the API start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("plan", "check", "PlanEstimate", "CheckResult", "GpuVerdict")
_PREFLIGHT = ("preflight", "PreflightResult", "DoesNotFitError")
__all__ = ["CheckResult", "DoesNotFitError", "GpuVerdict", "PlanEstimate", "PreflightResult",
           "__version__", "check", "plan", "preflight"]

if TYPE_CHECKING:
    from vramcalc.api import CheckResult, GpuVerdict, PlanEstimate, check, plan
    from vramcalc.preflight_check import DoesNotFitError, PreflightResult, preflight


def __getattr__(name: str) -> Any:
    if name in _API:
        from vramcalc import api

        return getattr(api, name)
    if name in _PREFLIGHT:
        from vramcalc import preflight_check

        return getattr(preflight_check, name)
    raise AttributeError(f"module 'vramcalc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, *_PREFLIGHT])
