"""`vramcalc.preflight`: will this training run fit, asked from inside the training script.

It takes the objects the script already has (transformers `TrainingArguments` or TRL
`SFTConfig`, peft `LoraConfig`, transformers `BitsAndBytesConfig`, or the model itself,
whose config, quantization, dtype and LoRA adapters it reads), maps them to a TrainPlan
through the trainer-config mapper `vramcalc plan --from-config` uses
(`training_config.map_training_config`, TRL's keys), and checks the plan against the GPUs of
this machine (NVML, `gpus.query_devices`) or the ones named in `gpus=`, by `check`'s rule.

Every read is a duck-typed attribute read (`getattr(args, "per_device_train_batch_size")`),
so nothing here imports torch, transformers or peft; `vramcalc.integrations` holds the
TrainerCallback that calls it at `on_train_begin`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from vramcalc.api import PlanEstimate, _resolve, _with_plan, make_plan
from vramcalc.errors import PlanError, VramcalcError
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.advice import Suggestion
from vramcalc.sizing.verdict import CERTAINTY_WORDS, DEFAULT_MARGIN_GIB, Certainty, Target
from vramcalc.units import GiB

__all__ = ["DoesNotFitError", "PreflightResult", "PreflightVerdict", "preflight"]

# build_plan keyword (training_config's option names) -> TrainPlan field
_PLAN_FIELDS = {"batch": "batch_size", "dora": "use_dora"}
# TRL's key (what the mapper reports reading) -> the user's object and field it came from
_SOURCES = {
    "use_peft": "peft_config", "lora_r": "peft_config.r", "lora_alpha": "peft_config.lora_alpha",
    "lora_dropout": "peft_config.lora_dropout", "use_dora": "peft_config.use_dora",
    "lora_target_modules": "peft_config.target_modules",
    "load_in_4bit": "quantization_config.load_in_4bit",
    "load_in_8bit": "quantization_config.load_in_8bit",
    "use_bnb_nested_quant": "quantization_config.bnb_4bit_use_double_quant",
    "torch_dtype": "model.dtype",
}
# torch dtype names (str(torch.bfloat16) == "torch.bfloat16") -> TRL's torch_dtype values
_TORCH_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16",
                 "torch.float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "float32": "float32"}


class DoesNotFitError(VramcalcError):
    """The run is estimated not to fit (raised by VramcalcCallback(strict=True))."""

    exit_code = 3

    def __init__(self, result: PreflightResult) -> None:
        super().__init__(result.summary())
        self.result = result


class PreflightVerdict(BaseModel):
    """The plan on one GPU: what it offers (free now, or an empty card), what it needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str
    memory_bytes: int
    required_bytes: int
    margin_bytes: int
    fits: bool
    certainty: Certainty
    headroom_bytes: int
    compute_dtype: str


class PreflightResult(BaseModel):
    """The estimate, a verdict per GPU, and what to change where it does not fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    estimate: PlanEstimate  # on the GPU with the least memory (the one that decides)
    verdicts: tuple[PreflightVerdict, ...]
    suggestions: tuple[Suggestion, ...]  # for that GPU, when it does not fit (or is tight)
    settings: dict[str, str]  # TrainPlan field -> what it was read from
    unmodelled: tuple[str, ...]  # settings that change memory but are not modelled
    notes: tuple[str, ...] = ()  # what the plan assumed (packing, world size)

    @property
    def plan(self) -> TrainPlan:
        return self.estimate.plan

    @property
    def fits(self) -> bool:
        """True when the plan fits every GPU (tight counts as fitting, as in `check`)."""
        return all(v.fits for v in self.verdicts)

    def summary(self) -> str:
        """A few lines for a training log: the plan, the verdict per GPU, what to change."""
        p, e = self.plan, self.estimate
        method = {"qlora": f"QLoRA ({p.quant}) rank {p.rank}", "lora": f"LoRA rank {p.rank}",
                  "full": "full fine-tuning"}[p.method]
        lines = [f"vramcalc preflight: {e.model}, {method}, {p.load_dtype} weights, "
                 f"{p.compute_dtype} compute, batch {p.batch_size} x {p.seq_len} tokens, "
                 f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}, "
                 f"{p.optimizer}: needs "
                 f"{e.required_device_bytes / GiB:.2f} GiB free (peak device "
                 f"{e.peak_device_bytes / GiB:.2f} GiB)"]
        for v in self.verdicts:
            lines.append(f"  {CERTAINTY_WORDS[v.certainty]} on {v.gpu}: needs "
                         f"{v.required_bytes / GiB:.2f} + {v.margin_bytes / GiB:.2f} GiB margin "
                         f"of {v.memory_bytes / GiB:.2f} GiB (headroom "
                         f"{v.headroom_bytes / GiB:+.2f} GiB)")
        if self.suggestions:
            lines.append("  changes that make it fit:" if not self.fits else "  more room:")
            lines += [f"    - {s.description}: needs {s.required_device_bytes / GiB:.2f} GiB "
                      f"({s.command_flags})" for s in self.suggestions]
        elif not self.fits:
            lines.append("  nothing fits, not even batch 1 with every memory-saving change")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  not modelled: {u}" for u in self.unmodelled]
        return "\n".join(lines)

    def __repr__(self) -> str:
        each = ", ".join(f"{v.gpu}: {CERTAINTY_WORDS[v.certainty]}" for v in self.verdicts)
        return (f"PreflightResult({self.estimate.model!r}, needs "
                f"{self.estimate.required_device_bytes / GiB:.2f} GiB; {each})")


# ---- reading the script's objects ---------------------------------------------------------


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    """A config object's fields: to_dict() (transformers, peft), a dict, or its __dict__."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, dict):
            return data
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise PlanError(f"{what}: expected a config object or a dict, got {type(obj).__name__}")


