"""vramcalc: predict the GPU memory of a fine-tune, inference or merge before it runs.

`from vramcalc import plan, check` loads the Python API (vramcalc.api) on first use; the
package itself imports nothing else, so the CLI and the API start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("plan", "check", "PlanEstimate", "CheckResult", "GpuVerdict")
__all__ = ["CheckResult", "GpuVerdict", "PlanEstimate", "__version__", "check", "plan"]

if TYPE_CHECKING:
    from vramcalc.api import CheckResult, GpuVerdict, PlanEstimate, check, plan


def __getattr__(name: str) -> Any:
    if name in _API:
        from vramcalc import api

        return getattr(api, name)
    raise AttributeError(f"module 'vramcalc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
