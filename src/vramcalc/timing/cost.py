"""Time and money for a plan on a catalog GPU: seconds per step, tokens per second, the
wall time of a dataset and its cost at a $/GPU-hour price.

The step time is `step_time` (FLOPs and bytes on the GPU's peaks, `gpu_speed`); prices are
`vramcalc/data/prices.yaml` (dated, each with its source), overridden by a user's file
(`--prices FILE`, same schema) and then by `--price GPU=USD`. Nothing is fetched. Tokens
per step are batch x sequence length: packed sequences, as the published throughputs
count them; padded batches train fewer real tokens per step.
"""

from __future__ import annotations

import datetime
import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

from vramcalc.errors import PlanError, SpecError, UnknownGpuError
from vramcalc.hardware.catalog import GpuModel, resolve_gpu
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.timing.step_time import StepTime, TimeBasis, step_time, train_work

PRICES_ORIGIN = "vramcalc/data/prices.yaml"
HOUR = 3600.0


class PriceEntry(NamedTuple):
    usd_per_hour: float
    source: str
    provider: str = ""  # who charges it
    date: datetime.date | None = None


class PriceTable(NamedTuple):
    prices: dict[str, PriceEntry]


_PRICE_KEYS = {"usd_per_hour", "source", "provider", "date"}


def _price_entry(where: str, entry: Any) -> PriceEntry:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = set(entry) - _PRICE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    usd = entry.get("usd_per_hour")
    if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 < usd < math.inf:
        raise ValueError(f"{where}: usd_per_hour must be a positive number, got {usd!r}")
    source = entry.get("source")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: source must be a non-empty string (where the price is from)")
    date = entry.get("date")
    if isinstance(date, str):
        try:
            date = datetime.date.fromisoformat(date)
        except ValueError:
            raise ValueError(f"{where}: date must be YYYY-MM-DD, got {date!r}") from None
    if date is not None and not isinstance(date, datetime.date):
        raise ValueError(f"{where}: date must be YYYY-MM-DD, got {date!r}")
    return PriceEntry(float(usd), source, str(entry.get("provider") or ""), date)


def _prices_yaml(text: str, origin: str) -> Any:
    import yaml

    from vramcalc.models.catalog_index import load_yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError:
        raise SpecError(f"{origin}: malformed YAML/JSON") from None


def parse_price_table(text: str, origin: str) -> PriceTable:
    """A price table from YAML or JSON text: `prices: {GPU: {usd_per_hour, source,
    provider?, date?}}`; keys may be any catalog name or alias (resolved to the name)."""
    return _price_table_from(_prices_yaml(text, origin), origin)


def _price_table_from(data: Any, origin: str) -> PriceTable:
    if not isinstance(data, dict) or set(data) != {"prices"} or not isinstance(
            data["prices"], dict):
        raise SpecError(f"{origin}: expected one top-level key 'prices' holding a mapping "
                        "'GPU: {usd_per_hour: N, source: ...}'")
    named: dict[str, PriceEntry] = {}
    for key, entry in data["prices"].items():
        try:
            named[resolve_gpu(str(key)).name] = _price_entry(f"gpu {key!r}", entry)
        except (ValueError, UnknownGpuError) as err:
            raise SpecError(f"{origin}: {err}") from None
    return PriceTable(named)


@functools.cache
def shipped_prices() -> PriceTable:
    from vramcalc.data import shipped_yaml

    data = shipped_yaml("prices.yaml", lambda text: _prices_yaml(text, PRICES_ORIGIN))
    return _price_table_from(data, PRICES_ORIGIN)


def load_price_file(path: Path) -> PriceTable:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PlanError(f"--prices {path}: {err.strerror or err}") from None
    return parse_price_table(text, str(path))


def parse_price_options(values: list[str]) -> dict[str, PriceEntry]:
    """`--price GPU=USD` values -> catalog name -> entry (source "--price")."""
    out: dict[str, PriceEntry] = {}
    for value in values:
        name, sep, usd = value.partition("=")
        try:
            amount = float(usd)
        except ValueError:
            amount = math.nan
        if not sep or not name.strip() or not math.isfinite(amount) or amount <= 0:
            raise PlanError(f"--price {value!r}: expected GPU=USD with a positive price per "
                            "GPU-hour, e.g. --price h100-sxm=2.49")
        out[resolve_gpu(name.strip()).name] = PriceEntry(amount, "--price", "--price")
    return out


