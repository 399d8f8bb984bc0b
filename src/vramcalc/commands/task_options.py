"""`--task train|infer|merge` for `plan` and `check`: the options and the dispatch.

`with_task_options("plan")` wraps a command that already has the plan options
(`with_plan_options`): it adds --task and the inference / merge options, and runs
`--task infer|merge` here (vramcalc.inference, pure arithmetic); `--task train` (the
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

if TYPE_CHECKING:
    from vramcalc.inference import InferPlan, MergePlan
    from vramcalc.result import Estimate
    from vramcalc.specs import ModelSpec

R = TypeVar("R")
GiB = 2**30
EXIT_DOES_NOT_FIT = 3
TASKS = ("train", "infer", "merge")
INFER_MAX = ("batch", "prompt-len")

TaskOpt = Annotated[
    str, typer.Option("--task", help="train (a training step), infer (generate() with the "
                      "adapter) or merge (merge_and_unload() of the adapter).")
]
PromptOpt = Annotated[int | None, typer.Option("--prompt-len", help="--task infer: prompt "
                                               "tokens per sequence (default 512).")]
NewTokensOpt = Annotated[int | None, typer.Option("--new-tokens", help="--task infer: tokens "
                                                  "generated per sequence (default 128).")]
AdapterDtypeOpt = Annotated[str | None, typer.Option(
    "--adapter-dtype", help="infer/merge: LoRA weights fp32 (peft's default), bf16 or fp16.")]
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
    "adapter_dtype": (AdapterDtypeOpt, None),
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


def build_infer_plan(opts: dict[str, Any], kw: dict[str, Any]) -> InferPlan:
    from vramcalc.inference import ADAPTER_DTYPES, CACHES, INFER_QUANTS, InferPlan

    for flag in ("dtype", "on"):
        if opts[flag] is not None:
            raise PlanError(f"{_FLAG[flag]} is a --task merge option")
    prompt = 512 if opts["prompt_len"] is None else opts["prompt_len"]
    new = 128 if opts["new_tokens"] is None else opts["new_tokens"]
    for flag, value in (("--batch", kw["batch"]), ("--prompt-len", prompt),
                        ("--new-tokens", new), ("--rank", kw["rank"])):
        if value <= 0:
            raise PlanError(f"{flag} must be a positive integer, got {value}")
    quant = "nf4" if kw["quant"] is None else _one_of("--quant", kw["quant"], INFER_QUANTS)
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
    from vramcalc.inference import ADAPTER_DTYPES, DTYPES16, MERGE_BASES, MERGE_ON, MergePlan

    for flag in ("prompt_len", "new_tokens", "cache", "merged"):
        if opts[flag] not in (None, False):
            raise PlanError(f"{_FLAG[flag]} is a --task infer option")
    if kw["rank"] <= 0:
        raise PlanError(f"--rank must be a positive integer, got {kw['rank']}")
    base = "none" if kw["quant"] is None else kw["quant"]
    if base not in MERGE_BASES:
        raise PlanError(f"--quant with --task merge takes none (a 16-bit base), nf4 or fp4; "
                        f"got '{base}'")
    return _validated(
        MergePlan, rank=kw["rank"], targets=kw["targets"],
        dtype=_one_of("--dtype", opts["dtype"] or "bf16", DTYPES16),
        adapter_dtype=_one_of("--adapter-dtype", opts["adapter_dtype"] or "fp32", ADAPTER_DTYPES),
        on=_one_of("--on", opts["on"] or "gpu", MERGE_ON), base_quant=base,
        double_quant=kw["double_quant"],
    )


# ---- running ----------------------------------------------------------------------------


def _estimate(spec: ModelSpec, plan: InferPlan | MergePlan) -> Estimate:
    from vramcalc.inference import InferPlan, estimate_inference, estimate_merge

    if isinstance(plan, InferPlan):
        return estimate_inference(spec, plan)
    return estimate_merge(spec, plan)


def largest_fitting_infer(spec: ModelSpec, plan: InferPlan, what: str, budget: int) -> int:
    """Largest batch or prompt length whose required memory fits `budget` (0: none)."""
    from vramcalc.inference import estimate_inference

    field = {"batch": "batch_size", "prompt-len": "prompt_len"}[what]

    def fits(n: int) -> bool:
        est = estimate_inference(spec, plan.model_copy(update={field: n}))
        return est.required_device_bytes <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= 1 << 22 and fits(hi):
        lo, hi = hi, hi * 2
    if hi > 1 << 22:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _title(est: Estimate, plan: InferPlan | MergePlan) -> str:
    from vramcalc.inference import InferPlan

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


def _infer_times(spec: ModelSpec, plan: InferPlan | MergePlan, names: list[str]
                 ) -> dict[str, Any]:
    """catalog name -> generate() speed (step_time.InferTime) of an inference plan."""
    from vramcalc.errors import UnknownGpuError
    from vramcalc.gpu_catalog import resolve_gpu
    from vramcalc.inference import InferPlan
    from vramcalc.time_cost import infer_time_on

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


def run_task(command: str, task: str, opts: dict[str, Any], kw: dict[str, Any]) -> None:
    from vramcalc.specs import resolve_model

    given = [flag for name, flag in TIME_FLAGS.items() if kw.get(name)]
    if given:
        raise PlanError(f"{', '.join(given)}: only with --task train (the time of a "
                        "training run); --task infer gives prefill and decode speed per GPU")
    if kw.get("model") is None:
        raise PlanError(f"--task {task} needs --model MODEL")
    spec = resolve_model(kw["model"])
    plan = build_infer_plan(opts, kw) if task == "infer" else build_merge_plan(opts, kw)
    from vramcalc.trainable import lora_targets

    lora_targets(spec, plan.lora_plan())  # an unknown target module: one Error line
    gpu_memory = kw.get("gpu_memory")
    if gpu_memory is not None and gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory}")
    if command == "check":
        _check(spec, plan, kw)
        return
    max_ = kw.get("max_")
    if max_ is not None:
        if task != "infer":
            raise PlanError("--max is for --task train or --task infer")
        if max_ not in INFER_MAX:
            raise PlanError(f"--max with --task infer takes one of {', '.join(INFER_MAX)}, "
                            f"got '{max_}'")
        if gpu_memory is None:
            raise PlanError("--max needs --gpu-memory GIB (the budget to fit in)")
        best = largest_fitting_infer(spec, plan, max_, int(gpu_memory * GiB))  # type: ignore[arg-type]
        if kw["json_output"]:
            print_json({"model": spec.name, "task": task, "max": max_, "value": best,
                        "fits": best > 0, "gpu_memory_bytes": int(gpu_memory * GiB)})
        else:
            typer.echo(f"largest {max_} that fits {gpu_memory:g} GiB: {best}" if best
                       else f"nothing fits in {gpu_memory:g} GiB, not even {max_} 1")
        if best == 0:
            raise typer.Exit(EXIT_DOES_NOT_FIT)
        return
    est = _estimate(spec, plan)
    fits = None if gpu_memory is None else est.required_device_bytes <= gpu_memory * GiB
    plan_gpu = kw.get("gpu")
    if task == "merge" and plan_gpu:
        raise PlanError("--gpu with --task merge: a merge's time is not modeled; give "
                        "--gpu-memory GIB for its fit")
    times = _infer_times(spec, plan, [plan_gpu] if isinstance(plan_gpu, str) else [])
    _output(est, plan, spec, kw["json_output"], gpu_memory, fits, next(iter(times.values()),
                                                                      None))
    if fits is False:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _extras(spec: ModelSpec, plan: InferPlan | MergePlan) -> dict[str, Any]:
    from vramcalc.inference import MergePlan, merge_sizes

    if not isinstance(plan, MergePlan):
        return {}
    sizes = merge_sizes(spec, plan)
    return {"disk_bytes": sizes.disk_bytes, "host_peak_bytes": sizes.host_peak_bytes,
            "device": plan.on}


def _output(est: Estimate, plan: InferPlan | MergePlan, spec: ModelSpec, json_output: bool,
            gpu_memory: float | None, fits: bool | None, speed: Any = None) -> None:
    from vramcalc.render import task_estimate_to_dict

    extras = _extras(spec, plan)
    if speed is not None:
        extras.update(speed._asdict())
    if json_output:
        out = task_estimate_to_dict(est, plan.model_dump(mode="json"))
        out.update(extras)
        if fits is not None:
            out["gpu_memory_bytes"] = int(gpu_memory * GiB)  # type: ignore[operator]
            out["fits"] = fits
        print_json(out)
        return
    from rich.console import Console

    from vramcalc.render import print_task_breakdown

    console = Console()
    print_task_breakdown(est, _title(est, plan), console, getattr(plan, "adapter_dtype", None))
    if speed is not None:
        from vramcalc.time_cost import describe_infer

        console.print(describe_infer(speed), highlight=False)
    if "disk_bytes" in extras:
        console.print(f"merged checkpoint on disk: {extras['disk_bytes'] / GiB:.2f} GiB "
                      "(safetensors tensors)")
    if fits is not None:
        verdict = "[green]fits[/green]" if fits else "[red]does NOT fit[/red]"
        head = gpu_memory - est.required_device_bytes / GiB  # type: ignore[operator]
        console.print(f"{verdict} in {gpu_memory:g} GiB (headroom {head:+.2f} GiB)")


def _check(spec: ModelSpec, plan: InferPlan | MergePlan, kw: dict[str, Any]) -> None:
    """`check --task infer|merge`: the estimate against each GPU (detected, --gpu, or
    --gpu-memory), fits = required + margin <= free memory."""
    from vramcalc.commands import check as check_cmd

    gpu: list[str] = kw.get("gpu") or []  # no --gpu: detected GPUs or --gpu-memory
    gpu_memory: float | None = kw.get("gpu_memory")
    margin = kw["margin"]
    if gpu and gpu_memory is not None:
        raise PlanError("give either --gpu NAME or --gpu-memory GIB, not both")
    if margin < 0:
        raise PlanError(f"--margin must be zero or more GiB, got {margin}")
    margin_bytes = int(margin * GiB)
    est = _estimate(spec, plan)
    targets = check_cmd._targets(gpu, gpu_memory)

    need = est.required_device_bytes + margin_bytes
    times = _infer_times(spec, plan, [t.name for t in targets])
    rows: list[dict[str, Any]] = [
        {"name": t.name, "label": t.label, "total_bytes": t.total_bytes,
         "free_bytes": t.free_bytes, "required_device_bytes": est.required_device_bytes,
         "fits_free": need <= t.free_bytes, "fits_empty": need <= t.total_bytes,
         "headroom_bytes": t.free_bytes - est.required_device_bytes,
         **(times[t.name]._asdict() if t.name in times else {})}
        for t in targets]
    best = max(rows, key=lambda r: r["free_bytes"])
    if kw["json_output"]:
        from vramcalc.render import task_estimate_to_dict

        estimate = task_estimate_to_dict(est, plan.model_dump(mode="json"))
        estimate.update(_extras(spec, plan))
        print_json({"fits": best["fits_free"], "margin_bytes": margin_bytes, "best_gpu": best,
                    "gpus": rows, "estimate": estimate})
    else:
        _output(est, plan, spec, False, None, None)
        where = best["name"] if best["label"] is None else f"GPU {best['label']} ({best['name']})"
        if best["fits_free"]:
            typer.echo(f"fits on {where}: {best['headroom_bytes'] / GiB:+.2f} GiB headroom "
                       f"(margin {margin:g} GiB)")
        else:
            warn(f"does NOT fit on {where}: needs {est.required_device_bytes / GiB:.2f} GiB + "
                 f"{margin:g} GiB margin, {best['free_bytes'] / GiB:.2f} GiB free")
        from vramcalc.time_cost import describe_infer

        for t in times.values():
            typer.echo(describe_infer(t))
    if not best["fits_free"]:
        raise typer.Exit(EXIT_DOES_NOT_FIT)
