"""Options shared by `plan`, `check` and `calibrate`: one definition, one validation."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from vramcalc.errors import PlanError
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import (
    ADAPTER_DTYPES,
    ATTENTIONS,
    COMPUTE_DTYPES,
    LAYOUTS,
    LOOPS,
    LOSS_KERNELS,
    MAX_BATCH,
    MAX_SEQ_LEN,
    METHODS,
    MOE_EXPERTS,
    OFFLOAD_ACTIVATIONS,
    OPTIMIZERS,
    QUANTS,
    WEIGHTS_DTYPES,
    TrainPlan,
)
from vramcalc.units import GiB

R = TypeVar("R")

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Catalog name, alias (HF hub id), spec YAML, or config.json path."
    ),
]
RankOpt = Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r (1 to 65536).")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="LoRA alpha, positive (no memory "
                                         "effect).")]
TargetsOpt = Annotated[
    str,
    typer.Option("--targets", help="'all-linear' or a comma list of module names (q_proj,v_proj)."),
]
DropoutOpt = Annotated[
    float | None,
    typer.Option("--lora-dropout", help="LoRA dropout in [0, 1) (default 0.05; 0 where peft "
                 "refuses dropout: LoRA on a transformers-5 MoE's 3-D experts)."),
]
DoraOpt = Annotated[bool, typer.Option("--dora/--no-dora", help="DoRA magnitude vectors.")]
BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Per-device batch size (1 to "
                                        "2**20).")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", help="Tokens per sequence (packed; "
                                     "1 to 2**24, 128 x the longest catalog context).")]
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
    str, typer.Option("--loop", help=f"Training loop: {'|'.join(LOOPS)}. trainer: HF Trainer "
                      "or TRL. plain: the tutorial loop, optimizer built directly, `loss = "
                      "model(...).loss` kept until the next forward, use_cache left on. "
                      "trainer-plain: plain steps on a Trainer's model and optimizer, `del "
                      "loss`; trainer-plain-outputs(-del): the same keeping `outputs = "
                      "model(...)` into the next step (or deleting it after backward).")
]
UseCacheOpt = Annotated[
    bool | None,
    typer.Option("--use-cache/--no-use-cache",
                 help="config.use_cache in the training forward (default: what the loop "
                 "leaves: off under a Trainer, on in the plain loop; no effect under "
                 "gradient checkpointing)."),
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
LayoutOpt = Annotated[
    str, typer.Option("--batch-layout", help=f"How a step's sequences reach the model: "
                      f"{'|'.join(LAYOUTS)}. padded: a padding collator, every row as long as "
                      "--seq-len (the longest in the batch). packed: --batch rows of --seq-len "
                      "holding several sequences (axolotl sample_packing). padding-free: the "
                      "step's sequences in one row (TRL padding_free, or packing=True).")
]
TokensPerStepOpt = Annotated[
    int | None,
    typer.Option("--tokens-per-step", help="With --batch-layout padding-free: the real "
                 "tokens of the step to plan (default: --batch x --seq-len, every sequence "
                 "full).")
]
LengthsOpt = Annotated[
    str | None,
    typer.Option("--lengths", help="A file of the dataset's sequence lengths in tokens, one "
                 "a line: plan the worst step. Padded: --seq-len becomes the longest (at "
                 "most --seq-len, the truncation); padding-free: --tokens-per-step becomes "
                 "the sum of the --batch longest.")
]
OffloadActivationsOpt = Annotated[
    str, typer.Option("--offload-activations", help=f"{'|'.join(OFFLOAD_ACTIVATIONS)}. "
                      "checkpoints: the checkpointed layer inputs go to host memory (Unsloth "
                      "use_gradient_checkpointing='unsloth'; needs "
                      "gradient checkpointing). all: every saved activation outside the "
                      "lm_head (torchtune / TRL activation_offloading).")
]
TrainerOpt = Annotated[
    str | None,
    typer.Option("--trainer", help="Set the defaults as this trainer applies them: "
                 "trl|hf|unsloth|axolotl|plain (given options override; plain = --loop plain)."),
]
LossKernelOpt = Annotated[
    str, typer.Option("--loss-kernel", help=f"Loss head: {'|'.join(LOSS_KERNELS)} (liger: "
                      "use_liger_kernel=True, its fused linear cross-entropy, RMSNorm, SwiGLU "
                      "and RoPE; cce: cut-cross-entropy; chunked: torchtune-style, 8 chunks; "
                      "trl-chunked: TRL 1.4-1.14 SFTTrainer's default loss_type chunked_nll; "
                      "trl-fused: TRL >= 1.15 SFTTrainer's fused LM head, always on).")
]
KbitPrepOpt = Annotated[
    bool | None,
    typer.Option("--kbit-prep/--no-kbit-prep", help="QLoRA: whether peft "
                 "prepare_model_for_kbit_training runs (default yes: norms, embeddings and "
                 "lm_head cast to fp32, an fp32 residual stream). --no-kbit-prep: they stay in "
                 "the load dtype, as TRL's SFTTrainer leaves them (trl 1.16 sft_trainer.py "
                 "calls get_peft_model only)."),
]
AdapterDtypeOpt = Annotated[
    str | None,
    typer.Option("--adapter-dtype", help=f"LoRA adapters' dtype: {'|'.join(ADAPTER_DTYPES)} "
                 "(default fp32: peft autocast_adapter_dtype; TRL's SFTTrainer casts a "
                 "quantized model's adapters to bf16). Training, --task infer and merge."),
]
DoubleQuantOpt = Annotated[
    bool, typer.Option("--double-quant/--no-double-quant", help="Quantize the absmax constants.")
]
ComputeOpt = Annotated[
    str, typer.Option("--compute-dtype", help=f"Compute dtype: {'|'.join(COMPUTE_DTYPES)}.")
]
OptimizerOpt = Annotated[
    str | None,
    typer.Option("--optimizer", "--optim", help=f"HF optim name: {', '.join(OPTIMIZERS)} "
                 "(default: adamw_torch_fused for --method full, paged_adamw_8bit for LoRA "
                 "and QLoRA, as compare uses them)."),
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

# Upper bounds: past these an input is a typo, not a plan (and the arithmetic would overflow
# or, for a search, run long). The largest context in model_specs/ is 131072 tokens
# (max_position_embeddings); the token bounds are 128 times that.
MAX_GPU_MEMORY_GIB = 2.0**20  # 1 PiB: a thousand times the largest card
MAX_RANK = 2**16  # far past any hidden size in the catalog
# MAX_SEQ_LEN (16M tokens) and MAX_BATCH (2**20 sequences): plans.py, where the searches
# (sizing/search.py) read them too
MAX_TOKENS = 2**40  # batch x seq-len per step


def bounded_count(flag: str, value: int, limit: int, what: str) -> int:
    """A count option in [1, limit]; one PlanError line naming the limit otherwise."""
    if value <= 0:
        raise PlanError(f"{flag} must be a positive integer, got {value}")
    if value > limit:
        raise PlanError(f"{flag} {value} is beyond {what}; use at most {limit}")
    return value


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
    from vramcalc.sizing.search import SEARCHABLE

    if what is not None and what not in SEARCHABLE:
        raise PlanError(f"--max takes one of {', '.join(SEARCHABLE)}, got '{what}'")


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise PlanError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
    return value


def expandable_from_env() -> bool:
    """Whether PYTORCH_CUDA_ALLOC_CONF turns expandable segments on. torch reads the value
    as True or False only and refuses anything else (c10/cuda/CUDAAllocatorConfig.cpp
    `parseExpandableSegments`: "Expected a single True/False argument"), so does this."""
    import os

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    on = False
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip() != "expandable_segments":
            continue
        if value.strip() not in ("True", "False"):
            raise PlanError(f"PYTORCH_CUDA_ALLOC_CONF: expandable_segments takes True or False "
                            f"(as torch reads it), got '{value.strip()}'")
        on = value.strip() == "True"
    return on


def build_plan(
    *,
    method: str | None = None,
    weights_dtype: str | None = None,
    loop: str = "trainer",
    use_cache: bool | None = None,
    expandable_segments: bool | None = None,
    moe_experts: str = "unquantized",
    loss_kernel: str = "torch",
    rank: int,
    alpha: float,
    targets: str,
    lora_dropout: float | None,
    dora: bool,
    batch: int,
    seq_len: int,
    quant: str | None,
    double_quant: bool,
    compute_dtype: str,
    optimizer: str | None,
    gradient_checkpointing: bool,
    attn: str,
    batch_layout: str = "padded",
    tokens_per_step: int | None = None,
    lengths: str | None = None,
    offload_activations: str = "none",
    trainer: str | None = None,
    kbit_prep: bool | None = None,
    adapter_dtype: str | None = None,
) -> TrainPlan:
    """Validate the options into a TrainPlan; every problem is one PlanError line.

    `optimizer` None is the method's usual one (DEFAULT_OPTIMIZER), `lora_dropout` None is
    DEFAULT_DROPOUT (see `runnable_dropout` for the models where it cannot apply).
    """
    bounded_count("--rank", rank, MAX_RANK, "any model's width")
    bounded_count("--batch", batch, MAX_BATCH, "any per-device batch")
    bounded_count("--seq-len", seq_len, MAX_SEQ_LEN,
                  "128 x the longest context of the catalog (131072)")
    if batch * seq_len > MAX_TOKENS:
        raise PlanError(f"--batch x --seq-len = {batch * seq_len} tokens per step is absurd "
                        f"(at most 2**40); lower --batch or --seq-len")
    if not math.isfinite(alpha) or alpha <= 0:
        raise PlanError(f"--alpha must be a positive finite number, got {alpha}")
    if lora_dropout is None:
        lora_dropout = DEFAULT_DROPOUT
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
    base16 = method in ("lora", "full") or quant == "none"
    if kbit_prep is not None:
        if kbit_prep is False and base16:
            raise PlanError(f"--no-kbit-prep: prepare_model_for_kbit_training is for a "
                            f"quantized base (--method qlora); --method {method or 'lora'} "
                            "never runs it")
        extra["kbit_prep"] = kbit_prep
    if adapter_dtype is not None:
        extra["adapter_dtype"] = _one_of("--adapter-dtype", adapter_dtype, ADAPTER_DTYPES)
        if adapter_dtype != "fp32" and method == "full":
            raise PlanError("--adapter-dtype: --method full trains the weights themselves "
                            "(in --weights-dtype), no adapter")
        if adapter_dtype != "fp32" and dora:
            raise PlanError("--adapter-dtype: with --dora not modelled (TRL keeps DoRA's "
                            "lora_magnitude_vector in fp32)")
    if expandable_segments is None:
        expandable_segments = expandable_from_env()
    if optimizer is None:
        full = method == "full"
        optimizer = DEFAULT_OPTIMIZER["full" if full else "lora"]
    _one_of("batch layout", batch_layout, LAYOUTS)
    if trainer is not None:
        from vramcalc.trainers import check_loop, trainer_preset

        trainer_preset(trainer)
        check_loop(trainer, loop)
    if tokens_per_step is not None:
        bounded_count("--tokens-per-step", tokens_per_step, MAX_TOKENS, "any step")
        if batch_layout != "padding-free":
            raise PlanError(f"--tokens-per-step: only with --batch-layout padding-free (a "
                            f"{batch_layout} batch computes every row in full: "
                            f"--batch x --seq-len tokens)")
        if tokens_per_step > batch * seq_len:
            raise PlanError(f"--tokens-per-step {tokens_per_step} is more than --batch x "
                            f"--seq-len = {batch * seq_len}, the most a step holds")
    if offload_activations == "checkpoints" and not gradient_checkpointing:
        raise PlanError("--offload-activations checkpoints offloads the checkpointed layer "
                        "inputs: not with --no-gradient-checkpointing (use all)")
    if lengths is not None:
        if tokens_per_step is not None:
            raise PlanError("--lengths and --tokens-per-step both set the step's tokens; "
                            "give one")
        found = read_lengths(lengths)
        seq_len, tokens_per_step = worst_step(found, batch, seq_len, batch_layout)
        from vramcalc.commands.common import warn

        worst = (f"--seq-len {seq_len}" if tokens_per_step is None
                 else f"--tokens-per-step {tokens_per_step}")
        warn(f"note: --lengths {lengths}: {len(found)} sequences, the longest {max(found)}; "
             f"the worst step planned: {worst}")
    try:
        return TrainPlan(
            **extra,
            loop=_one_of("loop", loop, LOOPS),  # type: ignore[arg-type]
            use_cache=use_cache,
            expandable_segments=expandable_segments,
            moe_experts=_one_of("moe experts", moe_experts, MOE_EXPERTS),  # type: ignore[arg-type]
            loss_kernel=_one_of("loss kernel", loss_kernel, LOSS_KERNELS),  # type: ignore[arg-type]
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
            layout=batch_layout,  # type: ignore[arg-type]
            tokens_per_step=tokens_per_step,
            offload_activations=_one_of(  # type: ignore[arg-type]
                "activation offloading", offload_activations, OFFLOAD_ACTIVATIONS),
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise PlanError(f"{where}{first['msg'].removeprefix('Value error, ')}") from None


MAX_LENGTHS = 10_000_000  # lines of a --lengths file


@functools.lru_cache(maxsize=4)
def read_lengths(path: str) -> tuple[int, ...]:
    """The sequence lengths of a --lengths file: one positive integer a line (blank lines
    and `#` comments skipped); one PlanError line otherwise. Read as the other named
    inputs are (user_files.read_text): a FIFO, a device or a folder is refused unread.
    Kept per path for the process: build_plan and check's padding-free offer read it once."""
    from pathlib import Path

    from vramcalc.user_files import read_text

    text = read_text(Path(path), f"--lengths {path}", PlanError)
    out: list[int] = []
    for k, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not item.isdigit() or int(item) <= 0:
            raise PlanError(f"--lengths {path}: line {k}: expected a positive integer (tokens), "
                            f"got {item[:40]!r}")
        out.append(int(item))
        if len(out) > MAX_LENGTHS:
            raise PlanError(f"--lengths {path}: more than {MAX_LENGTHS} lengths")
    if not out:
        raise PlanError(f"--lengths {path}: no lengths in the file")
    return tuple(out)


