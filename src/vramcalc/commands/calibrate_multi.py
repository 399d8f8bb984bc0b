"""`vramcalc calibrate multi`: measure one training point on several GPUs of this machine.

parse -> gather -> render: the options become a TrainPlan and a ParallelPlan; the GPUs,
the heavy libraries and the strategy are checked before anything starts; random weights
are built from the spec (unless --weights); `accelerate launch` runs one process per GPU
(vramcalc.calibrate.multi_gpu_run); every rank's peaks are merged into OUT/merged.json and
the estimate of the same point (what `vramcalc plan ... --json` prints) is written next
to it as OUT/plan.json. `--device cpu` runs the same launch on CPU with gloo (ddp only):
a smoke test of the launch and the merge, with no GPU readings.

torch, transformers, peft and accelerate are only imported by the launched processes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vramcalc.commands.common import (
    print_json,
    reports_errors,
    resolve_model_arg,
    uninstalled,
)
from vramcalc.commands.options import JsonOpt, build_plan, with_plan_options
from vramcalc.commands.parallel import (
    BalanceOpt,
    OffloadOpt,
    OrigParamsOpt,
    ShardingOpt,
    StrategyOpt,
    parallel_from_options,
)
from vramcalc.errors import CalibrationError, MissingExtraError, NoGpuError
from vramcalc.units import GiB

NO_EXTRA = ("calibrate multi needs {} (missing); pip install 'qlora-vramcalc[calibrate]' "
            "(accelerate is part of it)")

ModelReq = Annotated[
    str, typer.Option("--model", "-m", help="Catalog name, alias, spec YAML or config.json path.")
]
GpusReq = Annotated[
    int, typer.Option("--gpus", help="GPUs to use, one process each (device-map: one process).")
]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", help="Checkpoint folder or HF hub id; default: random weights "
                 "from the spec."),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Folder for merged.json, plan.json and the launch log (a folder "
                 "or a new path, never a file); default: "
                 "multi/<model>-<strategy>-<N>gpu-<time> in the user data folder."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="cuda, or cpu: a smoke test of the launch and the merge "
                      "(gloo, ddp only, no GPU readings).")
]
TimeoutOpt = Annotated[int, typer.Option("--timeout", help="Seconds before the launch is "
                                         "stopped.")]


def visible_gpus(environ: dict[str, str] | None = None, nvml: Any = None) -> int:
    """GPUs the launched processes can use: CUDA_VISIBLE_DEVICES when set, else NVML's
    count. NoGpuError when NVML is missing or finds none."""
    env = os.environ if environ is None else environ
    from vramcalc.hardware.devices import query_devices

    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(query_devices(nvml=nvml))
    except NoGpuError:
        return 0


def missing_libraries(plan: Any, find: Any = None) -> list[str]:
    """The launched processes' imports that are not installed."""
    needed = ["torch", "transformers", "peft", "accelerate"]
    if plan.method == "qlora" or plan.optimizer not in ("adamw_torch", "adamw_torch_fused", "sgd"):
        needed.append("bitsandbytes")
    return uninstalled(needed, find)