def _enum_value(value: Any) -> Any:
    """An enum's value (peft's PeftType.LORA -> "LORA"), anything else as is."""
    return getattr(value, "value", value)


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else _TORCH_DTYPES.get(str(dtype))


def _model_spec(model: Any) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec, and what a model object says about its loading: quantization_config,
    peft_config, dtype (an empty dict for a name or a spec)."""
    if isinstance(model, ModelSpec):
        return model, {}
    if isinstance(model, str):

        return _resolve(model).spec, {}
    config = getattr(model, "config", None)
    facts: dict[str, Any] = {}
    if config is not None:  # a model (transformers PreTrainedModel, or peft's wrapper)
        facts["quantization_config"] = getattr(config, "quantization_config", None)
        peft = getattr(model, "peft_config", None)
        if isinstance(peft, dict) and peft:
            active = getattr(model, "active_adapter", None)
            facts["peft_config"] = peft.get(active) if isinstance(active, str) and active in \
                peft else next(iter(peft.values()))
        facts["dtype"] = _dtype_name(getattr(model, "dtype", None))
    else:  # a PretrainedConfig, or a config.json already parsed
        config = model
    data = _as_dict(config, "model config")
    if "model_type" not in data:
        raise PlanError(f"preflight: cannot read a model from {type(model).__name__}; give a "
                        "catalog name or hub id, a transformers model or its config")
    from vramcalc.models.hf_config import spec_from_hf_config

    name = data.get("_name_or_path") or getattr(config, "name_or_path", None) or None
    origin = name or f"{data['model_type']} model"
    return spec_from_hf_config(data, origin, name=name or origin), facts


def _peft_keys(peft_config: Any, spec: ModelSpec) -> dict[str, Any]:
    """A peft LoraConfig as the TRL ModelConfig keys the mapper reads (lora_r, ...)."""
    data = _as_dict(peft_config, "peft_config")
    kind = str(_enum_value(data.get("peft_type", "LORA"))).upper()
    if kind != "LORA":
        raise PlanError(f"peft_config: {kind} is not modelled; vramcalc plans LoRA adapters")
    targets = data.get("target_modules")
    if targets is None:
        targets = _peft_default_targets(spec)
    if isinstance(targets, (set, frozenset, tuple)):
        targets = sorted(targets)
    out: dict[str, Any] = {"use_peft": True, "lora_target_modules": targets}
    for key, src in (("lora_r", "r"), ("lora_alpha", "lora_alpha"),
                     ("lora_dropout", "lora_dropout"), ("use_dora", "use_dora"),
                     ("lora_modules_to_save", "modules_to_save")):
        if data.get(src) is not None:
            out[key] = data[src]
    return out


def _peft_default_targets(spec: ModelSpec) -> list[str]:
    """peft's own default target modules for the architecture (target_modules=None)."""
    try:
        from peft.utils.constants import (  # peft installed: the user's LoraConfig is peft's
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS,
        )
    except ImportError:
        DEFAULTS = {}  # noqa: N806
    found = DEFAULTS.get(spec.model_type)
    if not found:
        raise PlanError("peft_config.target_modules is None and peft has no default for "
                        f"model_type '{spec.model_type}'; set target_modules")
    return sorted(found)