def price_table(file: Path | None = None, options: list[str] | None = None) -> PriceTable:
    """The shipped prices, overridden by `file` then by `--price` options."""
    prices = dict(shipped_prices().prices)
    if file is not None:
        prices.update(load_price_file(file).prices)
    prices.update(parse_price_options(options or []))
    return PriceTable(prices=prices)


class TrainTime(NamedTuple):
    """A training plan's time (and cost) on one GPU."""

    gpu: str
    time_basis: TimeBasis
    step_seconds: float
    tokens_per_step: int
    tokens_per_second: float
    steps: int | None = None  # with dataset tokens: optimizer steps to finish
    total_seconds: float | None = None
    usd_per_hour: float | None = None
    price_source: str | None = None
    price_date: str | None = None
    cost_usd: float | None = None
    # a user's calibration (timing/host_calibration.py): the host factor fitted on this
    # machine's timed steps of the GPU, and where it comes from; None: the shipped constants
    host_factor: float | None = None
    time_calibration: str | None = None
    # several GPUs (train_time_parallel): their count (the cost is theirs together), the
    # link between them, the collectives' time back to back and what the compute does not
    # hide of it; None on one GPU
    gpus: int | None = None
    link: str | None = None
    communication_seconds: float | None = None
    exposed_communication_seconds: float | None = None

    @property
    def basis_text(self) -> str:
        """'measured', or 'calibrated: host factor 1.42 from 6 timed steps ...'."""
        if self.time_calibration is None:
            return self.time_basis
        return f"{self.time_basis}: {self.time_calibration}"

    def fields(self) -> dict[str, Any]:
        """The JSON fields `plan` / `check` add (None values left out)."""
        return {k: v for k, v in self._asdict().items() if v is not None}


def _calibrated_speed(gpu: GpuModel, calibration: bool) -> tuple[Any, Any]:
    """The time model's view of `gpu` (None: its peaks are not known) and the host factor
    fitted on this machine's timed steps of it where `calibration` (None: none)."""
    from vramcalc.timing.gpu_speed import gpu_speed

    speed = gpu_speed(gpu)
    if speed is None or not calibration:
        return speed, None
    from vramcalc.timing.host_calibration import calibrated

    return calibrated(gpu, speed)


def _timed(gpu: GpuModel, basis: TimeBasis, step_seconds: float, tokens: int,
           prices: PriceTable, dataset_tokens: int | None, epochs: float, fit: Any,
           cards: int = 1, **several: Any) -> TrainTime:
    """A TrainTime of a step of `step_seconds` training `tokens`, with `dataset_tokens`
    the wall time of `epochs` passes and the cost of `cards` cards at `gpu`'s price;
    `several`: the fields of several GPUs (train_time_parallel)."""
    price = prices.prices.get(gpu.name)
    steps = total = cost = None
    if dataset_tokens is not None:
        steps = math.ceil(dataset_tokens * epochs / tokens)
        total = steps * step_seconds
        if price is not None:
            cost = total / HOUR * price.usd_per_hour * cards
    return TrainTime(
        gpu=gpu.name, time_basis=basis, step_seconds=step_seconds,
        tokens_per_step=tokens, tokens_per_second=tokens / step_seconds, steps=steps,
        total_seconds=total, usd_per_hour=None if price is None else price.usd_per_hour,
        price_source=None if price is None else (
            f"{price.provider}: {price.source}" if price.provider else price.source),
        price_date=None if price is None or price.date is None else price.date.isoformat(),
        cost_usd=cost, host_factor=None if fit is None else fit.factor,
        time_calibration=None if fit is None else fit.note(), **several)


def train_time(spec: ModelSpec, plan: TrainPlan, gpu: GpuModel, prices: PriceTable,
               dataset_tokens: int | None = None, epochs: float = 1.0,
               step: StepTime | None = None, *, calibration: bool) -> TrainTime | None:
    """Time per step on `gpu`, and with `dataset_tokens` the wall time of `epochs` passes
    and its cost; None when the GPU's peaks are not known (gpu_speed.yaml). `calibration`:
    the host factor fitted on this machine's timed steps of `gpu`, where DATA/runs holds
    any (timing/host_calibration.py; every command's --no-calibration turns it off, as the
    memory corrections). A given `step` is used as it is."""
    fit = None
    if step is None:
        speed, fit = _calibrated_speed(gpu, calibration)
        if speed is None:
            return None
        step = step_time(train_work(spec, plan), speed)
    return _timed(gpu, step.basis, step.step_seconds, step.tokens, prices, dataset_tokens,
                  epochs, fit)