def worst_step(lengths: Sequence[int], batch: int, seq_len: int, layout: str
               ) -> tuple[int, int | None]:
    """(seq_len, tokens_per_step) of the step that needs the most memory, given the
    dataset's lengths, each truncated to `seq_len` (TRL max_length, axolotl sequence_len).
    A padding collator pads each row to the longest in the batch (transformers
    DataCollatorWithPadding, TRL DataCollatorForLanguageModeling `pad`): the worst step has
    the longest sequence, whatever the rest, so the row length is the longest. Padding-free
    flattens the batch's real tokens: the worst step is the `batch` longest together.
    Packed rows are --seq-len long whatever the lengths: a PlanError."""
    if layout == "padded":
        return min(max(lengths), seq_len), None
    if layout == "padding-free":
        from vramcalc.sizing.advice import padding_free_step

        return padding_free_step(lengths, batch, seq_len)
    raise PlanError("--lengths: packed rows are filled to --seq-len whatever the lengths; "
                    "plan them with --seq-len (or use --batch-layout padding-free)")


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
    from vramcalc.memory.program.trainable import lora_targets

    lora_targets(spec, plan)


# ---- one definition of the plan options for every command ---------------------------------

# name -> (annotated type, default), in --help order; the defaults are the seeds' recipe.
PLAN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "method": (MethodOpt, None),
    "rank": (RankOpt, 16),
    "alpha": (AlphaOpt, 32.0),
    "targets": (TargetsOpt, "all-linear"),
    "lora_dropout": (DropoutOpt, None),
    "dora": (DoraOpt, False),
    "batch": (BatchOpt, 1),
    "seq_len": (SeqOpt, 512),
    "quant": (QuantOpt, None),
    "double_quant": (DoubleQuantOpt, True),
    "compute_dtype": (ComputeOpt, "bf16"),
    "optimizer": (OptimizerOpt, None),
    "gradient_checkpointing": (CheckpointOpt, True),
    "attn": (AttnOpt, "sdpa"),
    "weights_dtype": (WeightsDtypeOpt, None),
    "loop": (LoopOpt, "trainer"),
    "use_cache": (UseCacheOpt, None),
    "expandable_segments": (ExpandableOpt, None),
    "moe_experts": (MoeExpertsOpt, "unquantized"),
    "batch_layout": (LayoutOpt, "padded"),
    "tokens_per_step": (TokensPerStepOpt, None),
    "lengths": (LengthsOpt, None),
    "offload_activations": (OffloadActivationsOpt, "none"),
    "trainer": (TrainerOpt, None),
    "loss_kernel": (LossKernelOpt, "torch"),
    "kbit_prep": (KbitPrepOpt, None),
    "adapter_dtype": (AdapterDtypeOpt, None),
}


