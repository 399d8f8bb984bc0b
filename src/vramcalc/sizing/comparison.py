"""One model under every fine-tuning method (`compare`), every model on one GPU (`fit`).

Pure functions over (spec, plan): each method is the user's plan with the method's own
settings (method, quant, weights dtype, and the usual optimizer unless one was asked for)
and estimated by the same `estimate` (the full one `plan` shows); "fits" is
`vramcalc.sizing.verdict`'s rule on a catalog GPU's usable memory (its total less the driver's
reservation), as `plan --gpu` and `check --gpu` decide it. The smallest GPU and the largest
batch / longest sequence ask for "fits" (verdict.fits_certainly: not "fits, tight").
Nothing here imports rich, typer, pynvml or torch.

Per-method optimizer (used unless the user gives --optimizer, which then applies to every
row): full fine-tuning `adamw_torch_fused` (HF Trainer's default AdamW on torch >= 2.8,
fp32-sized states follow the parameters), LoRA and QLoRA `paged_adamw_8bit` (the QLoRA
paper's and the usual SFT recipes' choice, and vramcalc's default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from vramcalc.corrections.planning import EstimateFn, memoized
from vramcalc.errors import PlanError
from vramcalc.hardware.catalog import GpuModel
from vramcalc.memory.estimate import estimate
from vramcalc.memory.result import Estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import LAYOUTS, LOSS_KERNELS, OFFLOAD_ACTIVATIONS, Optimizer, TrainPlan
from vramcalc.sizing.advice import for_gpu
from vramcalc.sizing.search import (
    RequiredFn,
    largest_fitting,
    memoized_quick,
    quick_estimate,
    raw_probes,
    raw_required,
)
from vramcalc.sizing.verdict import Verdict, verdict

FULL_OPTIMIZER: Optimizer = "adamw_torch_fused"
LORA_OPTIMIZER: Optimizer = "paged_adamw_8bit"


class MethodSetup(NamedTuple):
    """A fine-tuning method as TrainPlan fields, set per row over the user's plan."""

    name: str  # the row's key in --json
    label: str  # "{compute}" is replaced by the plan's compute dtype
    changes: dict[str, Any]  # TrainPlan fields the method sets
    optimizer: Optimizer  # used unless the user gave --optimizer


METHOD_SETUPS: dict[str, MethodSetup] = {
    "full": MethodSetup("full", "full ({compute})",
                        {"method": "full", "quant": "none", "weights_dtype": None},
                        FULL_OPTIMIZER),
    "full-fp32": MethodSetup("full-fp32", "full, fp32 master",
                             {"method": "full", "quant": "none", "weights_dtype": "fp32"},
                             FULL_OPTIMIZER),
    "lora": MethodSetup("lora", "LoRA ({compute} base)",
                        {"method": "lora", "quant": "none", "weights_dtype": None},
                        LORA_OPTIMIZER),
    "qlora": MethodSetup("qlora", "QLoRA (nf4)",
                         {"method": "qlora", "quant": "nf4", "weights_dtype": None},
                         LORA_OPTIMIZER),
    "int8": MethodSetup("int8", "8-bit LoRA (int8)",
                        {"method": "qlora", "quant": "int8", "weights_dtype": None},
                        LORA_OPTIMIZER),
}
COMPARE_METHODS = ("full", "full-fp32", "lora", "qlora", "int8")
FIT_METHODS = ("full", "lora", "qlora", "int8")
# The plan options a method sets: the user may not give them to compare / fit.
PER_METHOD_OPTIONS = ("method", "quant", "weights_dtype")


def method_plan(base: TrainPlan, name: str, optimizer: Optimizer | None = None) -> TrainPlan:
    """`base` trained by method `name`; `optimizer` (the user's) or the method's usual one.

    The changes are consistent TrainPlan values (method and quant set together), so the
    copy skips validation. `kbit_prep` (a quantized base's preparation, e.g. TRL's
    --no-kbit-prep) is the QLoRA rows'; `adapter_dtype` the LoRA rows' (full has none)."""
    setup = METHOD_SETUPS[name]
    changes: dict[str, object] = {**setup.changes, "optimizer": optimizer or setup.optimizer}
    if setup.changes["method"] != "qlora":
        changes["kbit_prep"] = True
    if setup.changes["method"] == "full":
        changes["adapter_dtype"] = "fp32"
    return base.model_copy(update=changes)


def method_label(name: str, plan: TrainPlan) -> str:
    return METHOD_SETUPS[name].label.format(compute=plan.compute_dtype)


# ---- compare: one model, every method --------------------------------------------------------
# The result types build their validators on first use (defer_build): compare makes no
# FitRow, fit no MethodRow, and neither makes a KernelCell without --switches.


class SmallestGpu(BaseModel):
    """The catalog GPU with the least usable memory a plan fits, and its verdict there."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    gpu: str
    compute_dtype: str  # fp16 on a GPU without bf16
    verdict: Verdict


class KernelCell(BaseModel):
    """A method's plan with one loss kernel (TrainPlan.loss_kernel): its estimate, or why
    the kernel does not apply."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    estimate: Estimate | None
    error: str | None = None


