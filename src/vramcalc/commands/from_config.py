"""`--from-config FILE` for plan / check / sweep.

`with_from_config` wraps a command made by `options.with_plan_options`: it adds
`--from-config FILE` (axolotl, TRL / TrainingArguments, LLaMA-Factory; see
`vramcalc.training_config`), fills every plan option the user did not give on the command
line from the file (typer's parameter source tells given from default), takes the model
from the file when --model is absent, and prints on stderr the settings it used and every
memory-relevant key it does not model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer

from vramcalc.commands.common import warn
from vramcalc.commands.options import with_signature

R = TypeVar("R")
_CTX = "vramcalc_from_config_ctx"

FromConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--from-config",
        help="Read the model and training settings from an axolotl YAML, a TRL SFTConfig / "
        "TrainingArguments JSON or YAML, or a LLaMA-Factory YAML; flags given on the "
        "command line override the file.",
        dir_okay=False,
    ),
]


def _flag(option: str) -> str:
    return "--" + {"batch": "batch", "dora": "dora"}.get(option, option.replace("_", "-"))


# ctx.meta key: the plan options --from-config filled (a --trainer preset leaves them)
CONFIG_FILLED = "vramcalc_config_filled"


def apply_training_config(
    path: Path, kwargs: dict[str, Any], given: set[str], model_key: str = "model"
) -> set[str]:
    """Fill `kwargs` (plan options and the model) from the file, except options in `given`;
    the options filled."""
    from vramcalc.errors import PlanError
    from vramcalc.training_config import read_training_config

    tc = read_training_config(path)
    filled: set[str] = set()
    used: list[str] = []
    later: list[str] = []
    for option, value in tc.options.items():
        if option == "strategy" and (kwargs.get("gpus") is None or option not in kwargs):
            later.append(f"note: {tc.used[option]}: planned for one GPU; give --gpus N to "
                         "plan it over N GPUs (--strategy fsdp)")
            continue
        if option in ("kbit_prep", "adapter_dtype") and _base16_given(tc.options, kwargs,
                                                                   given):
            note = (f"note: {tc.format}'s preparation of a quantized base (--kbit-prep, "
                    "--adapter-dtype) not used: the command line plans a 16-bit base")
            if note not in later:
                later.append(note)
            continue
        if option in kwargs and option not in given:
            kwargs[option] = value
            filled.add(option)
            used.append(f"{_flag(option)} {value} ({tc.used[option]})")
    if kwargs.get(model_key) is None:
        if tc.model is None:
            raise PlanError(f"--from-config {path}: the file names no base model; add --model")
        kwargs[model_key] = tc.model
        used.insert(0, f"--model {tc.model}")
    overridden = sorted(_flag(o) for o in given if o in tc.options)
    line = f"from {path} ({tc.format}): " + (", ".join(used) or "no plan settings")
    if overridden:
        line += f"; command line overrides {', '.join(overridden)}"
    warn(line)
    for note in tc.notes:
        warn(f"note: {note}")
    for line in later:
        warn(line)
    for key in tc.unmodelled:
        warn(f"not modelled: {key}")
    if tc.ignored:
        warn(f"ignored keys (no memory effect, or unknown to vramcalc): {', '.join(tc.ignored)}")
    return filled


def _base16_given(options: dict[str, Any], kwargs: dict[str, Any], given: set[str]) -> bool:
    """The file plans a quantized base (method qlora) and the command line a 16-bit one
    (--method lora / full, or --quant none): the trainer's kbit_prep / adapter_dtype for the
    quantized base (training_config.py) do not apply."""
    if options.get("method") != "qlora":
        return False
    return (("method" in given and kwargs.get("method") in ("lora", "full"))
            or ("quant" in given and kwargs.get("quant") == "none"))


def with_from_config(
    func: Callable[..., R], *, model_required: bool = True
) -> Callable[..., R]:
    """Add --from-config to a command whose plan options are flat keyword parameters."""
    sig = inspect.signature(func)
    params = []
    for p in sig.parameters.values():
        if p.name == "model" and p.default is inspect.Parameter.empty:
            base, *meta = get_args(p.annotation)
            optional = (base | None, *meta)  # the same metadata on `MODEL | None`
            p = p.replace(annotation=Annotated[optional], default=None)
        params.append(p)
    params.append(inspect.Parameter("from_config", inspect.Parameter.KEYWORD_ONLY,
                                    default=None, annotation=FromConfigOpt))
    # typer passes the context to one parameter only: share the command's own, if any
    shared = next((p.name for p in params if p.annotation is typer.Context), None)
    if shared is None:
        params.append(inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=typer.Context))

    def wrapper(**kwargs: Any) -> R:
        ctx = kwargs.pop(_CTX) if shared is None else kwargs[shared]
        path = kwargs.pop("from_config")
        if path is not None:
            given = set()
            for name in kwargs:
                source = ctx.get_parameter_source(name)
                if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
                    given.add(name)
            ctx.meta[CONFIG_FILLED] = apply_training_config(path, kwargs, given)
        elif model_required and kwargs.get("model") is None:
            raise typer.BadParameter("give --model MODEL (or --from-config FILE)",
                                     param_hint="'--model'")
        return func(**kwargs)

    return with_signature(wrapper, func, sig.replace(parameters=params))