# The rule for the defaults that depend on the method: the optimizer each method is usually
# trained with (the same as vramcalc.sizing.comparison FULL_OPTIMIZER / LORA_OPTIMIZER, which
# compare and fit use; tests/commands/test_input_rules.py keeps them equal), and LoRA dropout.
DEFAULT_OPTIMIZER: dict[str, str] = {"full": "adamw_torch_fused", "lora": "paged_adamw_8bit"}
DEFAULT_DROPOUT = 0.05
_PLAN_CTX = "vramcalc_plan_ctx"


class PlanOptions(dict[str, Any]):
    """The plan options as keyword arguments of `build_plan`, and which of them the user gave
    on the command line (`given`, option names), as typer's parameter source tells."""

    given: frozenset[str] = frozenset()


def given_options(ctx: Any, names: Any) -> frozenset[str]:
    """Which of `names` (parameter names) the command line or the environment set: click's
    ParameterSource, neither DEFAULT nor DEFAULT_MAP."""
    out = set()
    for name in names:
        source = ctx.get_parameter_source(name) if ctx is not None else None
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(name)
    return frozenset(out)


def flag(name: str) -> str:
    """The option of a parameter name: lora_dropout -> --lora-dropout."""
    return "--" + {"dora": "dora", "max_": "max", "json_output": "json"}.get(
        name, name.replace("_", "-"))