@reports_errors
@with_plan_options
def multi(
    model: ModelReq,
    plan_options: dict[str, Any],
    gpus: GpusReq = 2,
    strategy: StrategyOpt = None,
    offload: OffloadOpt = "none",
    sharding_strategy: ShardingOpt = "FULL_SHARD",
    use_orig_params: OrigParamsOpt = False,
    device_map: BalanceOpt = "balanced",
    steps: StepsOpt = 3,
    weights: WeightsOpt = None,
    out: OutDirOpt = None,
    device: DeviceOpt = "cuda",
    timeout: TimeoutOpt = 1800,
    json_output: JsonOpt = False,
) -> None:
    """Measure one training point on several GPUs: one process per GPU (accelerate launch).

    Every rank's torch peak allocated / reserved, NVML peak used and peak host RSS go to
    OUT/merged.json; the estimate of the same point (as 'vramcalc plan ... --json' prints
    it) goes to OUT/plan.json. Strategies: ddp, fsdp (PEFT's FSDP-QLoRA settings;
    --offload cpu), device-map (one process). Steps run in a plain loop (--loop is
    ignored), with the optimizer HF Trainer builds for --optimizer. Every process runs with
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1.

    \b
    Examples:
      vramcalc calibrate multi -m llama-3.1-8b --gpus 2 --strategy fsdp --batch 4
      vramcalc calibrate multi -m llama-3.1-8b --gpus 2 --strategy ddp --out ddp8b
      vramcalc calibrate multi -m ./tiny.yaml --gpus 2 --device cpu --quant none
    """
    if steps <= 0:
        raise CalibrationError(f"--steps must be a positive integer, got {steps}")
    if device not in ("cuda", "cpu"):
        raise CalibrationError(f"--device must be cuda or cpu, got '{device}'")
    if out is not None:  # checked now, created once the launch is about to run
        from vramcalc.user_files import output_folder

        output_folder(out, "--out", create=False)
    spec = resolve_model_arg(model)
    plan = build_plan(**plan_options)
    parallel = parallel_from_options(gpus, strategy or "ddp", offload, None, sharding_strategy,
                                     use_orig_params, device_map)
    assert parallel is not None
    from vramcalc.calibrate.multi_gpu_run import LaunchError, check_launchable, run_point

    try:
        check_launchable(parallel, device)  # type: ignore[arg-type]
    except ValueError as err:
        raise CalibrationError(str(err)) from None
    if device == "cuda":
        seen = visible_gpus()
        if seen < parallel.gpus:
            raise NoGpuError(f"--gpus {parallel.gpus} but {seen} CUDA GPU(s) visible; lower "
                             "--gpus or check CUDA_VISIBLE_DEVICES")
    missing = missing_libraries(plan)
    if missing:
        raise MissingExtraError(NO_EXTRA.format(", ".join(missing)))

    from vramcalc.commands.parallel import parallel_to_dict
    from vramcalc.corrections.factors import user_data_dir
    from vramcalc.memory.multi_gpu import estimate_parallel

    pe = estimate_parallel(spec, plan, parallel)
    folder = out or user_data_dir() / "multi" / (
        f"{spec.name}-{parallel.strategy}-{parallel.gpus}gpu-{time.strftime('%Y%m%d-%H%M%S')}")
    from vramcalc.user_files import output_folder, write_text

    output_folder(folder, "--out" if out is not None else "output folder")
    estimated = parallel_to_dict(pe, plan)
    write_text(folder / "plan.json", json.dumps(estimated, indent=2), "--out")

    scratch: str | None = None
    try:
        if weights is None:
            from vramcalc.calibrate import campaign

            scratch = tempfile.mkdtemp(prefix="vramcalc-weights-")
            try:
                campaign.build_weights(model, scratch, device)
            except RuntimeError as err:
                raise CalibrationError(str(err).splitlines()[0]) from None
            source = scratch
        else:
            source = campaign.fetch_weights(weights)
        try:
            merged = run_point(source, plan, parallel, folder, steps=steps,
                               timeout_s=timeout, device=device)  # type: ignore[arg-type]
        except LaunchError as err:
            raise CalibrationError(str(err)) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if json_output:
        print_json({"out": str(folder), "measured": merged, "estimated": estimated})
        return
    _render(merged, pe.busiest.peak_device_bytes, folder)


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GiB:.2f}"


def _render(merged: dict[str, Any], est_device: int, folder: Path) -> None:
    typer.echo(f"{'rank':>4} {'alloc GiB':>10} {'reserved GiB':>13} {'NVML GiB':>9} "
               f"{'host RSS GiB':>13}")
    for r in merged["ranks"]:
        typer.echo(f"{r['rank']:>4} {_gib(r['max_allocated']):>10} {_gib(r['max_reserved']):>13}"
                   f" {_gib(r['nvml_peak_used']):>9} {_gib(r['host_peak_rss']):>13}")
    measured = merged["nvml_peak_used"]
    line = f"estimate, busiest GPU: {est_device / GiB:.2f} GiB device"
    if measured:
        err = 100 * (est_device / measured - 1)
        line += f"; measured NVML peak {measured / GiB:.2f} GiB ({err:+.1f}%)"
    typer.echo(line)
    typer.echo(f"saved {folder / 'merged.json'} and {folder / 'plan.json'}")