def train_time_parallel(spec: ModelSpec, plan: TrainPlan, parallel: Any, gpu: GpuModel,
                        prices: PriceTable, dataset_tokens: int | None = None,
                        epochs: float = 1.0, *, calibration: bool) -> TrainTime | str:
    """`plan` (per-device batch) on `parallel.gpus` GPUs of `gpu`'s kind in one machine
    (timing/parallel_time.py): seconds per step, every GPU's tokens, and with
    `dataset_tokens` the wall time and the cost of all the GPUs. A string says why there
    is no time (the card's peaks or link unknown, a setting the model leaves out).
    `calibration`: the host factor fitted on this machine's timed steps of `gpu`, as on
    one GPU."""
    from vramcalc.timing.gpu_speed import gpu_link
    from vramcalc.timing.parallel_time import not_timed, parallel_step_time

    why = not_timed(plan, parallel)
    if why is not None:
        return why
    speed, fit = _calibrated_speed(gpu, calibration)
    if speed is None:
        return f"no throughput figures for {gpu.name} (vramcalc/data/gpu_speed.yaml)"
    link = gpu_link(gpu)
    if link is None:
        return f"no link between {gpu.name} cards (vramcalc/data/gpu_speed.yaml links)"
    pt = parallel_step_time(spec, plan, parallel, speed, link)
    return _timed(gpu, "derived", pt.step_seconds, pt.tokens, prices, dataset_tokens, epochs,
                  fit, parallel.gpus, gpus=parallel.gpus, link=link.kind,
                  communication_seconds=pt.comm_seconds,
                  exposed_communication_seconds=pt.exposed_seconds)


def rank_by_cost(times: list[TrainTime]) -> list[TrainTime]:
    """Cheapest to finish first (cost when every entry has one), then fastest; entries
    without a cost after those with one."""
    def key(t: TrainTime) -> tuple[int, float, float]:
        total = t.total_seconds if t.total_seconds is not None else t.step_seconds / max(
            1, t.tokens_per_step)
        return (0 if t.cost_usd is not None else 1, t.cost_usd or 0.0, total)

    return sorted(times, key=key)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * HOUR:
        return f"{seconds / HOUR:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe(t: TrainTime) -> str:
    """One line for the text output."""
    on = t.gpu if t.gpus is None else f"{t.gpus} x {t.gpu}"
    line = (f"time on {on} ({t.basis_text}): {t.step_seconds:.3g} s/step, "
            f"{t.tokens_per_second:,.0f} tokens/s")
    if t.gpus is not None and not t.communication_seconds:
        line += " (no collectives: the GPUs run their layers in turn)"
    elif t.gpus is not None and t.exposed_communication_seconds is not None:
        line += (f" ({t.tokens_per_second / t.gpus:,.0f} per GPU; collectives over "
                 f"{t.link} {t.communication_seconds:.3g} s, "
                 f"{t.exposed_communication_seconds:.3g} s of it not hidden by compute)")
    if t.total_seconds is not None:
        line += f"; {t.steps:,} steps: {format_duration(t.total_seconds)}"
        if t.cost_usd is not None:
            per = "/h" if t.gpus is None else f"/h per GPU x {t.gpus}"
            line += f", ${t.cost_usd:,.2f} at ${t.usd_per_hour:g}{per} ({t.price_source}"
            line += f", {t.price_date})" if t.price_date else ")"
        else:
            line += " (no price for this GPU: --price GPU=USD)"
    return line


def infer_time_on(spec: ModelSpec, plan: Any, gpu: GpuModel) -> Any:
    """`generate()` speed of an inference plan (vramcalc.plans.InferPlan) on `gpu`:
    step_time.InferTime, or None when the GPU's peaks are not known."""
    from vramcalc.memory.program.trainable import lora_targets
    from vramcalc.timing.gpu_speed import gpu_speed
    from vramcalc.timing.step_time import infer_time

    speed = gpu_speed(gpu)
    if speed is None:
        return None
    modules = 0 if plan.merged else len(lora_targets(spec, plan.lora_plan()))
    return infer_time(spec, batch_size=plan.batch_size, prompt_len=plan.prompt_len,
                      new_tokens=plan.new_tokens, quant=plan.quant,
                      compute_dtype=plan.compute_dtype, lora_modules_per_layer=modules,
                      attn=plan.attn, speed=speed)


def describe_infer(t: Any) -> str:
    return (f"time on {t.gpu} ({t.basis}): prefill {t.prefill_tokens_per_second:,.0f} "
            f"tokens/s, decode {t.decode_tokens_per_second:,.1f} tokens/s "
            f"({t.decode_step_seconds * 1e3:.1f} ms per new token), generate() "
            f"{format_duration(t.total_seconds)}")