def refuse_given(given: frozenset[str] | set[str], names: Any, why: str) -> None:
    """One PlanError naming the options of `names` the user gave, with `why`."""
    bad = [flag(n) for n in names if n in given]
    if bad:
        raise PlanError(f"{', '.join(bad)}: {why}")


def check_applies(spec: ModelSpec, plan: TrainPlan, given: frozenset[str]) -> None:
    """Refuse a given plan option that this plan does not use, in one line: LoRA options
    with --method full, --double-quant without a 4-bit base, --moe-experts without a
    quantized MoE."""
    if plan.method == "full":
        refuse_given(given, ("rank", "alpha", "targets", "lora_dropout", "dora"),
                     "LoRA options; --method full trains every parameter, no adapter")
    if plan.quant not in ("nf4", "fp4"):
        refuse_given(given, ("double_quant",), f"only with a 4-bit base (--quant nf4 or "
                     f"fp4); this plan's base is {plan.quant}")
    if plan.method != "qlora":
        refuse_given(given, ("kbit_prep",), "prepare_model_for_kbit_training is for a "
                     f"quantized base (--method qlora); --method {plan.method} never runs it")
    if not spec.is_moe or plan.quant == "none":
        refuse_given(given, ("moe_experts",), "only with a quantized base of an MoE model "
                     f"({spec.name}, quant {plan.quant})")


