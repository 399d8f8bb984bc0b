"""Errors a user can cause. The CLI turns each into one line on stderr and its exit code.

Anything that is not a VramcalcError is a bug and keeps its traceback.
"""

from __future__ import annotations


class VramcalcError(Exception):
    """Base of every user-facing error; `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class SpecError(VramcalcError):
    """A model spec or config.json is malformed, incomplete or inconsistent."""


class UnknownModelError(VramcalcError):
    """A model name matches no catalog entry, alias or file."""


class PlanError(VramcalcError):
    """Training settings that cannot be estimated (bad target module, rank, ...)."""


class OutputFileError(VramcalcError):
    """A file vramcalc would write is not a regular file or a new path, or cannot be written
    (vramcalc.user_files)."""


class UnknownGpuError(VramcalcError):
    """A GPU name matches no entry of the GPU catalog."""


class NoGpuError(VramcalcError):
    """No usable NVIDIA GPU / driver / NVML was found."""

    exit_code = 4


class CalibrationError(VramcalcError):
    """Calibration cannot run here (no GPU, missing extra) or its data is unusable."""


class MissingExtraError(VramcalcError):
    """A command needs the `calibrate` extra (torch, transformers, bitsandbytes, peft)."""
