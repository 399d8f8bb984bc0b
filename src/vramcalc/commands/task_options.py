"""`--task train|infer|merge` for `plan` and `check`: the options and the dispatch.

`with_task_options("plan")` wraps a command that already has the plan options
(`with_plan_options`): it adds --task and the inference / merge options, and runs
`--task infer|merge` here (vramcalc.memory.inference, pure arithmetic); `--task train` (the
default) calls the command unchanged. Heavy or optional modules load inside the bodies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from vramcalc.commands.common import print_json, warn
from vramcalc.commands.options import with_signature
from vramcalc.errors import PlanError
from vramcalc.units import GiB

if TYPE_CHECKING:
    from vramcalc.api import TaskResult
    from vramcalc.memory.result import Estimate
    from vramcalc.models.spec import ModelSpec
    from vramcalc.plans import InferPlan, MergePlan

R = TypeVar("R")
EXIT_DOES_NOT_FIT = 3
TASKS = ("train", "infer", "merge")
INFER_MAX = ("batch", "prompt-len")

TaskOpt = Annotated[
    str, typer.Option("--task", help="train (a training step), infer (generate() with the "
                      "adapter) or merge (merge_and_unload() of the adapter).")
]
PromptOpt = Annotated[int | None, typer.Option("--prompt-len", help="--task infer: prompt "
                                               "tokens per sequence (default 512; prompt + "
                                               "new tokens up to 2**24).")]
NewTokensOpt = Annotated[int | None, typer.Option("--new-tokens", help="--task infer: tokens "
                                                  "generated per sequence (default 128).")]
MergedOpt = Annotated[bool, typer.Option("--merged", help="--task infer: the adapter merged "
                                         "into the weights (no LoRA tensors).")]
CacheOpt = Annotated[str | None, typer.Option("--cache", help="--task infer: KV cache dynamic "
                                              "(transformers' default) or static.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="--task merge: the base's "
                                              "dtype, bf16 or fp16 (default bf16).")]
OnOpt = Annotated[str | None, typer.Option("--on", help="--task merge: gpu (peak GPU memory) "
                                           "or cpu (peak host RAM).")]

TASK_OPTIONS: dict[str, tuple[Any, Any]] = {
    "task": (TaskOpt, "train"),
    "prompt_len": (PromptOpt, None),
    "new_tokens": (NewTokensOpt, None),
    "merged": (MergedOpt, False),
    "cache": (CacheOpt, None),
    "dtype": (DtypeOpt, None),
    "on": (OnOpt, None),
}
_FLAG = {name: "--" + name.replace("_", "-") for name in TASK_OPTIONS}


def with_task_options(command: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Add --task and its options to `command` ("plan" or "check")."""

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        sig = inspect.signature(func)
        own = list(sig.parameters.values())
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
                 for n, (a, d) in TASK_OPTIONS.items()]
        params = own[:1] + added + own[1:]

        def wrapper(**kwargs: Any) -> R:
            opts = {name: kwargs.pop(name) for name in TASK_OPTIONS}
            task = opts.pop("task")
            if task not in TASKS:
                raise PlanError(f"unknown task '{task}'; valid: {', '.join(TASKS)}")
            if task == "train":
                given = [_FLAG[n] for n, v in opts.items() if v not in (None, False)]
                if given:
                    raise PlanError(f"{', '.join(given)}: only with --task infer or --task merge")
                return func(**kwargs)
            from vramcalc.commands.options import given_options

            # --adapter-dtype is a plan option (commands/options.py) that infer / merge read
            opts["adapter_dtype"] = kwargs.get("adapter_dtype")
            ctx = next((v for k, v in kwargs.items() if k.endswith("_ctx")), None)
            kwargs["given"] = given_options(ctx, kwargs)
            run_task(command, task, opts, kwargs)
            return None  # type: ignore[return-value]

        return with_signature(wrapper, func, sig.replace(parameters=params))

    return decorate


# ---- building the plans ----------------------------------------------------------------------