def for_target(plan: TrainPlan, target: Any, given: frozenset[str],
               note: bool = True) -> TrainPlan:
    """The plan for a card (vramcalc.sizing.advice `for_gpu`: fp16 compute on a card without bf16),
    or a PlanError when the user asked for bf16 there: an explicit choice is never changed
    (HF Trainer refuses bf16=True on such a card, too)."""
    from vramcalc.sizing.advice import for_gpu

    out = for_gpu(plan, target.bf16_supported)
    if out is not plan:
        if "compute_dtype" in given:
            raise PlanError(f"--compute-dtype {plan.compute_dtype}: {target.name} (compute "
                            f"capability {target.compute_capability}) has no bf16; use "
                            "--compute-dtype fp16 or leave it out (then fp16 is planned)")
        if note:
            from vramcalc.commands.common import warn

            warn(f"note: {target.name} has no bf16; planning with --compute-dtype fp16")
    return out


def runnable_dropout(spec: ModelSpec, plan: TrainPlan, given: frozenset[str]) -> TrainPlan:
    """The default LoRA dropout where it can run: 0 when LoRA wraps a transformers-5 MoE's
    3-D experts (peft ParamWrapper refuses dropout, vramcalc.memory.program.trainable
    `check_lora_can_start`) and the user gave no --lora-dropout; a note says so."""
    from vramcalc.memory.program.trainable import lora_on_experts

    if "lora_dropout" in given or plan.lora_dropout == 0 or not lora_on_experts(spec, plan):
        return plan
    from vramcalc.commands.common import warn

    warn(f"note: --lora-dropout 0: peft cannot apply dropout to {spec.name}'s 3-D MoE "
         f"experts (the default {DEFAULT_DROPOUT} elsewhere)")
    return plan.model_copy(update={"lora_dropout": 0.0})


