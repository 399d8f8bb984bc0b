"""`vramcalc calibrate`: measure real QLoRA steps on this GPU, fit and replay corrections.

- `calibrate run` (or `calibrate --model M`): a small matrix of points around one plan,
  each measured in a fresh process (vramcalc.calibrate.campaign), saved after every point
  to DATA/runs/<gpu>-<time>.json (vramcalc.calibrate.store);
- `calibrate fit`: least-squares corrections (vramcalc.corrections.factors) from every measurement
  under DATA, each entry with its leave-one-architecture-out verdict (`helps`), written
  atomically to the user's corrections file (merged with its other entries);
- `calibrate report`: raw and corrected estimate vs measured peak for every point, with
  leave-one-architecture-out errors; no GPU needed.

DATA defaults to the user data folder (vramcalc.corrections.factors.user_data_dir: platformdirs,
or $VRAMCALC_DATA_DIR); in a source checkout, `--data calibration` replays the project's
own measurements, and `fit --data calibration --out src/vramcalc/data/corrections.json`
refits the shipped file.

torch, transformers, bitsandbytes and peft are only ever imported by the worker processes.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer

from vramcalc.commands.common import print_json, reports_errors, uninstalled, warn
from vramcalc.commands.options import (
    JsonOpt,
    build_plan,
    with_plan_options,
)
from vramcalc.errors import CalibrationError, MissingExtraError, NoGpuError
from vramcalc.plans import TrainPlan
from vramcalc.units import GiB

EXTRAS = ("torch", "transformers", "bitsandbytes", "peft")
NO_GPU = "no CUDA GPU: run calibrate on a machine with an NVIDIA GPU"
app = typer.Typer(
    help="Measure real QLoRA steps on a GPU, fit corrections, replay the measurements.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # as the main app: plain help and errors
)

OptModel = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Catalog name, alias, spec YAML or config.json path."),
]
MatrixOpt = Annotated[
    str,
    typer.Option("--matrix", help="'default' (6 points around the plan) or a JSON file."),
]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps per point.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Checkpoint folder or HF hub id (downloaded); default: random weights from the spec.",
    ),
]
RemoteOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the checkpoint's own model code.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Calibration folder (runs/ goes under it; a folder or a new "
                 "path, never a file); default: the user data folder."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Calibration folder holding raw/*.jsonl and runs/*.json; "
                 "default: the user data folder."),
]
FitOutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Corrections file to write (entries of other GPUs / stacks "
                 "in it are kept); default: the user's corrections.json. Writes a new file, or "
                 "replaces a corrections file you can write (its mode kept)."),
]


def _data_dir(arg: Path | None) -> Path:
    from vramcalc.corrections.factors import user_data_dir

    return arg if arg is not None else user_data_dir()


# ---- matrix ----------------------------------------------------------------------------------


def default_matrix(plan: TrainPlan) -> list[TrainPlan]:
    """The plan, then one change at a time: batch x2, seq-len x2, checkpointing toggled,
    the other attention, another optimizer (6 points)."""
    other_attn = "eager" if plan.attn != "eager" else "sdpa"
    other_opt = "adamw_torch" if plan.optimizer != "adamw_torch" else "paged_adamw_8bit"
    changes: list[dict[str, Any]] = [
        {},
        {"batch_size": plan.batch_size * 2},
        {"seq_len": plan.seq_len * 2},
        {"gradient_checkpointing": not plan.gradient_checkpointing},
        {"attn": other_attn},
        {"optimizer": other_opt},
    ]
    return [plan.model_copy(update=c) for c in changes]


def read_matrix(arg: str, plan: TrainPlan) -> list[TrainPlan]:
    """'default', or a JSON list of {"plan": {TrainPlan fields}} applied over `plan`
    (the campaign format of calibration/matrices/; a "model" key there is ignored)."""
    if arg == "default":
        return default_matrix(plan)
    import json

    from pydantic import ValidationError

    from vramcalc.user_files import read_text

    try:
        items = json.loads(read_text(Path(arg), f"--matrix {arg}", CalibrationError))
        if not isinstance(items, list):
            raise ValueError("not a JSON list")
        base = plan.model_dump()
        return [TrainPlan.model_validate({**base, **(i.get("plan") or {})}) for i in items]
    except CalibrationError:
        raise
    except (OSError, ValueError, AttributeError, ValidationError) as err:
        msg = str(err).splitlines()[0]
        raise CalibrationError(f"--matrix {arg}: {msg}") from None


# ---- preconditions ---------------------------------------------------------------------------


def _require_gpu() -> Any:
    """The first NVIDIA device (gpus.DeviceInfo); NoGpuError (exit 4) when there is none."""
    from vramcalc.hardware.devices import query_devices

    try:
        devices = query_devices()
    except NoGpuError:
        raise NoGpuError(NO_GPU) from None
    if not devices:
        raise NoGpuError(NO_GPU)
    return devices[0]


def _missing_extras() -> list[str]:
    return uninstalled(EXTRAS)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---- run ---------------------------------------------------------------------------------


def _point_line(plan: TrainPlan, result: dict[str, Any], est_alloc: int) -> str:
    head = (f"b{plan.batch_size} s{plan.seq_len} r{plan.rank} "
            f"gc={int(plan.gradient_checkpointing)} {plan.attn} {plan.optimizer}")
    if result.get("error"):
        return f"{head}: error {str(result['error']).splitlines()[0][:120]}"
    if result.get("oom"):
        return f"{head}: out of memory ({result.get('oom_phase')})"
    from vramcalc.corrections.points import peaks_from_record

    alloc = peaks_from_record(result)[0] or 0
    err = f"{100 * (est_alloc / alloc - 1):+.1f}%" if alloc else "n/a"
    step = result.get("step_seconds")  # run.step_seconds: median after the first step
    timed = f", step {step:.3g} s" if isinstance(step, (int, float)) else ""
    return (f"{head}: peak alloc {alloc / GiB:.2f} GiB, estimate {est_alloc / GiB:.2f} "
            f"({err}){timed}")


@reports_errors
@with_plan_options
def run(
    ctx: typer.Context,
    model: OptModel = None,
    plan_options: dict[str, Any] | None = None,
    matrix: MatrixOpt = "default",
    steps: StepsOpt = 3,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteOpt = False,
    out: OutOpt = None,
) -> None:
    """Measure a matrix of QLoRA points around a plan on this GPU, one process each.

    Random weights are built from the spec unless --weights names a folder or a hub id
    (the only case that downloads). Every point, out-of-memory ones included, is saved to
    OUT/runs/ as soon as it is measured; Ctrl-C keeps them. Then run 'vramcalc calibrate fit'.

    \b
    Examples:
      vramcalc calibrate run --model llama-3.1-8b --batch 4 --seq-len 1024
      vramcalc calibrate run -m qwen2.5-0.5b --matrix my-matrix.json
      vramcalc calibrate run -m ./my-model/config.json --weights ./my-model
    """
    if ctx.info_name != "run":  # the group callback: `vramcalc calibrate [--model M]`
        if ctx.invoked_subcommand is not None:
            return
        if model is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
    if model is None:
        raise CalibrationError("--model is required (see 'vramcalc calibrate run --help')")
    if steps <= 0:
        raise CalibrationError(f"--steps must be a positive integer, got {steps}")
    from vramcalc.models.resolve import resolve_model

    spec = resolve_model(model)
    base = build_plan(**(plan_options or {}))
    plans = read_matrix(matrix, base)
    from vramcalc.user_files import output_folder

    output_folder(_data_dir(out), "--out" if out is not None else "data folder",
                  create=False)  # runs/ is created in it when the first point is saved
    device = _require_gpu()
    missing = _missing_extras()
    if missing:
        from vramcalc.calibrate.campaign import NO_EXTRA

        raise MissingExtraError(NO_EXTRA.format(", ".join(missing)))
    _run_points(spec, model, plans, device, steps, weights, trust_remote_code, _data_dir(out))


def _run_points(  # type: ignore[no-untyped-def]
    spec, model_arg: str, plans: list[TrainPlan], device, steps: int,
    weights: str | None, trust_remote_code: bool, out: Path,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vramcalc import __version__
    from vramcalc.calibrate import campaign, store
    from vramcalc.memory.estimate import estimate

    env = store.Environment(
        gpu_name=device.name,
        gpu_memory_bytes=device.total_bytes,
        driver_version=device.driver_version,
        cuda_version=device.cuda_driver_version,
        torch=_version("torch"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        bitsandbytes=_version("bitsandbytes"),
        vramcalc=__version__,
    )
    run_doc = store.new_run(env)
    path = out / store.RUNS_DIR / store.run_file_name(run_doc)
    scratch: str | None = None
    done = 0
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task(f"{spec.name}: weights", total=len(plans))
            if weights is None:
                scratch = tempfile.mkdtemp(prefix="vramcalc-weights-")
                campaign.build_weights(model_arg, scratch, "cuda")
                weights_dir = scratch
            else:
                weights_dir = campaign.fetch_weights(weights)
            for plan in plans:
                progress.update(task, description=f"{spec.name} b{plan.batch_size} "
                                                  f"s{plan.seq_len}")
                est = estimate(spec, plan)
                job = {
                    "spec": spec.model_dump(mode="json"),
                    "plan": plan.model_dump(mode="json"),
                    "weights_dir": weights_dir,
                    "steps": steps,
                    "device": "cuda",
                    "trust_remote_code": trust_remote_code,
                }
                result = campaign.measure_in_subprocess(job)
                run_doc.points.append(
                    store.RunPoint(model=spec.name, plan=plan, steps=steps,
                                   prediction=store.Prediction.of(est), measurement=result)
                )
                if result.get("versions", {}).get("cuda"):
                    env.cuda_version = result["versions"]["cuda"]
                store.write_run(path, run_doc)
                done += 1
                progress.console.print(_point_line(plan, result, est.peak_allocated_bytes))
                progress.advance(task)
    except KeyboardInterrupt:
        warn(f"Interrupted: kept {done} measured point(s) in {path}" if done
             else "Interrupted before any point was measured.")
        raise typer.Exit(130) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    typer.echo(f"saved {done} point(s) to {path}; next: vramcalc calibrate fit")


# ---- replay, fit, report -------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _print_summary(summary: dict[str, Any]) -> None:
    typer.echo(f"{summary['n_measured']} measured point(s) of {', '.join(summary['models'])}")
    for kind in ("allocated", "reserved", "device"):
        r, c = summary["raw"][kind], summary["corrected"][kind]
        typer.echo(
            f"peak {kind:9}: raw median |err| {_pct(r['median_abs_error'])} "
            f"worst {_pct(r['worst_abs_error'])}; corrected (leave-one-architecture-out) "
            f"median {_pct(c['median_abs_error'])} worst {_pct(c['worst_abs_error'])}"
        )


def _print_installed() -> None:
    """The corrections plan / check may apply, their origin and held-out verdict."""
    from vramcalc.corrections.factors import SHIPPED, available, none_installed, verdict_text

    entries = available()
    if not entries:
        typer.echo(f"corrections: none ({none_installed()})")
    for e, origin in entries:
        use = "applied when it matches" if e.helps else "not applied (did not help)"
        typer.echo(f"corrections {e.key} ({'shipped' if origin == SHIPPED else origin}): "
                   f"{e.n_points} points, {verdict_text(e)}; {use}")


@app.command("report")
@reports_errors
def report(data: DataOpt = None, json_output: JsonOpt = False) -> None:
    """Replay measurements: raw and corrected estimate vs measured peak, per point.

    Corrected errors are leave-one-architecture-out: each model's points are predicted
    with factors fitted on the other models only. Also lists the corrections that plan
    and check may apply (shipped and user). No GPU needed. DATA defaults to the user
    data folder; in a source checkout, --data calibration replays the project's own
    measurements.

    \b
    Examples:
      vramcalc calibrate report
      vramcalc calibrate report --data calibration --json
    """
    from vramcalc.api import calibration_report

    result = calibration_report(data, say=warn)
    if json_output:
        print_json(result.to_json())
        return
    if not result.points:
        warn(f"no measured points under {result.folder} (raw/*.jsonl, runs/*.json): measure some "
             "with 'vramcalc calibrate run' on a GPU")
        _print_installed()
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Fits 80 columns (a pipe, a CI log): numbers never wrap, names fold.
    table = Table(title="calibration replay, peak allocated in GiB (meas: measured; corr: "
                  "corrected, leave-one-architecture-out; err %: estimate vs measured)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("model", "batch x seq, rank, ckpt, attn, optim", "meas", "raw", "corr",
                "raw err", "corr err"):
        text = not col.startswith(("meas", "raw", "corr"))
        table.add_column(col.replace(" err", "\nerr %"), justify="left" if text else "right",
                         no_wrap=not text, overflow="fold", ratio=1 if text else None)
    for p in result.points:
        meas = p["measured_peak_allocated_bytes"]
        est = p["estimated_peak_allocated_bytes"]
        err = p.get("error_allocated", {})
        setting = (f"{p['batch_size']}x{p['seq_len']} r{p['rank']} "
                   f"{'ckpt' if p['gradient_checkpointing'] else 'no-ckpt'} {p['attn']} "
                   f"{p['optimizer']}")
        table.add_row(
            p["model"], setting,
            "OOM" if p["oom"] else (f"{meas / GiB:.2f}" if meas else "-"),
            f"{est['raw'] / GiB:.2f}", f"{est['corrected'] / GiB:.2f}",
            _pct(err.get("raw")).rstrip("%") if err else "-",
            _pct(err.get("corrected")).rstrip("%") if err else "-",
        )
    Console().print(table)
    _print_summary(result.summary)
    _print_installed()


@app.command("fit")
@reports_errors
def fit_cmd(data: DataOpt = None, out: FitOutOpt = None, json_output: JsonOpt = False) -> None:
    """Fit corrections on every measured point and write them to the user's corrections file.

    One entry per GPU family and stack (torch and transformers major.minor), with the
    number of points behind it and the verdict of a leave-one-architecture-out replay:
    plan and check apply an entry only where it reduced the held-out error. The file
    (default: corrections.json in the user data folder) is written atomically; its
    entries for other GPUs / stacks are kept, and a user entry replaces the shipped one
    of the same GPU family and stack.

    \b
    Examples:
      vramcalc calibrate fit
      vramcalc calibrate fit --data ./calibration --out corrections.json
    """
    from vramcalc.api import fit_corrections

    fitted = fit_corrections(data, out, say=warn)
    if json_output:
        print_json(fitted.to_json())
        return
    from vramcalc.corrections.factors import verdict_text

    for e in fitted.entries:
        typer.echo(
            f"{e.key}: k_act {e.k_act:.4f}, k_slack {e.k_slack:.4f}, context "
            f"{e.context_bytes / 2**20:.0f} MiB ({e.n_points} points: {', '.join(e.models)}); "
            f"{verdict_text(e)}: {'applied' if e.helps else 'NOT applied (did not help)'}"
        )
    _print_summary(fitted.report.summary)
    typer.echo(f"wrote {fitted.path}")


app.callback(invoke_without_command=True)(run)
app.command("run")(run)


def _register_multi() -> None:
    from vramcalc.commands.calibrate_multi import multi

    app.command("multi")(multi)


_register_multi()