def _one_of(flag: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise PlanError(f"{flag} takes one of {', '.join(valid)}, got '{value}'")
    return value


_PlanT = TypeVar("_PlanT", bound=BaseModel)


def _validated(cls: type[_PlanT], **fields: Any) -> _PlanT:
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise PlanError(f"{where}{first['msg'].removeprefix('Value error, ')}") from None


# Options of a training step that --task infer / merge do not use: refused when given.
TRAIN_ONLY = ("method", "lora_dropout", "dora", "seq_len", "optimizer",
              "gradient_checkpointing", "weights_dtype", "loop", "expandable_segments",
              "moe_experts", "from_config", "no_calibration", "gpus", "strategy", "offload",
              "gpus_per_node", "sharding_strategy", "use_orig_params", "device_map",
              "quant_storage", "loss_kernel", "kbit_prep")
_TRAIN_ONLY_WHY = {
    "seq_len": "use --prompt-len and --new-tokens",
    "from_config": "it reads training settings",
    "no_calibration": "no fitted corrections exist for it",
    "gpus": "several GPUs are planned for training only",
    "loss_kernel": "a training loss head; generate() keeps only the last position's "
                   "logits in prefill",
}


def refuse_train_only(task: str, kw: dict[str, Any]) -> None:
    """One PlanError for the first given option that --task `task` does not use."""
    from vramcalc.commands.options import flag

    given = kw.get("given", frozenset())
    extra: tuple[str, ...] = ()
    if task == "merge":
        extra = ("batch", "compute_dtype", "attn", "max_")
    for name in (*TRAIN_ONLY, *extra):
        if name in given:
            why = _TRAIN_ONLY_WHY.get(name)
            raise PlanError(f"{flag(name)}: not used by --task {task}"
                            + (f" ({why})" if why else ""))


def build_infer_plan(opts: dict[str, Any], kw: dict[str, Any]) -> InferPlan:
    from vramcalc.commands.options import MAX_RANK, bounded_count, refuse_given
    from vramcalc.plans import (
        ADAPTER_DTYPES,
        CACHES,
        INFER_QUANTS,
        MAX_BATCH,
        MAX_SEQ_LEN,
        InferPlan,
    )

    for flag in ("dtype", "on"):
        if opts[flag] is not None:
            raise PlanError(f"{_FLAG[flag]} is a --task merge option")
    prompt = 512 if opts["prompt_len"] is None else opts["prompt_len"]
    new = 128 if opts["new_tokens"] is None else opts["new_tokens"]
    context = "128 x the longest context of the catalog (131072)"
    bounded_count("--batch", kw["batch"], MAX_BATCH, "any batch")
    bounded_count("--prompt-len", prompt, MAX_SEQ_LEN, context)
    bounded_count("--new-tokens", new, MAX_SEQ_LEN, context)
    if prompt + new > MAX_SEQ_LEN:
        raise PlanError(f"--prompt-len + --new-tokens = {prompt + new} tokens is beyond "
                        f"{context}; use at most {MAX_SEQ_LEN}")
    bounded_count("--rank", kw["rank"], MAX_RANK, "any model's width")
    given = kw.get("given", frozenset())
    if opts["merged"]:
        refuse_given(given, ("rank", "alpha", "targets"), "--merged has no adapter tensors")
        if opts["adapter_dtype"] is not None:
            raise PlanError("--adapter-dtype: --merged has no adapter tensors")
    quant = "nf4" if kw["quant"] is None else _one_of("--quant", kw["quant"], INFER_QUANTS)
    if quant not in ("nf4", "fp4"):
        refuse_given(given, ("double_quant",), f"only with a 4-bit base (--quant nf4 or fp4), "
                     f"not {quant}")
    attn = kw["attn"]
    if attn not in ("sdpa", "eager"):
        raise PlanError(f"--attn with --task infer takes sdpa or eager, got '{attn}'")
    return _validated(
        InferPlan, batch_size=kw["batch"], prompt_len=prompt, new_tokens=new, quant=quant,
        double_quant=kw["double_quant"],
        compute_dtype=_one_of("--compute-dtype", kw["compute_dtype"], ("bf16", "fp16", "fp32")),
        rank=kw["rank"], targets=kw["targets"],
        adapter_dtype=_one_of("--adapter-dtype", opts["adapter_dtype"] or "fp32", ADAPTER_DTYPES),
        merged=opts["merged"],
        cache=_one_of("--cache", opts["cache"] or "dynamic", CACHES), attn=attn,
    )


def build_merge_plan(opts: dict[str, Any], kw: dict[str, Any]) -> MergePlan:
    from vramcalc.commands.options import MAX_RANK, bounded_count, refuse_given
    from vramcalc.plans import ADAPTER_DTYPES, DTYPES16, MERGE_BASES, MERGE_ON, MergePlan

    for flag in ("prompt_len", "new_tokens", "cache", "merged"):
        if opts[flag] not in (None, False):
            raise PlanError(f"{_FLAG[flag]} is a --task infer option")
    bounded_count("--rank", kw["rank"], MAX_RANK, "any model's width")
    base = "none" if kw["quant"] is None else kw["quant"]
    if base not in MERGE_BASES:
        raise PlanError(f"--quant with --task merge takes none (a 16-bit base), nf4 or fp4; "
                        f"got '{base}'")
    if base == "none":
        refuse_given(kw.get("given", frozenset()), ("double_quant",),
                     "only with a 4-bit base (--quant nf4 or fp4)")
    return _validated(
        MergePlan, rank=kw["rank"], targets=kw["targets"],
        dtype=_one_of("--dtype", opts["dtype"] or "bf16", DTYPES16),
        adapter_dtype=_one_of("--adapter-dtype", opts["adapter_dtype"] or "fp32", ADAPTER_DTYPES),
        on=_one_of("--on", opts["on"] or "gpu", MERGE_ON), base_quant=base,
        double_quant=kw["double_quant"],
    )


# ---- running ----------------------------------------------------------------------------


def _title(est: Estimate, plan: InferPlan | MergePlan) -> str:
    from vramcalc.plans import InferPlan

    head = f"{est.model} ({est.params / 1e9:.2f} B params)"
    if isinstance(plan, InferPlan):
        adapter = "merged" if plan.merged else f"r={plan.rank} {plan.adapter_dtype}"
        return (f"{head}, generate(): {plan.quant}, adapter {adapter}, batch "
                f"{plan.batch_size} x ({plan.prompt_len} prompt + {plan.new_tokens} new), "
                f"{plan.cache} cache")
    base = plan.dtype if plan.base_quant == "none" else plan.base_quant
    return f"{head}, merge_and_unload() into {base} on the {plan.on.upper()}, r={plan.rank}"


TIME_FLAGS = {"dataset_tokens": "--dataset-tokens", "epochs": "--epochs", "price": "--price",
              "prices": "--prices"}


def run_task(command: str, task: str, opts: dict[str, Any], kw: dict[str, Any]) -> None:
    from vramcalc.commands.common import resolve_model_arg
    from vramcalc.commands.options import margin_bytes, refuse_given

    given = [flag for name, flag in TIME_FLAGS.items() if kw.get(name)]
    if given:
        raise PlanError(f"{', '.join(given)}: only with --task train (the time of a "
                        "training run); --task infer gives prefill and decode speed per GPU")
    if kw.get("model") is None:
        raise PlanError(f"--task {task} needs --model MODEL")
    refuse_train_only(task, kw)
    margin_b = margin_bytes(kw["margin"])
    target = None
    if command == "plan":
        from vramcalc.commands.targets import plan_target

        target = plan_target(kw.get("gpu"), kw.get("gpu_memory"))
        if target is None:
            refuse_given(kw.get("given", frozenset()), ("margin",),
                         "only with --gpu NAME or --gpu-memory GIB (the card to fit in)")
    spec = resolve_model_arg(kw["model"])  # the door of every command, with its notes
    plan = build_infer_plan(opts, kw) if task == "infer" else build_merge_plan(opts, kw)
    from vramcalc.memory.program.trainable import lora_targets

    lora_targets(spec, plan.lora_plan())  # an unknown target module: one Error line
    from vramcalc.plans import InferPlan

    if isinstance(plan, InferPlan):
        limit = spec.max_position_embeddings
        if limit is not None and plan.prompt_len + plan.new_tokens > limit:
            warn(f"warning: --prompt-len + --new-tokens = {plan.prompt_len + plan.new_tokens} "
                 f"is longer than {spec.name}'s max_position_embeddings ({limit}); "
                 "estimating anyway")
    if command == "check":
        if kw.get("max_") is not None:
            raise PlanError(f"--max: check --task {task} gives a verdict only; use 'vramcalc "
                            f"plan --task {task} --gpu NAME --max ...'")
        _check(spec, plan, kw)
        return

    max_ = kw.get("max_")
    if max_ is not None:
        if task != "infer":
            raise PlanError("--max is for --task train or --task infer")
        if max_ not in INFER_MAX:
            raise PlanError(f"--max with --task infer takes one of {', '.join(INFER_MAX)}, "
                            f"got '{max_}'")
        if target is None:
            raise PlanError("--max needs --gpu NAME or --gpu-memory GIB (the card to fit in)")
        from vramcalc.api import largest
        from vramcalc.commands.common import echo_max

        result = largest(spec, plan, max_, target, margin_b)  # type: ignore[arg-type]
        if kw["json_output"]:
            print_json(result.to_json())
        else:
            other = (f"--batch {plan.batch_size}" if max_ == "prompt-len" else  # type: ignore[union-attr]
                     f"--prompt-len {plan.prompt_len}")  # type: ignore[union-attr]
            echo_max(result, f"{other}, --new-tokens {plan.new_tokens}")  # type: ignore[union-attr]
        if not result.fits:
            raise typer.Exit(EXIT_DOES_NOT_FIT)
        return
    from vramcalc.api import task_step

    plan_gpu = kw.get("gpu")
    answer = task_step(spec, plan, target=target, margin_bytes=margin_b,
                       time_gpu=plan_gpu if isinstance(plan_gpu, str) else None)
    if kw["json_output"]:
        print_json(answer.to_json())
    else:
        _render(answer)
    if not answer.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _render(result: TaskResult) -> None:
    """The estimate, generate()'s speed, a merge's size on disk, and with a card its
    verdict (api.verdict_on: the rule of a training plan)."""
    from rich.console import Console

    from vramcalc.render import print_task_breakdown

    est, plan, v, speed = result.estimate, result.plan, result.verdict, result.speed
    console = Console()
    print_task_breakdown(est, _title(est, plan), console, getattr(plan, "adapter_dtype", None))
    if speed is not None:
        from vramcalc.timing.cost import describe_infer

        console.print(describe_infer(speed), highlight=False)
    if "disk_bytes" in result.extras:
        console.print(f"merged checkpoint on disk: {result.extras['disk_bytes'] / GiB:.2f} GiB "
                      "(safetensors tensors)")
    if v is not None:
        color = {"fits": "green", "tight": "yellow"}.get(v.certainty, "red")
        console.print(
            f"[{color}]{v.now.word}[/{color}] {v.gpu}: needs "
            f"{est.required_device_bytes / GiB:.2f} GiB + {v.margin_bytes / GiB:.2f} GiB "
            f"margin, the card offers {v.memory_bytes / GiB:.2f} GiB (headroom "
            f"{v.headroom_bytes / GiB:+.2f} GiB)", highlight=False)
        if v.certainty == "tight":
            console.print(v.now.tight_reason, highlight=False)


def _check(spec: ModelSpec, plan: InferPlan | MergePlan, kw: dict[str, Any]) -> None:
    """`check --task infer|merge`: the estimate against each GPU (detected, --gpu, or
    --gpu-memory), by check's rule and verdict type (api.verdict_on: required + margin <=
    free memory, tight inside the band or the spread; empty: the usable total)."""
    from vramcalc.commands.targets import check_targets

    gpu: list[str] = kw.get("gpu") or []  # no --gpu: detected GPUs or --gpu-memory
    gpu_memory: float | None = kw.get("gpu_memory")
    margin = kw["margin"]
    if gpu and gpu_memory is not None:
        raise PlanError("give either --gpu NAME or --gpu-memory GIB, not both")
    from vramcalc.api import TaskResult, check_task
    from vramcalc.commands.options import margin_bytes as to_bytes

    margin_bytes = to_bytes(margin)
    report = check_task(spec, plan, check_targets(gpu, gpu_memory), margin_bytes)
    best, est = report.best, report.estimate
    if kw["json_output"]:
        print_json(report.to_json())
    else:
        _render(TaskResult(estimate=est, plan=plan, extras=report.extras))
        where = best.target.where
        if best.fits_free:
            typer.echo(f"{best.now.word} on {where}: {best.headroom_bytes / GiB:+.2f} GiB "
                       f"headroom (margin {margin:g} GiB)")
            if best.certainty == "tight":
                typer.echo(best.now.tight_reason)
        else:
            # on stdout, like the training verdict
            typer.echo(f"does NOT fit on {where}: needs {est.required_device_bytes / GiB:.2f} "
                       f"GiB + {margin:g} GiB margin, {best.target.free_bytes / GiB:.2f} GiB free")
        from vramcalc.timing.cost import describe_infer

        for t in report.times.values():
            typer.echo(describe_infer(t))
    if not best.fits_free:
        raise typer.Exit(EXIT_DOES_NOT_FIT)