def _quant_keys(quant: Any) -> dict[str, Any]:
    """A BitsAndBytesConfig (or a model config's quantization_config dict) as TRL's keys."""
    data = _as_dict(quant, "quantization_config")
    method = str(_enum_value(data.get("quant_method", "bitsandbytes"))).lower()
    if method != "bitsandbytes":
        raise PlanError(f"quantization_config: {method} is not modelled; vramcalc plans "
                        "bitsandbytes 4-bit and 8-bit bases")
    if data.get("load_in_4bit"):
        return {"load_in_4bit": True,
                "bnb_4bit_quant_type": data.get("bnb_4bit_quant_type") or "nf4",
                "use_bnb_nested_quant": bool(data.get("bnb_4bit_use_double_quant", False))}
    if data.get("load_in_8bit"):
        return {"load_in_8bit": True}
    return {}


def plan_from_objects(
    model_or_id: Any,
    training_args: Any,
    peft_config: Any = None,
    quantization_config: Any = None,
    max_seq_len: int | None = None,
) -> tuple[ModelSpec, TrainPlan, dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """The spec and TrainPlan the script's objects describe, what each setting came from,
    what changes memory but is not modelled, and notes on what the plan assumed."""
    from vramcalc.training_config import map_training_config

    spec, facts = _model_spec(model_or_id)
    data = _as_dict(training_args, "training_args")
    data.pop("model_name_or_path", None)
    data["use_peft"] = False
    # SFTConfig(model_init_kwargs={"quantization_config": ..., "dtype": torch.bfloat16}):
    # how TRL loads a model given by name
    raw_init = data.get("model_init_kwargs")
    init: dict[str, Any] = raw_init if isinstance(raw_init, dict) else {}
    init_dtype = _dtype_name(init.get("dtype") or init.get("torch_dtype"))
    quant = next((q for q in (quantization_config, facts.get("quantization_config"),
                              init.get("quantization_config")) if q is not None), None)
    if quant is not None:
        data.update(_quant_keys(quant))
    peft = peft_config if peft_config is not None else facts.get("peft_config")
    if peft is not None:
        data.update(_peft_keys(peft, spec))
    if facts.get("dtype") or init_dtype:
        data["torch_dtype"] = facts.get("dtype") or init_dtype
    if max_seq_len is not None:
        data["max_length"] = max_seq_len
    tc = map_training_config(data, "preflight", "trl")
    options = dict(tc.options)
    if "seq_len" not in options:
        raise PlanError("preflight: no sequence length; pass max_seq_len=N (TrainingArguments "
                        "has none; SFTConfig's max_length is None)")
    fields = {_PLAN_FIELDS.get(k, k): v for k, v in options.items()}
    settings = {_PLAN_FIELDS.get(k, k): _SOURCES.get(v, v if " " in v else f"training_args.{v}")
                for k, v in tc.used.items()}
    if max_seq_len is not None:
        settings["seq_len"] = "max_seq_len"
    if "expandable_segments" not in fields:  # as the CLI: what the environment says
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
        fields["expandable_segments"] = "expandable_segments:true" in conf
    train = make_plan(**fields)
    from vramcalc.memory.program.trainable import lora_targets

    lora_targets(spec, train)  # a target the model does not have: one PlanError
    notes = list(tc.notes)
    world = getattr(training_args, "world_size", 1)
    if isinstance(world, int) and world > 1:
        notes.append(f"world_size {world}: planned per GPU as one process's step; DDP's "
                     "gradient buckets are not counted")
    return spec, train, settings, tc.unmodelled, tuple(notes)


# ---- the GPUs -----------------------------------------------------------------------------


def _targets(gpus: Sequence[Any] | None) -> list[Target]:
    """gpus=None: this machine's (NVML); else each a catalog name, a number of bytes, a
    (name, bytes) pair, or a gpus.DeviceInfo."""
    from vramcalc.sizing.verdict import catalog_target, detected_target, sized_target

    if gpus is None:
        from vramcalc.hardware.devices import query_devices

        return [detected_target(d) for d in query_devices()]
    if isinstance(gpus, (str, int, tuple)):
        gpus = [gpus]
    if not gpus:
        raise PlanError("preflight: gpus is empty; give None (this machine's) or GPU names")
    out = []
    for g in gpus:
        if isinstance(g, str):
            from vramcalc.hardware.catalog import resolve_gpu

            out.append(catalog_target(resolve_gpu(g)))
        elif isinstance(g, int) and not isinstance(g, bool) and g > 0:
            out.append(sized_target(g, f"{g / GiB:g} GiB card"))
        elif (isinstance(g, tuple) and len(g) == 2 and isinstance(g[0], str)
              and isinstance(g[1], int) and g[1] > 0):
            out.append(sized_target(g[1], g[0]))
        elif hasattr(g, "free_bytes") and hasattr(g, "total_bytes"):
            out.append(detected_target(g))
        else:
            raise PlanError(f"preflight: a GPU is a catalog name, a positive number of bytes "
                            f"or a (name, bytes) pair; got {g!r}")
    return out


def preflight(
    model_or_id: Any,
    training_args: Any,
    peft_config: Any = None,
    quantization_config: Any = None,
    max_seq_len: int | None = None,
    gpus: Sequence[Any] | None = None,
    *,
    margin_gib: float = DEFAULT_MARGIN_GIB,
    calibration: bool = True,
) -> PreflightResult:
    """Whether the training run these objects describe fits the GPUs, by `check`'s rule.

    Args:
        model_or_id: a catalog name or hub id, a ModelSpec, a transformers model (its
            config, quantization_config, dtype and peft adapters are read) or its config.
        training_args: transformers TrainingArguments or TRL SFTConfig (or their
            to_dict()): batch, max_length, gradient checkpointing, optim, bf16/fp16.
        peft_config: a peft LoraConfig (default: the model's adapters; none: full
            fine-tuning).
        quantization_config: a BitsAndBytesConfig (default: the model's).
        max_seq_len: tokens per sequence (SFTConfig's max_length if not given).
        gpus: None for this machine's GPUs (NVML; NoGpuError without one), else catalog
            names, byte counts or (name, bytes) pairs, each an empty card.
        margin_gib: kept free on top of the required memory, as `check --margin`.

    Returns:
        A PreflightResult; `.fits`, `.summary()`, `.suggestions` where it does not fit.
    """
    import math

    from vramcalc.corrections.planning import estimator
    from vramcalc.sizing import advice
    from vramcalc.sizing.verdict import verdict

    if not math.isfinite(margin_gib) or margin_gib < 0:
        raise PlanError(f"margin_gib must be zero or more, got {margin_gib}")
    margin = int(margin_gib * GiB)
    spec, train, settings, unmodelled, notes = plan_from_objects(
        model_or_id, training_args, peft_config, quantization_config, max_seq_len)
    targets = _targets(gpus)
    rows = []
    for t in targets:
        p = advice.for_gpu(train, t.bf16_supported)
        fn, _ = estimator(t.corrections_gpu, use_calibration=calibration)
        est = fn(spec, p)
        v = verdict(t.free_bytes, est.required_device_bytes, margin, est.required_low)
        rows.append((t, p, fn, est, v))
    t, p, fn, est, v = min(rows, key=lambda r: r[4].headroom_bytes)  # the GPU that decides
    suggestions: list[Suggestion] = []
    if not v.fits:
        suggestions = advice.suggest(spec, p, t.free_bytes, margin, fn)
    elif v.certainty == "tight":
        more = advice.allocator_suggestion(spec, p, t.free_bytes, margin, fn)
        suggestions = [] if more is None else [more]
    return PreflightResult(
        estimate=_with_plan(est, _resolve(spec), p),
        verdicts=tuple(PreflightVerdict(
            gpu=tt.where, memory_bytes=vv.memory_bytes, required_bytes=vv.required_bytes,
            margin_bytes=margin, fits=vv.fits, certainty=vv.certainty,
            headroom_bytes=vv.headroom_bytes, compute_dtype=pp.compute_dtype)
            for tt, pp, _, _, vv in rows),
        suggestions=tuple(suggestions), settings=settings, unmodelled=unmodelled, notes=notes)
