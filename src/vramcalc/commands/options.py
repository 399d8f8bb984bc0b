"""Options shared by `plan`, `check` and `calibrate`: one definition, one validation."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from vramcalc.errors import PlanError
from vramcalc.plan_settings import (
    ATTENTIONS,
    COMPUTE_DTYPES,
    LOOPS,
    METHODS,
    MOE_EXPERTS,
    OPTIMIZERS,
    QUANTS,
    WEIGHTS_DTYPES,
    TrainPlan,
)
from vramcalc.specs import ModelSpec

R = TypeVar("R")

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Catalog name, alias (HF hub id), spec YAML, or config.json path."
    ),
]
RankOpt = Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="LoRA alpha (no memory effect).")]
TargetsOpt = Annotated[
    str,
    typer.Option("--targets", help="'all-linear' or a comma list of module names (q_proj,v_proj)."),
]
DropoutOpt = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout in [0, 1).")]
DoraOpt = Annotated[bool, typer.Option("--dora/--no-dora", help="DoRA magnitude vectors.")]
BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Per-device batch size.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", help="Tokens per sequence (packed).")]
MethodOpt = Annotated[
    str | None,
    typer.Option("--method", help=f"{'|'.join(METHODS)}: quantized base + LoRA, 16-bit base + "
                 "LoRA, or every parameter trained. Default: qlora, or lora with --quant none."),
]
QuantOpt = Annotated[
    str | None,
    typer.Option("--quant", help=f"Base weights: {'|'.join(QUANTS)} (default nf4 for qlora, "
                 "none for lora and full)."),
]
WeightsDtypeOpt = Annotated[
    str | None,
    typer.Option("--weights-dtype", help=f"Dtype the 16-bit base is loaded in: "
                 f"{'|'.join(WEIGHTS_DTYPES)} (default: the compute dtype; fp32 with "
                 "--method full = fp32 master weights under autocast)."),
]
LoopOpt = Annotated[
    str, typer.Option("--loop", help=f"Training loop: {'|'.join(LOOPS)} (HF Trainer; a plain "
                      "PyTorch loop, `loss = model(...).loss; loss.backward()`; or one that "
                      "keeps `outputs = model(...)` through backward, as transformers' docs "
                      "write it: + tokens x vocab logits).")
]
ExpandableOpt = Annotated[
    bool | None,
    typer.Option("--expandable-segments/--no-expandable-segments",
                 help="Plan for PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (default: "
                 "what the environment variable says)."),
]
MoeExpertsOpt = Annotated[
    str, typer.Option("--moe-experts", help=f"MoE experts: {'|'.join(MOE_EXPERTS)} "
                      "(transformers 5 leaves 3-D experts unquantized).")
]
DoubleQuantOpt = Annotated[
    bool, typer.Option("--double-quant/--no-double-quant", help="Quantize the absmax constants.")
]
ComputeOpt = Annotated[
    str, typer.Option("--compute-dtype", help=f"Compute dtype: {'|'.join(COMPUTE_DTYPES)}.")
]
OptimizerOpt = Annotated[
    str, typer.Option("--optimizer", "--optim", help=f"HF optim name: {', '.join(OPTIMIZERS)}.")
]
CheckpointOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute layer activations in backward.",
    ),
]
AttnOpt = Annotated[str, typer.Option("--attn", help=f"Attention: {'|'.join(ATTENTIONS)}.")]
NoCalibrationOpt = Annotated[
    bool,
    typer.Option("--no-calibration", help="Ignore the fitted corrections (calibration/)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
GpuMemOpt = Annotated[
    float | None,
    typer.Option("--gpu-memory", help="Check against an empty card of this many GiB (2**30)."),
]
MarginOpt = Annotated[
    float,
    typer.Option("--margin", help="GiB kept free on top of the required free memory, for "
                 "estimation error and fragmentation. Fits: required free memory + margin "
                 "<= memory."),
]
MaxOpt = Annotated[
    str | None,
    typer.Option("--max", help="Answer the largest 'batch' or 'seq-len' that fits instead: "
                 "the largest value plan calls \"fits\" (a \"fits, tight\" value may run "
                 "out of memory and does not count)."),
]

GiB = 2**30
# Upper bounds: past these an input is a typo, not a plan (and the arithmetic would overflow).
MAX_GPU_MEMORY_GIB = 2.0**20  # 1 PiB: a thousand times the largest card
MAX_RANK = 2**16  # far past any hidden size in the catalog
MAX_SEQ_LEN = 2**24  # 16M tokens: past every max_position_embeddings
MAX_TOKENS = 2**40  # batch x seq-len per step


def gpu_memory_bytes(gib: float) -> int:
    """--gpu-memory GIB in bytes; a PlanError unless a finite positive size up to 1 PiB."""
    if not math.isfinite(gib) or gib <= 0 or gib > MAX_GPU_MEMORY_GIB:
        raise PlanError(f"--gpu-memory must be a positive number of GiB up to "
                        f"{MAX_GPU_MEMORY_GIB:.0f}, got {gib}")
    return int(gib * GiB)


def margin_bytes(gib: float) -> int:
    """--margin GIB in bytes; a PlanError unless finite and in [0, 1 PiB]."""
    if not math.isfinite(gib) or gib < 0 or gib > MAX_GPU_MEMORY_GIB:
        raise PlanError(f"--margin must be zero or more GiB (a finite number), got {gib}")
    return int(gib * GiB)


def check_max(what: str | None) -> None:
    from vramcalc.search import SEARCHABLE

    if what is not None and what not in SEARCHABLE:
        raise PlanError(f"--max takes one of {', '.join(SEARCHABLE)}, got '{what}'")


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise PlanError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
    return value


def expandable_from_env() -> bool:
    """Whether PYTORCH_CUDA_ALLOC_CONF turns expandable segments on."""
    import os

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
    return "expandable_segments:true" in conf


def build_plan(
    *,
    method: str | None = None,
    weights_dtype: str | None = None,
    loop: str = "trainer",
    expandable_segments: bool | None = None,
    moe_experts: str = "unquantized",
    rank: int,
    alpha: float,
    targets: str,
    lora_dropout: float,
    dora: bool,
    batch: int,
    seq_len: int,
    quant: str | None,
    double_quant: bool,
    compute_dtype: str,
    optimizer: str,
    gradient_checkpointing: bool,
    attn: str,
) -> TrainPlan:
    """Validate the options into a TrainPlan; every problem is one PlanError line."""
    for name, value in (("--rank", rank), ("--batch", batch), ("--seq-len", seq_len)):
        if value <= 0:
            raise PlanError(f"{name} must be a positive integer, got {value}")
    if rank > MAX_RANK:
        raise PlanError(f"--rank {rank} is beyond any model's width; use at most {MAX_RANK}")
    if seq_len > MAX_SEQ_LEN:
        raise PlanError(f"--seq-len {seq_len} is beyond any model's context; use at most "
                        f"{MAX_SEQ_LEN}")
    if batch * seq_len > MAX_TOKENS:
        raise PlanError(f"--batch x --seq-len = {batch * seq_len} tokens per step is absurd "
                        f"(at most 2**40); lower --batch or --seq-len")
    if not math.isfinite(alpha):
        raise PlanError(f"--alpha must be a finite number, got {alpha}")
    if not 0.0 <= lora_dropout < 1.0:  # NaN fails this too
        raise PlanError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if not targets.strip() or not all(t.strip() for t in targets.split(",")):
        raise PlanError(f"--targets must be 'all-linear' or a comma list of module names "
                        f"(q_proj,v_proj), got '{targets}'")
    if "all-linear" in targets.split(",") and targets != "all-linear":
        raise PlanError(f"--targets is either 'all-linear' or a comma list of module names, "
                        f"not both: '{targets}'")
    extra: dict[str, Any] = {}
    if method is not None:
        extra["method"] = _one_of("method", method, METHODS)
    if quant is not None:
        extra["quant"] = _one_of("quantization", quant, QUANTS)
    if weights_dtype is not None:
        extra["weights_dtype"] = _one_of("weights dtype", weights_dtype, WEIGHTS_DTYPES)
    if expandable_segments is None:
        expandable_segments = expandable_from_env()
    try:
        return TrainPlan(
            **extra,
            loop=_one_of("loop", loop, LOOPS),  # type: ignore[arg-type]
            expandable_segments=expandable_segments,
            moe_experts=_one_of("moe experts", moe_experts, MOE_EXPERTS),  # type: ignore[arg-type]
            rank=rank,
            alpha=alpha,
            targets=targets,
            lora_dropout=lora_dropout,
            use_dora=dora,
            batch_size=batch,
            seq_len=seq_len,
            double_quant=double_quant,
            compute_dtype=_one_of("compute dtype", compute_dtype, COMPUTE_DTYPES),  # type: ignore[arg-type]
            optimizer=_one_of("optimizer", optimizer, OPTIMIZERS),  # type: ignore[arg-type]
            gradient_checkpointing=gradient_checkpointing,
            attn=_one_of("attention", attn, ATTENTIONS),  # type: ignore[arg-type]
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise PlanError(f"{where}{first['msg'].removeprefix('Value error, ')}") from None


def warn_long_sequence(spec: ModelSpec, plan: TrainPlan) -> str | None:
    """A warning when --seq-len passes the model's max_position_embeddings (not an error:
    RoPE scaling can stretch a context; the estimate still holds)."""
    limit = spec.max_position_embeddings
    if limit is not None and limit < plan.seq_len:
        return (f"warning: --seq-len {plan.seq_len} is longer than {spec.name}'s "
                f"max_position_embeddings ({limit}); estimating anyway")
    return None


def validate_targets(spec: ModelSpec, plan: TrainPlan) -> None:
    """Fail early (one PlanError line) on a target module the model does not have."""
    from vramcalc.trainable import lora_targets

    lora_targets(spec, plan)


# ---- one definition of the plan options for every command ---------------------------------

# name -> (annotated type, default), in --help order; the defaults are the seeds' recipe.
PLAN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "method": (MethodOpt, None),
    "rank": (RankOpt, 16),
    "alpha": (AlphaOpt, 32.0),
    "targets": (TargetsOpt, "all-linear"),
    "lora_dropout": (DropoutOpt, 0.05),
    "dora": (DoraOpt, False),
    "batch": (BatchOpt, 1),
    "seq_len": (SeqOpt, 512),
    "quant": (QuantOpt, None),
    "double_quant": (DoubleQuantOpt, True),
    "compute_dtype": (ComputeOpt, "bf16"),
    "optimizer": (OptimizerOpt, "paged_adamw_8bit"),
    "gradient_checkpointing": (CheckpointOpt, True),
    "attn": (AttnOpt, "sdpa"),
    "weights_dtype": (WeightsDtypeOpt, None),
    "loop": (LoopOpt, "trainer"),
    "expandable_segments": (ExpandableOpt, None),
    "moe_experts": (MoeExpertsOpt, "unquantized"),
}


def with_plan_options(func: Callable[..., R]) -> Callable[..., R]:
    """Give a command every plan option (after its own first parameter, the model).

    The command declares `plan_options: dict[str, Any]` instead of the 13 options and
    turns it into a TrainPlan with `build_plan(**plan_options)`. Typer reads the
    signature set here, so the options are declared once for plan, check and calibrate.
    """
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "plan_options"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in PLAN_OPTIONS.items()
    ]
    first, rest = own[:1], own[1:]
    if first and first[0].annotation is typer.Context:  # keep the context, then the model
        first, rest = own[:2], own[2:]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in first + added + rest]

    def wrapper(**kwargs: Any) -> R:
        options = {name: kwargs.pop(name) for name in PLAN_OPTIONS}
        return func(plan_options=options, **kwargs)

    return with_signature(wrapper, func, sig.replace(parameters=params))


def with_signature(wrapper: Callable[..., R], func: Callable[..., Any],
                   sig: inspect.Signature) -> Callable[..., R]:
    """`wrapper` named and documented as `func`, with the signature typer should read."""
    wrapper.__name__ = func.__name__
    wrapper.__qualname__ = func.__qualname__
    wrapper.__doc__ = func.__doc__
    wrapper.__module__ = func.__module__
    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    return wrapper
