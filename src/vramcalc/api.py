"""The Python API: `from vramcalc import plan, check`.

The same computation as `vramcalc plan` / `vramcalc check --gpu NAME`: the model resolved
the same way (catalog name, alias, hub id, spec YAML or config.json path, or a ModelSpec),
the plan validated by the same TrainPlan, the committed corrections applied the same way.
`GpuVerdict` (`verdict_on`) is the one verdict type: `check` builds its table and JSON from
it (`GpuVerdict.to_dict`), for training, inference and merging alike.
Importing it loads neither rich nor typer (nor torch).

    >>> from vramcalc import plan, check
    >>> est = plan("llama-3.1-8b", batch_size=4, seq_len=2048)
    >>> est.required_device_bytes / 2**30          # GiB that must be free
    >>> check("llama-3.1-8b", gpus=["rtx-4090", "a100-80gb"], batch_size=4).fits
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from vramcalc.errors import CalibrationError, PlanError
from vramcalc.memory.result import Estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import (
    AdapterDtype,
    Attention,
    ComputeDtype,
    InferPlan,
    Layout,
    Loop,
    LossKernel,
    MergePlan,
    Method,
    MoeExperts,
    OffloadActivations,
    Optimizer,
    Quant,
    TrainPlan,
    WeightsDtype,
)
from vramcalc.sizing.verdict import CERTAINTY_WORDS, Certainty, Target, Verdict, verdict
from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.models.resolve import Resolved

DEFAULT_MARGIN_GIB = 0.5  # as `vramcalc check --margin`

__all__ = ["CheckResult", "GpuVerdict", "MaxResult", "ModelSummary", "PlanEstimate",
           "PlanResult", "check", "gpus", "largest", "make_plan", "models", "plan", "plan_step",
           "verdict_on"]


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


class PlanEstimate(Estimate):
    """An Estimate with the plan it was computed for (and the model's import notes)."""

    # built on first use, as GpuVerdict: `plan` imports this module (issue 9)
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    plan: TrainPlan

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={_gib(v)}" for k, v in self.components.items() if v)
        return (
            f"PlanEstimate({self.model!r}, required={_gib(self.required_device_bytes)}, "
            f"peak_device={_gib(self.peak_device_bytes)}, peak_phase={self.peak_phase!r}, "
            f"{parts})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{k}</td><td style='text-align:right'>{v / GiB:.2f}</td></tr>"
            for k, v in self.components.items()
            if v
        )
        notes = "".join(f"<li>{n}</li>" for n in self.notes)
        return (
            f"<b>{self.model}</b>: requires {_gib(self.required_device_bytes)} free "
            f"(peak device {_gib(self.peak_device_bytes)}, phase {self.peak_phase})"
            f"<table><tr><th>component</th><th>GiB</th></tr>{rows}</table>"
            + (f"<ul>{notes}</ul>" if notes else "")
        )


class GpuVerdict(BaseModel):
    """A plan checked on one card, by the rule of `plan` and `check`: now (the memory the
    card offers: NVML free for a detected card, the usable total of an empty one) and on
    the empty card (its total less the driver's reservation). The one verdict type of the
    API and the CLI (`vramcalc check`'s rows and JSON are `to_dict`, `plan --gpu`'s
    `verdict_fields`)."""

    # built on first use (issue 9)
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    target: Target
    compute_dtype: str  # fp16 on a GPU without bf16
    estimate: Estimate  # of the plan as it runs on this card
    now: Verdict
    empty: Verdict

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu(self) -> str:
        return self.target.name

    @computed_field  # type: ignore[prop-decorator]
    @property
    def memory_bytes(self) -> int:
        """What the card offers now (an empty catalog card: GpuModel.usable_bytes)."""
        return self.now.memory_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def required_bytes(self) -> int:
        return self.now.required_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def margin_bytes(self) -> int:
        return self.now.margin_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        """Fits or fits tight in what the card offers now (exit code 0)."""
        return self.now.fits

    @computed_field  # type: ignore[prop-decorator]
    @property
    def certainty(self) -> Certainty:
        """fits, tight (inside the allocator band or the spread) or does_not_fit."""
        return self.now.certainty

    @computed_field  # type: ignore[prop-decorator]
    @property
    def spread_bytes(self) -> int:
        return self.now.spread_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def headroom_bytes(self) -> int:
        """memory - required (the margin not subtracted)."""
        return self.now.headroom_bytes

    @property
    def fits_free(self) -> bool:
        return self.now.fits

    @property
    def fits_empty(self) -> bool:
        return self.empty.fits

    def verdict_fields(self) -> dict[str, Any]:
        """The verdict's keys in `plan --gpu ... --json` (training, inference, merging)."""
        return {"gpu": self.gpu, "gpu_memory_bytes": self.memory_bytes,
                "margin_bytes": self.margin_bytes, "fits": self.fits,
                "certainty": self.certainty, "spread_bytes": self.spread_bytes,
                "headroom_bytes": self.headroom_bytes}

    def to_dict(self) -> dict[str, Any]:
        """The card's row of `check --json` (`gpus`, `best_gpu`)."""
        t = self.target
        return {
            "name": t.name,
            "index": t.index,
            "label": t.label,
            "total_bytes": t.total_bytes,
            "free_bytes": t.free_bytes,
            "empty_bytes": t.empty_bytes,
            "compute_capability": t.compute_capability,
            "compute_dtype": self.compute_dtype,
            "peak_device_bytes": self.estimate.peak_device_bytes,
            "required_device_bytes": self.estimate.required_device_bytes,
            "fits_free": self.fits_free,
            "fits_empty": self.fits_empty,
            "certainty": self.now.certainty,
            "certainty_empty": self.empty.certainty,
            "spread_bytes": self.now.spread_bytes,
            "headroom_bytes": self.headroom_bytes,
        }


def verdict_on(target: Target, estimate: Estimate, compute_dtype: str,
               margin_bytes: int) -> GpuVerdict:
    """`estimate` checked on `target`, now and empty, by verdict.verdict (required free
    memory + margin <= memory; tight inside the allocator's band or the spread)."""
    need, low = estimate.required_device_bytes, estimate.required_low
    return GpuVerdict(target=target, compute_dtype=compute_dtype, estimate=estimate,
                      now=verdict(target.free_bytes, need, margin_bytes, low),
                      empty=verdict(target.empty_bytes, need, margin_bytes, low))


class CheckResult(BaseModel):
    """The plan's verdict on each GPU asked about; `estimate` is for the first."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    estimate: PlanEstimate
    verdicts: tuple[GpuVerdict, ...]

    @property
    def fits(self) -> bool:
        """True when it fits on every GPU asked about."""
        return all(v.fits for v in self.verdicts)

    def __repr__(self) -> str:
        each = ", ".join(
            f"{v.gpu}: {CERTAINTY_WORDS[v.certainty]} ({v.headroom_bytes / GiB:+.2f} GiB)"
            for v in self.verdicts
        )
        need = _gib(self.estimate.required_device_bytes)
        return f"CheckResult({self.estimate.model!r}, needs {need}; {each})"


def make_plan(**options: Any) -> TrainPlan:
    """A TrainPlan from keyword options (None: the default); one PlanError on a bad value."""
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("method") == "full" and "optimizer" not in given:
        # the CLI's rule (commands/options.py DEFAULT_OPTIMIZER): full fine-tuning's usual one
        given["optimizer"] = "adamw_torch_fused"
    try:
        plan = TrainPlan(**given)
    except ValidationError as err:
        first = err.errors()[0]
        where = f"{first['loc'][0]}: " if first["loc"] else ""
        raise PlanError(f"{where}{first['msg'].removeprefix('Value error, ')}") from None
    if plan.tokens_per_step is not None and plan.tokens_per_step > (
            plan.batch_size * plan.seq_len):
        raise PlanError(f"tokens_per_step {plan.tokens_per_step} is more than batch_size x "
                        f"seq_len = {plan.batch_size * plan.seq_len}, the most a step holds")
    return plan


def _resolve(model: str | ModelSpec) -> Resolved:
    """The one door of `--model` (models/resolve.py `resolve`), as the CLI and the page."""
    from vramcalc.models.resolve import resolve

    return resolve(model)


def _with_plan(est: Estimate, found: Resolved, train: TrainPlan) -> PlanEstimate:
    data = est.model_dump(exclude={"total"})
    # the notes the CLI prints on stderr for this model (Resolved.lines), then the estimate's
    data["notes"] = (*found.warnings, *found.spec.notes, *est.notes)
    return PlanEstimate(**data, plan=train)


def plan(
    model: str | ModelSpec,
    *,
    method: Method | None = None,
    quant: Quant | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    targets: str | None = None,
    lora_dropout: float | None = None,
    use_dora: bool | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    double_quant: bool | None = None,
    compute_dtype: ComputeDtype | None = None,
    optimizer: Optimizer | None = None,
    gradient_checkpointing: bool | None = None,
    attn: Attention | None = None,
    weights_dtype: WeightsDtype | None = None,
    loop: Loop | None = None,
    use_cache: bool | None = None,
    expandable_segments: bool | None = None,
    moe_experts: MoeExperts | None = None,
    layout: Layout | None = None,
    tokens_per_step: int | None = None,
    offload_activations: OffloadActivations | None = None,
    loss_kernel: LossKernel | None = None,
    kbit_prep: bool | None = None,
    adapter_dtype: AdapterDtype | None = None,
    calibration: bool = True,
    gpu: str | None = None,
) -> PlanEstimate:
    """Peak memory of one training step of `model` (as `vramcalc plan`).

    Options are TrainPlan's fields (None: its default, the usual QLoRA recipe).
    `calibration=False` gives the raw estimate; `gpu` picks the corrections fitted for
    that GPU family (as `vramcalc check --gpu`). Raises a VramcalcError subclass on a bad
    model or option.
    """
    from vramcalc.corrections.planning import estimator

    found = _resolve(model)
    spec = found.spec
    train = _train_plan(
        spec, method=method, quant=quant, rank=rank, alpha=alpha, targets=targets,
        lora_dropout=lora_dropout, use_dora=use_dora, batch_size=batch_size, seq_len=seq_len,
        double_quant=double_quant, compute_dtype=compute_dtype, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, attn=attn, weights_dtype=weights_dtype,
        loop=loop, use_cache=use_cache, expandable_segments=expandable_segments,
        moe_experts=moe_experts, layout=layout, tokens_per_step=tokens_per_step,
        offload_activations=offload_activations, loss_kernel=loss_kernel,
        kbit_prep=kbit_prep, adapter_dtype=adapter_dtype,
    )
    fn, _ = estimator(gpu, use_calibration=calibration)
    return _with_plan(fn(spec, train), found, train)


def _train_plan(spec: ModelSpec, **options: Any) -> TrainPlan:
    """make_plan, and the LoRA targets checked against the model (one PlanError)."""
    from vramcalc.memory.program.trainable import lora_targets

    train = make_plan(**options)
    lora_targets(spec, train)
    return train


def check(
    model: str | ModelSpec,
    *,
    gpus: Sequence[str],
    margin_gib: float = DEFAULT_MARGIN_GIB,
    calibration: bool = True,
    **options: Any,
) -> CheckResult:
    """Whether the plan fits each named catalog GPU (empty card), as `vramcalc check --gpu`.

    `options` are `plan`'s keyword options. Fits: required memory + margin <= the GPU's
    memory. A GPU without bf16 is planned with fp16 compute, as the CLI does.
    """
    from vramcalc.corrections.planning import Estimators
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.sizing.verdict import catalog_target

    if isinstance(gpus, str):
        gpus = [gpus]
    if not gpus:
        raise PlanError("check needs at least one GPU name (see 'vramcalc gpus')")
    if margin_gib < 0:
        raise PlanError(f"margin_gib must be zero or more, got {margin_gib}")
    margin = int(margin_gib * GiB)
    models = [resolve_gpu(g) for g in gpus]
    found = _resolve(model)
    spec = found.spec
    unknown = set(options) - set(TrainPlan.model_fields)
    if unknown:
        raise PlanError(f"unknown option(s) {', '.join(sorted(unknown))}; the options are "
                        "TrainPlan's fields")
    train = _train_plan(spec, **options)
    estimators = Estimators(calibration)  # memoized: GPUs under the same corrections share
    verdicts = []
    # the cards as `vramcalc check --gpu` checks them (checked_on: fp16 without bf16, one
    # estimate per dtype and corrections), each estimate with its plan and notes
    for c in checked_on(spec, train, [catalog_target(g) for g in models], margin, estimators):
        est = _with_plan(c.estimate, found, c.plan)
        verdicts.append(verdict_on(c.target, est, c.plan.compute_dtype, margin))
    first = verdicts[0].estimate
    assert isinstance(first, PlanEstimate)
    return CheckResult(estimate=first, verdicts=tuple(verdicts))


def train_time(
    model: str | ModelSpec,
    gpu: str,
    *,
    dataset_tokens: int | None = None,
    epochs: float = 1.0,
    prices: dict[str, float] | None = None,
    calibration: bool = True,
    **options: Any,
) -> Any:
    """Seconds per step, tokens per second and, with `dataset_tokens`, the wall time and
    cost of a training plan on a catalog GPU: what `vramcalc plan --gpu GPU
    --dataset-tokens N --epochs E --price GPU=USD` prints (vramcalc.timing.cost.TrainTime;
    `.fields()` is its --json). `prices` maps GPU names to $/GPU-hour over the shipped
    table. `calibration=False` leaves out this machine's host factor (timing/
    host_calibration.py), as `--no-calibration`. Raises PlanError when the GPU has no
    throughput figures.

        >>> from vramcalc.api import train_time
        >>> t = train_time("llama-3.1-8b", "h100-sxm", batch_size=4, dataset_tokens=10**8)
        >>> t.total_seconds / 3600, t.cost_usd
    """
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.timing.cost import price_table
    from vramcalc.timing.cost import train_time as _train_time

    if dataset_tokens is not None and dataset_tokens < 1:
        raise PlanError(f"dataset_tokens must be positive, got {dataset_tokens}")
    if not epochs > 0:
        raise PlanError(f"epochs must be more than 0, got {epochs}")
    card = resolve_gpu(gpu)
    table = price_table(None, [f"{name}={usd}" for name, usd in (prices or {}).items()])
    t = _train_time(_resolve(model).spec, make_plan(**options), card, table, dataset_tokens,
                    epochs, calibration=calibration)
    if t is None:
        raise PlanError(f"no throughput figures for {card.name} (vramcalc/data/gpu_speed.yaml)")
    return t


class ModelSummary(NamedTuple):
    """One catalog model as `vramcalc models` lists it (`to_json`: its row of --json)."""

    name: str
    aliases: list[str]
    model_type: str
    params: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    linear_modules: list[str]
    source: str | None
    num_local_experts: int | None = None  # MoE only
    num_experts_per_tok: int | None = None  # MoE only

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelSummary:
        moe = ({"num_local_experts": spec.num_local_experts,
                "num_experts_per_tok": spec.num_experts_per_tok} if spec.is_moe else {})
        return cls(
            name=spec.name, aliases=list(spec.aliases), model_type=spec.model_type,
            params=spec.num_params(), vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.kv_heads,
            head_dim=spec.head_size, tie_word_embeddings=spec.tie_word_embeddings,
            linear_modules=spec.linear_names(), source=spec.source, **moe)

    def to_json(self) -> dict[str, Any]:
        """The JSON of `models --json` for this model (the MoE keys for an MoE model only)."""
        out = self._asdict()
        if self.num_local_experts is None:
            del out["num_local_experts"], out["num_experts_per_tok"]
        return out


def _natural_key(name: str) -> list[Any]:
    """Sort 'llama-2-7b' before 'llama-2-13b'."""
    import re

    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def models() -> list[ModelSummary]:
    """The built-in models, in natural order ('llama-2-7b' before 'llama-2-13b'), as
    `vramcalc models` lists them."""
    from vramcalc.models.spec import catalog

    return [ModelSummary.of(s) for s in sorted(catalog(), key=lambda s: _natural_key(s.name))]


def gpus() -> tuple[Any, ...]:
    """The GPU catalog (hardware.catalog.GpuModel, in the catalog's order), as `vramcalc
    gpus` lists it; `model_dump(mode="json")` is its row of --json."""
    from vramcalc.hardware.catalog import catalog

    return catalog()


class MaxResult(NamedTuple):
    """The largest batch or sequence (prompt, for inference) that `plan` calls "fits" on
    one card: `plan --max`'s answer (`to_json` is its --json). "fits, tight" does not count
    (verdict.fits_certainly), in every search."""

    model: str
    task: Literal["infer"] | None  # None: a training step
    max: str  # batch, seq-len (training) or prompt-len (inference)
    value: int  # 0: not even 1 fits
    gpu: str
    gpu_memory_bytes: int
    margin_bytes: int
    gpus: int | None = None  # several GPUs (largest_parallel): the value is per GPU
    strategy: str | None = None

    @property
    def fits(self) -> bool:
        return self.value > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.task is not None:
            out["task"] = self.task
        out.update(max=self.max, value=self.value, fits=self.fits, gpu=self.gpu,
                   gpu_memory_bytes=self.gpu_memory_bytes, margin_bytes=self.margin_bytes)
        if self.gpus is not None:
            out.update(gpus=self.gpus, strategy=self.strategy, per_gpu=True)
        return out


def largest(spec: ModelSpec, plan: TrainPlan | InferPlan, what: str, target: Target,
            margin_bytes: int, estimate_fn: Any = None) -> MaxResult:
    """The largest `what` of `plan` that fits `target` (what it offers now) with
    `margin_bytes` to spare: sizing/search.py largest_fitting (a training step, by
    `estimate_fn`: the corrected estimator of `plan`) or largest_fitting_infer."""
    from vramcalc.plans import InferPlan
    from vramcalc.sizing.search import largest_fitting, largest_fitting_infer

    if isinstance(plan, InferPlan):
        best = largest_fitting_infer(spec, plan, what, target.free_bytes, margin_bytes)
    elif estimate_fn is None:
        best = largest_fitting(spec, plan, what, target.free_bytes, margin_bytes)
    else:
        best = largest_fitting(spec, plan, what, target.free_bytes, margin_bytes,
                               estimate_fn=estimate_fn)
    return MaxResult(model=spec.name, task="infer" if isinstance(plan, InferPlan) else None,
                     max=what, value=best, gpu=target.name,
                     gpu_memory_bytes=target.free_bytes, margin_bytes=margin_bytes)


class PlanResult(NamedTuple):
    """`vramcalc plan` for a training step on one card or none: the estimate, the plan it
    was computed for (as it runs on that card), the card's verdict, the time on a catalog
    card, and the corrections used. `to_json` is `plan --json`."""

    estimate: Estimate
    plan: TrainPlan
    verdict: GpuVerdict | None = None  # with a card
    time: Any = None  # timing.cost.TrainTime, with a catalog card that has throughput figures
    time_missing: str | None = None  # the catalog card's name when it has no figures
    calibration: str | None = None  # the corrections' key; None: the raw estimate
    calibration_note: str | None = None  # corrections/planning.py calibration_note

    @property
    def fits(self) -> bool:
        """No card, or fits / fits tight on it (exit 0)."""
        return self.verdict is None or self.verdict.fits

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import estimate_to_dict

        out = estimate_to_dict(self.estimate, self.plan)
        if self.time is not None:
            out.update(self.time.fields())
        out["calibration"] = self.calibration
        if self.verdict is not None:
            out.update(self.verdict.verdict_fields())
        return out


def plan_step(spec: ModelSpec, train: TrainPlan, *, target: Target | None = None,
              margin_bytes: int = 0, calibration: bool = True, time_gpu: str | None = None,
              prices: Any = None, dataset_tokens: int | None = None,
              epochs: float = 1.0) -> PlanResult:
    """A training step of `train` (built and checked at the edge: `make_plan`, or the CLI's
    options) estimated with the corrections of `target`'s GPU family, checked on `target`
    (verdict_on), and timed on the catalog GPU `time_gpu` (timing/cost.py train_time, at
    the $/GPU-hour of `prices`: a PriceTable, the shipped one when None)."""
    from vramcalc.corrections.planning import calibration_note, estimator

    fn, corrections = estimator(None if target is None else target.corrections_gpu,
                                use_calibration=calibration)
    est = fn(spec, train)
    gv = None if target is None else verdict_on(target, est, train.compute_dtype, margin_bytes)
    timed, missing = None, None
    if time_gpu is not None:
        from vramcalc.hardware.catalog import resolve_gpu
        from vramcalc.timing.cost import price_table, train_time

        card = resolve_gpu(time_gpu)
        table = price_table(None, []) if prices is None else prices
        timed = train_time(spec, train, card, table, dataset_tokens, epochs,
                           calibration=calibration)
        missing = card.name if timed is None else None
    return PlanResult(estimate=est, plan=train, verdict=gv, time=timed, time_missing=missing,
                      calibration=None if corrections is None else corrections.key,
                      calibration_note=calibration_note(corrections))


class Checked(NamedTuple):
    """One card's verdict (GpuVerdict) with what the searches and suggestions on that card
    need: the plan as it runs there and its estimate function (that GPU family's
    corrections)."""

    verdict: GpuVerdict
    plan: TrainPlan
    estimate_fn: Any  # corrections.planning.EstimateFn

    @property
    def target(self) -> Target:
        return self.verdict.target

    @property
    def estimate(self) -> Estimate:
        return self.verdict.estimate

    @property
    def now(self) -> Verdict:
        return self.verdict.now

    @property
    def empty(self) -> Verdict:
        return self.verdict.empty

    @property
    def fits_free(self) -> bool:
        return self.verdict.fits_free

    @property
    def fits_empty(self) -> bool:
        return self.verdict.fits_empty

    @property
    def headroom_bytes(self) -> int:
        return self.verdict.headroom_bytes

    def to_dict(self) -> dict[str, Any]:
        return self.verdict.to_dict()


def _say_nothing(line: str) -> None:
    """The default `say` of check_step: the notes are in the result's fields."""


def checked_on(spec: ModelSpec, train: TrainPlan, targets: Sequence[Target],
               margin_bytes: int, estimators: Any, say: Any = _say_nothing) -> list[Checked]:
    """`train` on each target: estimated once per compute dtype and corrections (a card
    without bf16 plans fp16, said through `say`), and checked (verdict_on)."""
    from vramcalc.sizing.advice import for_gpu

    cache: dict[tuple[int, str], Estimate] = {}
    out = []
    for t in targets:
        p = for_gpu(train, t.bf16_supported)
        if p is not train:
            say(f"note: {t.where}, compute capability {t.compute_capability}, has no "
                "bf16; planning with --compute-dtype fp16 for it")
        fn = estimators(t.corrections_gpu)
        key = (id(fn), p.compute_dtype)
        if key not in cache:
            cache[key] = fn(spec, p)
        out.append(Checked(verdict_on(t, cache[key], p.compute_dtype, margin_bytes), p, fn))
    return out


def estimators_saying(calibration: bool, say: Any = _say_nothing) -> Any:
    """corrections.planning.Estimators, each corrections note said once through `say`."""
    from vramcalc.corrections.planning import Estimators, calibration_note

    def said(selection: Any) -> None:
        note = calibration_note(selection)
        if note:
            say(note)

    return Estimators(calibration, on_new=said)


def catalog_gpu_of(target: Target) -> Any:
    """The catalog entry of a target (a --gpu name or a detected card NVML names), or None
    (a --gpu-memory card, an unknown detected card)."""
    from vramcalc.errors import UnknownGpuError
    from vramcalc.hardware.catalog import match_detected, resolve_gpu

    if target.index is None:
        try:
            return resolve_gpu(target.name)
        except UnknownGpuError:
            return None
    return match_detected(target.name, target.total_bytes)


class CheckReport(NamedTuple):
    """`vramcalc check` of a training step on one or more cards: each card's verdict, the
    card that decides (`best`: the most memory, first of equals), the changes that make it
    fit (or give more room when tight), the smallest catalog GPU when no change does, the
    time on each catalog card, the cards that fit ranked by cost, the multi-GPU options,
    and the corrections used. `to_json` is `check --json`."""

    verdicts: tuple[Checked, ...]
    best: Checked
    margin_bytes: int
    suggestions: tuple[Any, ...]  # sizing.advice.Suggestion
    larger: Any  # sizing.advice.GpuAnswer | None
    times: dict[int, Any]  # index in verdicts -> timing.cost.TrainTime
    ranking: list[dict[str, Any]]
    several: list[dict[str, Any]]
    calibration: str | None

    @property
    def fits(self) -> bool:
        return self.best.fits_free

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import estimate_to_dict

        best, larger = self.best, self.larger
        return {
            "fits": best.fits_free,
            "certainty": best.now.certainty,
            "spread_bytes": best.now.spread_bytes,
            "margin_bytes": self.margin_bytes,
            "best_gpu": best.to_dict(),
            "gpus": [{**v.to_dict(), **(self.times[k].fields() if k in self.times else {})}
                     for k, v in enumerate(self.verdicts)],
            "ranking": self.ranking,
            "estimate": estimate_to_dict(best.estimate, best.plan),
            "suggestions": [s.model_dump(mode="json") for s in self.suggestions],
            "larger_gpu": None if larger is None else larger.gpu.name,
            "larger_gpu_change": (None if larger is None or larger.suggestion is None
                                  else larger.suggestion.model_dump(mode="json")),
            "several_gpus": self.several,
            "calibration": self.calibration,
        }


def check_step(spec: ModelSpec, train: TrainPlan, targets: Sequence[Target],
               margin_bytes: int, *, calibration: bool = True, say: Any = _say_nothing,
               prices: Any = None, dataset_tokens: int | None = None,
               epochs: float = 1.0, padding_free: tuple[int, int] | None = None
               ) -> CheckReport:
    """A training step of `train` (built at the edge) checked on each of `targets`, by the
    rule of plan and every search; `say` hears the notes as they arise (a card planned in
    fp16, each corrections decision), in the order the CLI prints them. `padding_free`:
    the padding-free worst step of the user's lengths (sizing.advice.padding_free_step),
    for the padding-free offer."""
    from vramcalc.sizing import advice
    from vramcalc.timing.cost import price_table, rank_by_cost, train_time

    estimators = estimators_saying(calibration, say)
    verdicts = checked_on(spec, train, targets, margin_bytes, estimators, say)
    best = max(verdicts, key=lambda v: v.target.free_bytes)  # first of equals
    suggestions: list[Any] = []
    larger = None
    if not best.fits_free or best.now.certainty == "tight":
        room = best.target.free_bytes
        if best.fits_free:  # tight: only the allocator switch, for more room
            allocator = advice.allocator_suggestion(spec, best.plan, room, margin_bytes,
                                                    best.estimate_fn)
            suggestions = [] if allocator is None else [allocator]
        else:
            suggestions = advice.suggest(spec, best.plan, room, margin_bytes, best.estimate_fn,
                                         padding_free)
        if not suggestions and not best.fits_free:
            from vramcalc.hardware.catalog import catalog

            larger = advice.smallest_fitting_gpu(
                spec, train, margin_bytes, catalog(), lambda g: estimators(g.name)
            )
    table = price_table(None, []) if prices is None else prices
    times: dict[int, Any] = {}
    for k, v in enumerate(verdicts):
        model = catalog_gpu_of(v.target)
        t = None if model is None else train_time(spec, v.plan, model, table, dataset_tokens,
                                                  epochs, calibration=calibration)
        if t is not None:
            times[k] = t
    # the cards that fit, cheapest to finish first (then fastest)
    fitting = {id(times[k]): verdicts[k] for k in times if verdicts[k].fits_free}
    ranked = rank_by_cost([times[k] for k in times if verdicts[k].fits_free])
    ranking = [{"name": fitting[id(t)].target.name, "label": fitting[id(t)].target.label,
                **t.fields()} for t in ranked]
    several: list[dict[str, Any]] = []
    if not best.fits_free:
        from vramcalc.memory.multi_gpu import smallest_fitting_parallel

        options = smallest_fitting_parallel(spec, best.plan, best.target.empty_bytes,
                                            margin_bytes, 8, single=estimators.raw())
        several = _timed_options(spec, best.plan, options, catalog_gpu_of(best.target),
                                 table, dataset_tokens, epochs, calibration)
    return CheckReport(verdicts=tuple(verdicts), best=best, margin_bytes=margin_bytes,
                       suggestions=tuple(suggestions), larger=larger, times=times,
                       ranking=ranking, several=several,
                       calibration=next((s.key for s in estimators.applied()), None))


def _timed_options(spec: ModelSpec, plan: TrainPlan, options: Sequence[Any], card: Any,
                   prices: Any, dataset_tokens: int | None, epochs: float,
                   calibration: bool) -> list[dict[str, Any]]:
    """check's several-GPU options (multi_gpu.ParallelOption) as JSON, each with its time
    on `card` (the catalog card checked; None: untimed) under "time" (None where the time
    of that option is not modelled: timing/parallel_time.py not_timed). With
    `dataset_tokens` (the wall time asked for): the cheapest to finish first (timing/cost.py
    rank_by_cost), then the untimed; else in their order, fewest GPUs first."""
    from vramcalc.memory.multi_gpu import ParallelPlan
    from vramcalc.timing.cost import rank_by_cost, train_time_parallel

    out = [o.model_dump(mode="json") for o in options]
    timed: dict[int, Any] = {}
    for k, o in enumerate(options):
        out[k]["time"] = None
        if card is None:
            continue
        par = ParallelPlan(gpus=o.gpus, strategy=o.strategy, offload=o.offload)
        t = train_time_parallel(spec, plan, par, card, prices, dataset_tokens, epochs,
                                calibration=calibration)
        if not isinstance(t, str):
            out[k]["time"] = t.fields()
            timed[id(t)] = (k, t)
    if dataset_tokens is None:
        return out
    order = [timed[id(t)][0] for t in rank_by_cost([t for _, t in timed.values()])]
    order += [k for k in range(len(out)) if k not in order]
    return [out[k] for k in order]


class CompareResult(NamedTuple):
    """`vramcalc compare`: one model under every fine-tuning method (sizing/comparison.py
    rows), each timed on its smallest GPU. `to_json` is `compare --json`."""

    model: str
    params: int
    rows: list[Any]  # sizing.comparison rows
    times: list[Any]  # timing.cost.TrainTime | None per row
    margin_bytes: int
    calibration_notes: list[str]  # each corrections decision met, in first-use order

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import comparison_to_dict

        out = comparison_to_dict(self.model, self.rows, self.margin_bytes)
        for entry, t in zip(out["methods"], self.times, strict=True):
            entry["time"] = None if t is None else t.fields()
        return out


def compare(spec: ModelSpec, base: TrainPlan, margin_bytes: int, *,
            optimizer: Optimizer | None = None, calibration: bool = True, prices: Any = None,
            dataset_tokens: int | None = None, epochs: float = 1.0,
            switches: bool = False) -> CompareResult:
    """Every method of `base` (built at the edge) side by side (sizing/comparison.py
    compare): each row's estimate and the smallest catalog GPU it fits, and its time there.
    `optimizer` None: each method's usual one. `switches`: each row also under every loss
    kernel, activation offloading mode and batch layout."""
    from vramcalc.corrections.planning import Estimators
    from vramcalc.hardware.catalog import catalog, resolve_gpu
    from vramcalc.sizing.comparison import compare as compare_methods
    from vramcalc.timing.cost import price_table, train_time

    estimators = Estimators(use_calibration=calibration)
    rows = compare_methods(spec, base, margin_bytes, catalog(), optimizer=optimizer,
                           estimate_for=lambda gpu: estimators(gpu.name),
                           estimate_fn=estimators(None), switches=switches)
    table = price_table(None, []) if prices is None else prices
    times: list[Any] = []
    for r in rows:  # each row on its smallest GPU (none: no GPU fits)
        if r.estimate is None or r.smallest_gpu is None:
            times.append(None)
            continue
        plan = r.plan.model_copy(update={"compute_dtype": r.smallest_gpu.compute_dtype})
        times.append(train_time(spec, plan, resolve_gpu(r.smallest_gpu.gpu), table,
                                dataset_tokens, epochs, calibration=calibration))
    return CompareResult(model=spec.name, params=spec.num_params(), rows=list(rows),
                         times=times, margin_bytes=margin_bytes,
                         calibration_notes=[s.note for s in estimators.applied()])


class FitResult(NamedTuple):
    """`vramcalc fit`: every catalog model x method on one GPU (sizing/comparison.py
    fit_rows), each pair that fits timed at min(batch, its largest batch). `to_json` is
    `fit --json`."""

    gpu: str
    gpu_memory_bytes: int
    margin_bytes: int
    plan: TrainPlan
    rows: list[Any]  # sizing.comparison.FitRow
    times: list[Any]  # timing.cost.TrainTime | None per row
    calibration_note: str | None

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import fit_to_dict

        out = fit_to_dict(self.gpu, self.gpu_memory_bytes, self.rows, self.margin_bytes,
                          self.plan)
        for entry, t in zip(out["rows"], self.times, strict=True):
            entry["time"] = None if t is None else t.fields()
        return out


def fit(gpu: str, base: TrainPlan, margin_bytes: int, *, optimizer: Optimizer | None = None,
        calibration: bool = True, prices: Any = None, dataset_tokens: int | None = None,
        epochs: float = 1.0) -> FitResult:
    """Every catalog model and method of `base` (built at the edge) on an empty card of the
    catalog GPU `gpu`: whether it fits, its largest batch and longest sequence (the rule of
    plan --max), and its time. `optimizer` None: each method's usual one."""
    from vramcalc.corrections.planning import calibration_note, estimator
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.models.spec import catalog, get_spec
    from vramcalc.sizing.advice import for_gpu
    from vramcalc.sizing.comparison import fit_rows, method_plan
    from vramcalc.timing.cost import price_table, train_time

    card = resolve_gpu(gpu)
    estimate_fn, corrections = estimator(card.name, use_calibration=calibration)
    rows = fit_rows(catalog(), base, card, margin_bytes, optimizer=optimizer,
                    estimate_fn=estimate_fn)
    table = price_table(None, []) if prices is None else prices
    times: list[Any] = []
    for r in rows:  # each fitting row at min(--batch, its largest batch)
        if not r.fits or r.max_batch < 1:
            times.append(None)
            continue
        plan = for_gpu(method_plan(base, r.method, optimizer), card.bf16_supported)
        plan = plan.model_copy(update={"batch_size": min(base.batch_size, r.max_batch)})
        times.append(train_time(get_spec(r.model), plan, card, table, dataset_tokens, epochs,
                                calibration=calibration))
    return FitResult(gpu=card.name, gpu_memory_bytes=card.usable_bytes,
                     margin_bytes=margin_bytes, plan=base, rows=list(rows), times=times,
                     calibration_note=calibration_note(corrections))


# sweep's --over name -> TrainPlan field
SWEEPABLE = {"seq-len": "seq_len", "batch": "batch_size", "rank": "rank"}


class Capacity(NamedTuple):
    """One card's line in a sweep."""

    name: str
    memory_bytes: int  # what an empty card offers (verdict.Target.free_bytes), as plan --gpu
    margin_bytes: int
    fits_up_to: int | None  # the largest swept value `plan --gpu` calls "fits"; None: none
    certainty: list[str]  # plan --gpu's verdict at each swept value (fits, tight, ...)


class SweepResult(NamedTuple):
    """`vramcalc sweep`: the plan's estimate at each swept value, and each card's verdicts
    along it. `to_json` is `sweep --json`; `series` its points (and --csv's rows)."""

    model: str
    over: str  # seq-len | batch | rank
    values: list[int]
    plan: TrainPlan
    points: list[Estimate]
    gpus: list[Capacity]

    def series(self) -> list[dict[str, Any]]:
        return [
            {self.over: v, "required_device_bytes": e.required_device_bytes,
             "peak_device_bytes": e.peak_device_bytes, "peak_allocated_bytes":
             e.peak_allocated_bytes, "peak_phase": e.peak_phase, **dict(e.components.items())}
            for v, e in zip(self.values, self.points, strict=True)
        ]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "over": self.over,
                "plan": self.plan.model_dump(mode="json"),
                "gpus": [c._asdict() for c in self.gpus], "points": self.series()}


def sweep(spec: ModelSpec, train: TrainPlan, over: str, values: Sequence[int],
          targets: Sequence[Target], margin_bytes: int, *, calibration: bool = True,
          say: Any = _say_nothing) -> SweepResult:
    """`train` (built at the edge) estimated at each of `values` of `over` (seq-len, batch
    or rank) under the first card's corrections, and each card's verdict at every value as
    `plan --gpu` gives it: the plan as it runs there (fp16 without bf16) under that card's
    corrections; the series' own estimates where those are the same. `say` hears each
    corrections note once."""
    from vramcalc.sizing.advice import for_gpu
    from vramcalc.sizing.verdict import verdict

    estimators = estimators_saying(calibration, say)
    field = SWEEPABLE[over]
    series_fn = estimators(targets[0].corrections_gpu if targets else None)
    points = [series_fn(spec, train.model_copy(update={field: v})) for v in values]
    caps = []
    for t in targets:
        p = for_gpu(train, t.bf16_supported)
        fn = estimators(t.corrections_gpu)
        ests = points if (fn is series_fn and p == train) else [
            fn(spec, p.model_copy(update={field: v})) for v in values]
        words: list[str] = [
            verdict(t.free_bytes, e.required_device_bytes, margin_bytes,
                    e.required_low).certainty
            for e in ests]
        fitting = [v for v, c in zip(values, words, strict=True) if c == "fits"]
        caps.append(Capacity(t.name, t.free_bytes, margin_bytes,
                             max(fitting) if fitting else None, words))
    return SweepResult(model=spec.name, over=over, values=list(values), plan=train,
                       points=points, gpus=caps)


def _task_estimate(spec: ModelSpec, plan: InferPlan | MergePlan) -> Estimate:
    from vramcalc.memory.inference import estimate_inference, estimate_merge

    if isinstance(plan, InferPlan):
        return estimate_inference(spec, plan)
    return estimate_merge(spec, plan)


def _task_dtype(plan: InferPlan | MergePlan) -> str:
    """The dtype the plan computes in (a merge: its base's)."""
    return plan.compute_dtype if isinstance(plan, InferPlan) else plan.dtype


def _merge_extras(spec: ModelSpec, plan: InferPlan | MergePlan) -> dict[str, Any]:
    """A merge's checkpoint on disk and host peak (memory/inference.py merge_sizes)."""
    from vramcalc.memory.inference import merge_sizes

    if not isinstance(plan, MergePlan):
        return {}
    sizes = merge_sizes(spec, plan)
    return {"disk_bytes": sizes.disk_bytes, "host_peak_bytes": sizes.host_peak_bytes,
            "device": plan.on}


def _infer_times(spec: ModelSpec, plan: InferPlan | MergePlan, names: Sequence[str]
                 ) -> dict[str, Any]:
    """catalog name -> generate() speed (timing/cost.py infer_time_on) of an inference
    plan; a name outside the catalog, or a card without figures, is left out."""
    from vramcalc.errors import UnknownGpuError
    from vramcalc.hardware.catalog import resolve_gpu
    from vramcalc.timing.cost import infer_time_on

    if not isinstance(plan, InferPlan):
        return {}
    out: dict[str, Any] = {}
    for name in names:
        try:
            gpu = resolve_gpu(name)
        except UnknownGpuError:
            continue
        t = infer_time_on(spec, plan, gpu)
        if t is not None:
            out[name] = t
    return out


class TaskResult(NamedTuple):
    """`vramcalc plan --task infer|merge`: the estimate, the merge's disk and host sizes,
    generate()'s speed on a catalog card, the card's verdict. `to_json` is its --json."""

    estimate: Estimate
    plan: InferPlan | MergePlan
    extras: dict[str, Any]  # a merge's sizes (_merge_extras)
    speed: Any = None  # timing.cost InferTime
    verdict: GpuVerdict | None = None

    @property
    def fits(self) -> bool:
        return self.verdict is None or self.verdict.fits

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import task_estimate_to_dict

        out = task_estimate_to_dict(self.estimate, self.plan.model_dump(mode="json"))
        out.update(self.extras)
        if self.speed is not None:
            out.update(self.speed._asdict())
        if self.verdict is not None:  # as `plan --gpu` for a training step
            out.update(self.verdict.verdict_fields())
        return out


def task_step(spec: ModelSpec, plan: InferPlan | MergePlan, *, target: Target | None = None,
              margin_bytes: int = 0, time_gpu: str | None = None) -> TaskResult:
    """An inference or merge plan (built at the edge) estimated (memory/inference.py),
    checked on `target` by the rule of a training step (verdict_on), and, for inference,
    timed on the catalog GPU `time_gpu`."""
    est = _task_estimate(spec, plan)
    times = _infer_times(spec, plan, [time_gpu] if time_gpu is not None else [])
    v = None if target is None else verdict_on(target, est, _task_dtype(plan), margin_bytes)
    return TaskResult(estimate=est, plan=plan, extras=_merge_extras(spec, plan),
                      speed=next(iter(times.values()), None), verdict=v)


class TaskCheckReport(NamedTuple):
    """`vramcalc check --task infer|merge`: the estimate against each card, the card that
    decides (the most memory, first of equals), generate()'s speed on each catalog card.
    `to_json` is its --json."""

    estimate: Estimate
    plan: InferPlan | MergePlan
    extras: dict[str, Any]
    verdicts: tuple[GpuVerdict, ...]
    best: GpuVerdict
    times: dict[str, Any]  # card name -> InferTime
    margin_bytes: int

    @property
    def fits(self) -> bool:
        return self.best.fits_free

    def to_json(self) -> dict[str, Any]:
        from vramcalc.render import task_estimate_to_dict

        best = self.best
        estimate = task_estimate_to_dict(self.estimate, self.plan.model_dump(mode="json"))
        estimate.update(self.extras)
        return {"fits": best.fits_free, "certainty": best.certainty,
                "spread_bytes": best.spread_bytes, "margin_bytes": self.margin_bytes,
                "best_gpu": best.to_dict(),
                "gpus": [{**v.to_dict(), **(self.times[v.target.name]._asdict()
                                            if v.target.name in self.times else {})}
                         for v in self.verdicts],
                "estimate": estimate}


def check_task(spec: ModelSpec, plan: InferPlan | MergePlan, targets: Sequence[Target],
               margin_bytes: int) -> TaskCheckReport:
    """An inference or merge plan against each card, by check's rule and verdict type
    (verdict_on: required + margin <= free memory, tight inside the band or the spread;
    empty: the usable total)."""
    est = _task_estimate(spec, plan)
    verdicts = [verdict_on(t, est, _task_dtype(plan), margin_bytes) for t in targets]
    times = _infer_times(spec, plan, [v.target.name for v in verdicts])
    best = max(verdicts, key=lambda v: v.target.free_bytes)  # first of equals, as check's
    return TaskCheckReport(estimate=est, plan=plan, extras=_merge_extras(spec, plan),
                           verdicts=tuple(verdicts), best=best, times=times,
                           margin_bytes=margin_bytes)


def parallel_fields(pe: Any, plan: TrainPlan) -> dict[str, Any]:
    """A multi-GPU estimate (memory/multi_gpu.py ParallelEstimate) as JSON: the busiest
    GPU's totals under the one-GPU keys, then per_gpu and host RAM."""
    from vramcalc.render import estimate_to_dict

    out = estimate_to_dict(pe.busiest, plan)
    out["parallel"] = pe.parallel.model_dump(mode="json")
    out["busiest_gpu"] = pe.busiest_gpu
    out["per_gpu"] = [
        {"gpu": i, **{k: v for k, v in estimate_to_dict(e, plan).items() if k != "plan"}}
        for i, e in enumerate(pe.per_gpu)
    ]
    out["placement"] = pe.placement
    out["comm_detail"] = pe.comm_detail
    out["layers_per_gpu"] = pe.layers_per_gpu
    out["host_offload_bytes"] = pe.host_offload_bytes
    out["host_loading_bytes"] = pe.host_loading_bytes
    out["single_gpu_required_device_bytes"] = pe.single_gpu.required_device_bytes
    out["notes"] = list(pe.notes)
    # fsdp / zero: the busiest GPU's peak term by term (multi_gpu.PeakTerm)
    out["peak_terms"] = [t.model_dump(mode="json") for t in pe.peak_terms]
    return out


class ParallelResult(NamedTuple):
    """A training step split over several GPUs (`plan --gpus N`, `check --gpus N`): the
    estimate of each GPU, and the busiest one's verdict on a card offering
    `memory_bytes` each (None: no card). `plan_json` / `check_json` are their --json."""

    estimate: Any  # memory.multi_gpu.ParallelEstimate
    plan: TrainPlan
    memory_bytes: int | None
    margin_bytes: int
    verdict: Verdict | None
    time: Any = None  # timing.cost.TrainTime on several GPUs of the named catalog card
    time_missing: str | None = None  # why there is no time for the named card

    @property
    def fits(self) -> bool | None:
        return None if self.verdict is None else self.verdict.fits

    def plan_json(self, gpu: str | None) -> dict[str, Any]:
        out = parallel_fields(self.estimate, self.plan)
        if self.time is not None:
            out.update(self.time.fields())
        v = self.verdict
        if v is not None and gpu is not None:
            out.update(gpu=gpu, gpu_memory_bytes=self.memory_bytes,
                       margin_bytes=self.margin_bytes, fits=v.fits, certainty=v.certainty,
                       spread_bytes=v.spread_bytes, headroom_bytes=v.headroom_bytes)
        return out

    def check_json(self, where: str) -> dict[str, Any]:
        out = parallel_fields(self.estimate, self.plan)
        if self.time is not None:
            out.update(self.time.fields())
        v, memory = self.verdict, self.memory_bytes
        assert v is not None and memory is not None
        out.update(fits=v.fits, certainty=v.certainty, spread_bytes=v.spread_bytes,
                   gpu_memory_bytes=memory, margin_bytes=self.margin_bytes,
                   headroom_bytes=v.headroom_bytes,
                   budget_bytes_per_gpu=memory - self.margin_bytes, gpus_checked=where)
        return out


def parallel_step(spec: ModelSpec, plan: TrainPlan, parallel: Any,
                  memory_bytes: int | None = None, margin_bytes: int = 0, *,
                  time_gpu: str | None = None, prices: Any = None,
                  dataset_tokens: int | None = None, epochs: float = 1.0,
                  calibration: bool = True) -> ParallelResult:
    """`plan` (built at the edge) over the GPUs of `parallel` (plans.ParallelPlan;
    memory/multi_gpu.py estimate_parallel), the busiest GPU checked on a card offering
    `memory_bytes` by the rule of the one-GPU plan, and timed on `parallel.gpus` of the
    catalog GPU `time_gpu` (timing/cost.py train_time_parallel; `prices` a PriceTable, the
    shipped one when None). Raw estimate: the fitted corrections were measured on one GPU
    and are not applied."""
    from vramcalc.memory.multi_gpu import estimate_parallel

    pe = estimate_parallel(spec, plan, parallel)
    v = (None if memory_bytes is None else
         verdict(memory_bytes, pe.busiest.required_device_bytes, margin_bytes,
                 pe.busiest.required_low))
    timed, missing = None, None
    if time_gpu is not None:
        from vramcalc.hardware.catalog import resolve_gpu
        from vramcalc.timing.cost import price_table, train_time_parallel

        table = price_table(None, []) if prices is None else prices
        found = train_time_parallel(spec, plan, parallel, resolve_gpu(time_gpu), table,
                                    dataset_tokens, epochs, calibration=calibration)
        if isinstance(found, str):
            missing = found
        else:
            timed = found
    return ParallelResult(estimate=pe, plan=plan, memory_bytes=memory_bytes,
                          margin_bytes=margin_bytes, verdict=v, time=timed,
                          time_missing=missing)


def largest_parallel(spec: ModelSpec, plan: TrainPlan, parallel: Any, what: str,
                     target: Target, margin_bytes: int) -> MaxResult:
    """The largest `what` per GPU whose busiest GPU fits `target` (each card), by the rule
    of every search (sizing/search.py largest_fitting on estimate_parallel's busiest)."""
    from vramcalc.memory.multi_gpu import estimate_parallel
    from vramcalc.sizing.search import largest_fitting, quick_estimate

    best = largest_fitting(
        spec, plan, what, target.free_bytes, margin_bytes,
        estimate_fn=lambda s, p: estimate_parallel(s, p, parallel).busiest,
        guess_fn=lambda s, p: estimate_parallel(s, p, parallel, quick_estimate).busiest)
    return MaxResult(model=spec.name, task=None, max=what, value=best, gpu=target.name,
                     gpu_memory_bytes=target.free_bytes, margin_bytes=margin_bytes,
                     gpus=parallel.gpus, strategy=parallel.strategy)


class CalibrationReport(NamedTuple):
    """The measured points under `folder` replayed (corrections/report.py replay_points):
    per point the raw estimate, the estimate corrected with factors fitted without its
    model (leave-one-architecture-out) and the measured peaks; the summary; the
    corrections a fit makes. `to_json` is `calibrate report --json`."""

    folder: Path
    points: list[dict[str, Any]]
    summary: dict[str, Any]
    corrections: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"points": self.points, "summary": self.summary,
                "corrections": self.corrections}


def calibration_report(data: Path | None = None, *, refuse_unreadable: bool = False,
                       say: Any = _say_nothing) -> CalibrationReport:
    """The points under `data` (default: the user data folder: corrections.factors
    user_data_dir) replayed. What was left out is said through `say`; with
    `refuse_unreadable` (a fit) more damaged lines than readable ones is a
    CalibrationError. No GPU, no torch."""
    from vramcalc.corrections.factors import user_data_dir
    from vramcalc.corrections.points import SkipLog
    from vramcalc.corrections.report import listable, replay_points

    folder = data if data is not None else user_data_dir()
    if not listable(folder) and data is not None:  # the default folder may not exist yet
        raise CalibrationError(f"{folder}: no such folder; give --data the folder of measured "
                               "points (raw/*.jsonl, runs/*.json), e.g. the repo's calibration/")
    log = SkipLog()
    warnings: list[str] = []
    result = replay_points(folder, log, warnings)
    for line in warnings:
        say(line)
    skipped = log.summary()
    if skipped is not None:
        if refuse_unreadable and log.unreadable() > log.read:
            raise CalibrationError(f"most of the measurements under {folder} cannot be used, "
                                   f"nothing fitted: {skipped}; fix or remove those lines")
        say(f"warning: {skipped}")
    result["summary"]["skipped"] = log.by_reason
    return CalibrationReport(folder=folder, points=result["points"], summary=result["summary"],
                             corrections=result["corrections"])


class CorrectionsFit(NamedTuple):
    """`calibrate fit`'s answer: the corrections file written (`path`), the entries fitted
    (corrections.factors.Corrections) and the report they were fitted on. `to_json` is
    `calibrate fit --json`."""

    path: Path
    entries: list[Any]
    report: CalibrationReport

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "corrections": self.report.corrections,
                "summary": self.report.summary}


def fit_corrections(data: Path | None = None, out: Path | None = None, *,
                    say: Any = _say_nothing) -> CorrectionsFit:
    """Corrections fitted on every point under `data` and written atomically to `out`
    (default: the user's corrections.json); the file's entries for other GPU families and
    stacks are kept. A path that cannot be written, or a file that is not a corrections
    file, is refused before the replay."""
    from vramcalc.corrections.factors import Corrections, read_entries, save, user_corrections_path
    from vramcalc.user_files import check_writable

    target = out if out is not None else user_corrections_path()
    what = "--out" if out is not None else "corrections file"
    check_writable(target, what)  # before the replay: a path that cannot be written fails now
    old = read_entries(target, what)  # a file that is not a corrections file is not replaced
    report = calibration_report(data, refuse_unreadable=True, say=say)
    entries = [Corrections.model_validate(e) for e in report.corrections]
    if not entries:
        raise CalibrationError(f"no measured points under {report.folder} "
                               "(raw/*.jsonl, runs/*.json)")
    new_keys = {e.key for e in entries}
    kept = [e for e in old if e.key not in new_keys]
    save(target, kept + entries, what)
    return CorrectionsFit(path=target, entries=entries, report=report)
