"""Does a plan fit? One rule for every command: required free memory + margin <= memory.

Each verdict also says how sure it is: "fits", "tight" (fits, but by less than the measured
spread of the rule, SPREAD_ABS_BYTES / SPREAD_REL) or "does_not_fit". Every "largest batch /
longest sequence" (`plan --max`, `check --max`, `fit`, `sweep`'s "fits up to"), suggestion
and smallest GPU asks for "fits" (`fits_certainly`): a tight value is not offered.

`required_device_bytes` (vramcalc.memory.estimate.Estimate) is the free memory the step needs; the
margin (default 0.5 GiB) covers estimation error and fragmentation. The memory is what a card
offers a new process: NVML's free memory for a detected card, and for an empty card its total
less the driver's reservation (`GpuModel.usable_bytes`; an empty H100 offers 79.18 of its
79.65 GiB). Pure: nothing here imports rich, typer, pynvml or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, computed_field

from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.hardware.catalog import GpuModel
    from vramcalc.hardware.devices import DeviceInfo

DEFAULT_MARGIN_GIB = 0.5
FIT_RULE = "fits: required free memory + margin <= memory"

# How far the true required free memory may sit from the estimate beyond the allocator band
# (Estimate.required_low .. required_device_bytes, allocator.required_slack): the error of
# peak allocated, 0.6 % median and 6 % p90 on the pre-registered H200 holdout 3
# (docs/memory-model.md). A verdict that fits by less than this is "fits, tight".
SPREAD_ABS_BYTES = 256 * 2**20
SPREAD_REL = 0.03
Certainty = Literal["fits", "tight", "does_not_fit"]
# The words plan and check print for each certainty.
CERTAINTY_WORDS: dict[str, str] = {
    "fits": "fits", "tight": "fits, tight", "does_not_fit": "does NOT fit",
}


def spread_bytes(required_bytes: int) -> int:
    """The measured spread of the estimate around `required_bytes`: max(256 MiB, 3 %)."""
    return max(SPREAD_ABS_BYTES, int(SPREAD_REL * max(required_bytes, 0)))


def least_required(required_bytes: int, required_low_bytes: int | None) -> int:
    """The least the step needs: required_low_bytes, never above required_bytes (None:
    no band, required_bytes itself)."""
    return required_bytes if required_low_bytes is None else min(required_low_bytes,
                                                                 required_bytes)


def certainty(memory_bytes: int, required_bytes: int, margin_bytes: int,
              required_low_bytes: int | None = None) -> Certainty:
    """"does_not_fit" when the least the step needs (required_low) + margin > memory;
    "tight" when it fits that but not the most it may need (required + margin: the
    allocator's history decides), or the headroom is less than the spread; else "fits"."""
    if least_required(required_bytes, required_low_bytes) + margin_bytes > memory_bytes:
        return "does_not_fit"
    if (required_bytes + margin_bytes > memory_bytes
            or memory_bytes - required_bytes < spread_bytes(required_bytes)):
        return "tight"
    return "fits"


def certain_need(required_bytes: int, margin_bytes: int) -> int:
    """The memory a card must offer for `certainty` to say "fits" (not tight) on a plan
    that requires `required_bytes`: required + max(margin, spread). `certainty` is "fits"
    exactly when this is at most the memory (the least required is never above the
    required), and it grows with required_bytes, so a search can bisect on it."""
    return required_bytes + max(margin_bytes, spread_bytes(required_bytes))


def fits_certainly(memory_bytes: int, required_bytes: int, margin_bytes: int) -> bool:
    """The rule of every "largest batch / longest sequence", suggestion and smallest GPU:
    the value that `plan` and `check` call "fits" (not "fits, tight", which may run out
    of memory): `certainty(...) == "fits"`, whatever the band's least."""
    return certain_need(required_bytes, margin_bytes) <= memory_bytes


class Verdict(BaseModel):
    """The answer for one card: memory it offers, memory the plan needs, and the margin."""

    # built on first use (issue 9)
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    memory_bytes: int  # what the card offers (free now, or an empty card's usable total)
    required_bytes: int  # Estimate.required_device_bytes: runs whatever the allocator did
    margin_bytes: int
    required_low_bytes: int | None = None  # Estimate.required_low: below it, cannot run

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        """Fits or fits tight: the least the step needs + margin <= memory."""
        return self.certainty != "does_not_fit"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def headroom_bytes(self) -> int:
        """memory - required (the margin not subtracted); negative when short."""
        return self.memory_bytes - self.required_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def spread_bytes(self) -> int:
        """The measured spread of the rule around required_bytes (SPREAD_*)."""
        return spread_bytes(self.required_bytes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def certainty(self) -> Certainty:
        """fits, tight (fits with less headroom than the spread) or does_not_fit; a tight
        verdict still fits (`fits` is True, exit code 0)."""
        return certainty(self.memory_bytes, self.required_bytes, self.margin_bytes,
                         self.required_low_bytes)

    @property
    def tight_reason(self) -> str:
        """Why a verdict is tight: the allocator band or the estimate's spread."""
        low = least_required(self.required_bytes, self.required_low_bytes)
        if self.required_bytes + self.margin_bytes > self.memory_bytes > low:
            return (f"tight: needs {low / GiB:.2f} GiB at least and {self.required_bytes / GiB:.2f}"
                    " GiB if the allocator's cached segments are fragmented (the order of "
                    "earlier requests decides)")
        return (f"tight: the headroom is within the estimate's measured spread "
                f"({self.spread_bytes / GiB:.2f} GiB)")

    @property
    def word(self) -> str:
        """"fits", "fits, tight" or "does NOT fit"."""
        return CERTAINTY_WORDS[self.certainty]


def verdict(memory_bytes: int, required_bytes: int, margin_bytes: int,
            required_low_bytes: int | None = None) -> Verdict:
    """Whether `required_bytes` + `margin_bytes` fit in `memory_bytes` (certainly, or
    tight when only `required_low_bytes` + margin do)."""
    return Verdict(memory_bytes=memory_bytes, required_bytes=required_bytes,
                   margin_bytes=margin_bytes, required_low_bytes=required_low_bytes)


class Target(BaseModel):
    """A card to check a plan against: a detected GPU, a catalog GPU or a sized empty card.

    `free_bytes` is what it offers now (NVML free for a detected card; the usable total for
    an empty one); `empty_bytes` what it offers empty (total less the driver's reservation).
    """

    # built on first use (issue 9)
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    index: int | None = None  # NVML index; None for --gpu / --gpu-memory
    label: str | None = None  # "0", or "0:1" for a MIG instance
    total_bytes: int  # memory.total
    free_bytes: int
    empty_bytes: int
    bf16_supported: bool = True
    compute_capability: str | None = None
    corrections_gpu: str | None = None  # the GPU name corrections are chosen by; None: any

    @property
    def where(self) -> str:
        return f"GPU {self.label} ({self.name})" if self.label is not None else self.name


def catalog_target(gpu: GpuModel) -> Target:
    """An empty card of a catalog model: it offers its total less the driver's reservation."""
    return Target(name=gpu.name, total_bytes=gpu.memory_bytes, free_bytes=gpu.usable_bytes,
                  empty_bytes=gpu.usable_bytes, bf16_supported=gpu.bf16_supported,
                  compute_capability=gpu.compute_capability, corrections_gpu=gpu.name)


def sized_target(memory_bytes: int, name: str) -> Target:
    """An empty card of `memory_bytes` usable memory (--gpu-memory), of no known family."""
    return Target(name=name, total_bytes=memory_bytes, free_bytes=memory_bytes,
                  empty_bytes=memory_bytes)


def detected_target(d: DeviceInfo) -> Target:
    """A detected card: NVML free now; empty, its total less the driver's reservation
    (NVML v2 `reserved`: 480 MiB on our H100)."""
    return Target(name=d.name, index=d.index, label=d.label, total_bytes=d.total_bytes,
                  free_bytes=d.free_bytes, empty_bytes=d.total_bytes - (d.reserved_bytes or 0),
                  bf16_supported=d.bf16_supported,
                  compute_capability="{}.{}".format(*d.compute_capability),
                  corrections_gpu=d.name)