def without_per_method_options(func: Callable[..., R]) -> Callable[..., R]:
    """`with_plan_options` without --method, --quant and --weights-dtype: for compare and
    fit, which set them per row."""
    return with_plan_options(func, exclude=("method", "quant", "weights_dtype"))


def with_plan_options(func: Callable[..., R],
                      exclude: tuple[str, ...] = ()) -> Callable[..., R]:
    """Give a command every plan option (after its own first parameter, the model).

    The command declares `plan_options: dict[str, Any]` instead of the 13 options and
    turns it into a TrainPlan with `build_plan(**plan_options)`. Typer reads the
    signature set here, so the options are declared once for plan, check and calibrate.
    """
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "plan_options"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in PLAN_OPTIONS.items() if name not in exclude
    ]
    first, rest = own[:1], own[1:]
    if first and first[0].annotation is typer.Context:  # keep the context, then the model
        first, rest = own[:2], own[2:]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in first + added + rest]
    # typer passes the context to one parameter only: share the command's own, if any
    shared = next((p.name for p in params if p.annotation is typer.Context), None)
    if shared is None:
        params.append(inspect.Parameter(_PLAN_CTX, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=typer.Context))

    def wrapper(**kwargs: Any) -> R:
        ctx = kwargs.pop(_PLAN_CTX) if shared is None else kwargs[shared]
        options = PlanOptions({name: kwargs.pop(name) if name not in exclude else None
                               for name in PLAN_OPTIONS})
        options.given = given_options(ctx, [*PLAN_OPTIONS, *kwargs])
        if options.get("trainer") is not None:
            options = with_trainer(options, ctx, exclude, kwargs.get("model"))
        return func(plan_options=options, **kwargs)

    return with_signature(wrapper, func, sig.replace(parameters=params))


def with_trainer(options: PlanOptions, ctx: Any, exclude: tuple[str, ...],
                 model: str | None = None) -> PlanOptions:
    """The options with --trainer's defaults for those neither given nor read from
    --from-config (commands/from_config.py CONFIG_FILLED) nor set per row (`exclude`); the
    preset's loss kernel only where `model` runs it (trainers.runnable_loss); the notes on
    stderr."""
    from vramcalc.commands.common import warn
    from vramcalc.trainers import apply_trainer, runnable_loss

    filled = set(ctx.meta.get("vramcalc_config_filled", ())) if ctx is not None else set()
    keep = options.given | filled | set(exclude)
    values, notes = apply_trainer(dict(options), options["trainer"], keep)
    if "loss_kernel" not in keep:
        values, why = runnable_loss(values, options["trainer"], model, build_plan)
        notes += [why] if why else []
    out = PlanOptions(values)
    out.given = options.given
    for note in notes:
        warn(f"note: {note}")
    return out


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