# The memory-saving switches `compare` shows beside the loss kernels: each TrainPlan field
# and its values, in the order of the table's columns (plans.py OFFLOAD_ACTIVATIONS,
# LAYOUTS). A switched layout drops tokens_per_step (a padded or packed batch computes
# every row in full: TrainPlan._check_layout_and_offload).
SWITCHES: dict[str, tuple[str, ...]] = {
    "offload_activations": OFFLOAD_ACTIVATIONS,
    "layout": LAYOUTS,
}


class MethodRow(BaseModel):
    """One method of `compare`: its plan and estimate, or why it cannot start; and the
    same plan under each loss kernel (`loss_kernels`, LOSS_KERNELS order) and each value
    of the other memory-saving switches (`switches`, SWITCHES: field -> value -> cell)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    method: str
    label: str
    plan: TrainPlan
    estimate: Estimate | None  # None: the run cannot start (see error)
    smallest_gpu: SmallestGpu | None  # None: no catalog GPU fits it (or it cannot start)
    error: str | None = None
    loss_kernels: dict[str, KernelCell] = {}
    switches: dict[str, dict[str, KernelCell]] = {}


def kernel_cells(spec: ModelSpec, plan: TrainPlan, est: Estimate,
                 estimate_fn: EstimateFn = estimate) -> dict[str, KernelCell]:
    """`plan` under every loss kernel, each estimated as `plan --loss-kernel K` would
    be (its own kernel's cell is `est`)."""
    out: dict[str, KernelCell] = {}
    for kernel in LOSS_KERNELS:
        if kernel == plan.loss_kernel:
            out[kernel] = KernelCell(estimate=est)
            continue
        try:
            e = estimate_fn(spec, plan.model_copy(update={"loss_kernel": kernel}))
        except PlanError as err:
            out[kernel] = KernelCell(estimate=None, error=str(err))
            continue
        out[kernel] = KernelCell(estimate=e)
    return out


def switch_cells(spec: ModelSpec, plan: TrainPlan, est: Estimate,
                 estimate_fn: EstimateFn = estimate) -> dict[str, dict[str, KernelCell]]:
    """`plan` with each value of each switch (SWITCHES), each estimated as `plan
    --offload-activations V` / `--batch-layout V` would be (the plan's own value is
    `est`); a value the plan cannot take (checkpoints offloading without gradient
    checkpointing) is a cell with its error."""
    out: dict[str, dict[str, KernelCell]] = {}
    for field, values in SWITCHES.items():
        cells: dict[str, KernelCell] = {}
        for value in values:
            if getattr(plan, field) == value:
                cells[value] = KernelCell(estimate=est)
                continue
            update: dict[str, Any] = {field: value}
            if field == "layout" and value != "padding-free":
                update["tokens_per_step"] = None
            if field == "offload_activations" and value == "checkpoints" and \
                    not plan.gradient_checkpointing:
                cells[value] = KernelCell(estimate=None, error=(
                    "offloads the checkpointed layer inputs: needs gradient checkpointing"))
                continue
            try:
                e = estimate_fn(spec, plan.model_copy(update=update))
            except PlanError as err:
                cells[value] = KernelCell(estimate=None, error=str(err))
                continue
            cells[value] = KernelCell(estimate=e)
        out[field] = cells
    return out


def smallest_gpu(
    spec: ModelSpec,
    plan: TrainPlan,
    margin_bytes: int,
    gpus: Iterable[GpuModel],
    estimate_for: Callable[[GpuModel], EstimateFn] = lambda _gpu: estimate,
) -> SmallestGpu | None:
    """The catalog GPU with the least usable memory on which `plan` (fp16 compute where
    bf16 is missing) fits an empty card with `margin_bytes` to spare: its verdict is
    "fits", as `plan --gpu` gives it (a GPU on which it is "fits, tight" is not one to
    rent); None if none does. Ties in usable memory go to the first in catalog order.
    Where a GPU's estimate is the raw one, its required bytes are read without the replay
    (search.raw_probes: estimate.required_bytes, the same bytes): the verdict is all this
    column shows."""
    cache: dict[tuple[int, str], tuple[int, int]] = {}
    for gpu in sorted(gpus, key=lambda g: g.usable_bytes):
        fn = estimate_for(gpu)
        p = for_gpu(plan, gpu.bf16_supported)
        key = (id(fn), p.compute_dtype)
        if key not in cache:  # a GPU to rent: it must fit whatever the allocator does
            probes = raw_probes(fn)
            if probes is None:
                est = fn(spec, p)
                cache[key] = (est.required_device_bytes, est.required_low)
            else:
                cache[key] = probes.required(spec, p)
        need, low = cache[key]
        v = verdict(gpu.usable_bytes, need, margin_bytes, low)
        if v.certainty == "fits":
            return SmallestGpu(gpu=gpu.name, compute_dtype=p.compute_dtype, verdict=v)
    return None


def compare(
    spec: ModelSpec,
    base: TrainPlan,
    margin_bytes: int,
    gpus: Sequence[GpuModel],
    optimizer: Optimizer | None = None,
    methods: Sequence[str] = COMPARE_METHODS,
    estimate_for: Callable[[GpuModel], EstimateFn] = lambda _gpu: estimate,
    estimate_fn: EstimateFn = estimate,
    switches: bool = False,
) -> list[MethodRow]:
    """`base` under each of `methods`: the estimate of `plan` without --gpu (`estimate_fn`)
    and the smallest catalog GPU it fits (each GPU's `estimate_for`); with `switches`, also
    each row under every loss kernel and memory-saving switch (kernel_cells, switch_cells:
    about a dozen more estimates a row, so only when asked). A method that cannot
    start (`estimate` raises PlanError, e.g. LoRA dropout on transformers-5 MoE experts) is
    a row with its error."""
    rows = []
    for name in methods:
        p = method_plan(base, name, optimizer)
        label = method_label(name, p)
        try:
            est = estimate_fn(spec, p)
        except PlanError as err:
            rows.append(MethodRow(method=name, label=label, plan=p, estimate=None,
                                  smallest_gpu=None, error=str(err)))
            continue
        small = smallest_gpu(spec, p, margin_bytes, gpus, estimate_for)
        rows.append(MethodRow(method=name, label=label, plan=p, estimate=est,
                              smallest_gpu=small,
                              loss_kernels=(kernel_cells(spec, p, est, estimate_fn)
                                            if switches else {}),
                              switches=(switch_cells(spec, p, est, estimate_fn)
                                        if switches else {})))
    return rows


# ---- fit: every model, one GPU ---------------------------------------------------------------


class FitRow(BaseModel):
    """One model x method on one GPU: the verdict at batch 1 and the plan's seq-len, the
    largest batch (at that seq-len) and the longest sequence (at the plan's batch)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    model: str
    params: int
    method: str
    label: str
    max_position_embeddings: int | None
    required_device_bytes: int | None  # at batch 1; None: cannot start
    verdict: Verdict | None
    max_batch: int  # 0: not even batch 1 fits
    max_seq_len: int  # at the plan's batch; 0: not even 1 token fits
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.verdict is not None and self.verdict.fits


def fit_rows(
    specs: Iterable[ModelSpec],
    base: TrainPlan,
    gpu: GpuModel,
    margin_bytes: int,
    optimizer: Optimizer | None = None,
    methods: Sequence[str] = FIT_METHODS,
    estimate_fn: EstimateFn = estimate,
) -> list[FitRow]:
    """Every model x method on an empty `gpu` (fp16 compute where bf16 is missing).

    The searches run only for rows that fit at batch 1 (fits or fits, tight); the largest
    batch and the longest sequence (at the plan's batch) are the largest values `plan`
    calls "fits" (search.largest_fitting), 0 when none is (a row tight at batch 1).
    Where `estimate_fn` is the raw `estimate` (no corrections), the rows read its required
    bytes without the allocator's replay (search.raw_required: the same bytes), the
    searches' guesses and they on one phase-formula estimate per plan."""
    memory = gpu.usable_bytes
    required_fn: RequiredFn | None = None
    guess_fn: EstimateFn = quick_estimate
    if estimate_fn is estimate:
        guess_fn = memoized_quick()
        required_fn = raw_required(guess_fn)
    estimate_fn = memoized(estimate_fn)
    rows = []
    for spec in specs:
        for name in methods:
            p = for_gpu(method_plan(base, name, optimizer), gpu.bf16_supported)
            one = p.model_copy(update={"batch_size": 1})
            common: dict[str, Any] = {
                "model": spec.name, "params": spec.num_params(), "method": name,
                "label": method_label(name, p),
                "max_position_embeddings": spec.max_position_embeddings,
            }
            try:
                if required_fn is not None:
                    need, low = required_fn(spec, one)
                else:
                    e = estimate_fn(spec, one)
                    need, low = e.required_device_bytes, e.required_low
            except PlanError as err:
                rows.append(FitRow(**common, required_device_bytes=None, verdict=None,
                                   max_batch=0, max_seq_len=0, error=str(err)))
                continue
            v = verdict(memory, need, margin_bytes, low)
            batch = seq = 0
            if v.fits:
                # (anchored: `estimate_fn` or `required_fn` remembers p where it is `one`)
                batch = largest_fitting(spec, p, "batch", memory, margin_bytes,
                                        estimate_fn=estimate_fn, guess_fn=guess_fn,
                                        anchored=p == one, required_fn=required_fn)
                seq = largest_fitting(spec, p, "seq-len", memory, margin_bytes,
                                      estimate_fn=estimate_fn, guess_fn=guess_fn,
                                      anchored=p == one, required_fn=required_fn)
            rows.append(FitRow(**common, required_device_bytes=need, verdict=v,
                               max_batch=batch, max_seq_len=seq))
    return rows
