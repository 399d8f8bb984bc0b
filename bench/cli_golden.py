"""Golden outputs of the command line: ~120 representative command lines run in-process
(typer's CliRunner), each recorded as [exit_code, stdout, stderr].

A refactor of the commands (parse -> api -> render) must keep these byte-identical unless a
difference is a bug fixed on purpose (say so in the commit).

    python bench/cli_golden.py --out /tmp/golden-before.json          # record
    python bench/cli_golden.py --compare /tmp/golden-before.json      # exit 0: the same

`--fast` runs the estimates without the allocator replay (the tests' switch, conftest.py
_replay_only_where_marked): the same command paths, quicker, for a refactor that touches no
estimate. The environment is pinned (no user data folder, hub offline, 120 columns, two
fake detected GPUs for `check` without --gpu) so that two runs of one tree agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path("tests") / "fixtures"  # relative: run from REPO, so two trees agree

M8 = ["--model", "llama-3.1-8b"]
SMALL = ["--model", "qwen2.5-0.5b"]


def _lines() -> list[list[str]]:
    """The command lines (argv after `vramcalc`)."""
    axolotl = str(FIXTURES / "training_configs" / "axolotl-qlora.yml")
    factory = str(FIXTURES / "training_configs" / "llama-factory-qlora.yaml")
    trl = str(FIXTURES / "training_configs" / "trl-sft.yaml")
    hub_cfg = str(FIXTURES / "hub" / "meta-llama")
    out: list[list[str]] = [
        # listings
        ["models"], ["models", "--json"], ["gpus"], ["gpus", "--json"],
        ["--version"], ["--help"], ["plan", "--help"], ["check", "--help"],
        ["sweep", "--help"], ["compare", "--help"], ["fit", "--help"],
    ]
    # plan: training
    for extra in (
        [], ["--json"], ["--rank", "16", "--batch", "4"], ["--batch", "4", "--json"],
        ["--method", "lora", "--quant", "none"], ["--method", "full", "--json"],
        ["--method", "full", "--optimizer", "adamw_8bit"],
        ["--quant", "int8", "--json"], ["--seq-len", "4096", "--attn", "eager"],
        ["--no-gradient-checkpointing", "--json"], ["--targets", "q_proj,v_proj"],
        ["--dora", "--json"], ["--compute-dtype", "fp16"],
        ["--loop", "plain", "--json"], ["--expandable-segments"],
        ["--loss-kernel", "liger"], ["--loss-kernel", "cce", "--json"],
        ["--loss-kernel", "chunked"],
        ["--batch-layout", "packed", "--json"],
        ["--batch-layout", "padding-free", "--tokens-per-step", "3000", "--batch", "4",
         "--seq-len", "1024"],
        ["--offload-activations", "checkpoints", "--json"], ["--offload-activations", "all"],
        ["--trainer", "trl"], ["--trainer", "unsloth", "--json"], ["--trainer", "axolotl"],
        ["--trainer", "hf", "--json"], ["--trainer", "plain"],
        ["--no-calibration", "--json"],
        ["--gpu", "rtx-4090"], ["--gpu", "rtx-4090", "--json"],
        ["--gpu", "t4", "--batch", "8"], ["--gpu", "a100-80gb", "--margin", "2", "--json"],
        ["--gpu-memory", "24"], ["--gpu-memory", "12", "--json"],
        ["--gpu", "rtx-4090", "--max", "batch"], ["--gpu", "rtx-4090", "--max", "seq-len",
                                                  "--json"],
        ["--gpu-memory", "4", "--max", "batch"],
        ["--gpu", "h100-sxm", "--dataset-tokens", "5000000"],
        ["--gpu", "h100-sxm", "--dataset-tokens", "5000000", "--epochs", "2", "--json"],
        ["--gpu", "h100-sxm", "--price", "h100-sxm=2.5", "--dataset-tokens", "1000000"],
    ):
        out.append(["plan", *M8, *extra])
    out += [
        ["plan", *SMALL, "--batch", "2"], ["plan", "--model", "mixtral-8x7b", "--json"],
        ["plan", "--model", "llama-2-70b", "--gpu", "a100-80gb"],
        ["plan", "--model", hub_cfg + "/Llama-3.2-11B-Vision-Instruct"],
        ["plan", "--from-config", axolotl], ["plan", "--from-config", trl, "--json"],
        ["plan", "--from-config", factory, "--batch", "2"],
    ]
    # plan: multi-GPU
    for extra in (
        ["--gpus", "2", "--strategy", "fsdp"], ["--gpus", "2", "--strategy", "fsdp", "--json"],
        ["--gpus", "4", "--strategy", "ddp", "--gpu", "a100-80gb"],
        ["--gpus", "2", "--strategy", "fsdp", "--gpu", "rtx-4090", "--json"],
        ["--gpus", "2", "--strategy", "fsdp", "--offload", "cpu"],
        ["--gpus", "2", "--strategy", "zero3", "--json"],
        ["--gpus", "2", "--strategy", "zero2"],
        ["--gpus", "2", "--strategy", "device-map", "--json"],
        ["--gpus", "2", "--strategy", "fsdp", "--gpu", "rtx-4090", "--max", "batch"],
        ["--gpus", "2", "--strategy", "fsdp", "--sharding-strategy", "SHARD_GRAD_OP"],
    ):
        out.append(["plan", *M8, *extra])
    out.append(["plan", "--model", "llama-2-70b", "--gpus", "2", "--strategy", "fsdp",
                "--gpu", "rtx-4090"])
    # plan: inference and merge
    for extra in (
        ["--task", "infer"], ["--task", "infer", "--json"],
        ["--task", "infer", "--quant", "nf4", "--prompt-len", "2048", "--new-tokens", "512"],
        ["--task", "infer", "--batch", "8", "--cache", "static", "--json"],
        ["--task", "infer", "--merged", "--gpu", "rtx-4090"],
        ["--task", "infer", "--gpu", "t4", "--json"],
        ["--task", "infer", "--gpu", "rtx-4090", "--max", "batch"],
        ["--task", "infer", "--gpu-memory", "12", "--max", "batch", "--json"],
        ["--task", "infer", "--gpu", "rtx-4090", "--max", "prompt-len", "--json"],
        ["--task", "infer", "--gpu-memory", "2", "--max", "prompt-len"],
        ["--task", "infer", "--gpu-memory", "2", "--max", "batch", "--json"],
        ["--task", "infer", "--gpu", "t4", "--max", "seq-len"],
        ["--task", "merge", "--gpu", "t4", "--max", "batch"],
        ["--task", "merge"], ["--task", "merge", "--json"],
        ["--task", "merge", "--on", "cpu"], ["--task", "merge", "--quant", "nf4", "--json"],
        ["--task", "merge", "--gpu", "rtx-4090"], ["--task", "merge", "--dtype", "fp16",
                                                   "--gpu", "t4", "--json"],
    ):
        out.append(["plan", *M8, *extra])
    # check
    for extra in (
        ["--gpu", "rtx-4090"], ["--gpu", "rtx-4090", "--json"],
        ["--gpu", "rtx-4090", "--gpu", "a100-80gb", "--gpu", "t4"],
        ["--gpu", "rtx-4090", "--gpu", "a100-80gb", "--json"],
        ["--gpu", "t4", "--batch", "16", "--seq-len", "4096"],
        ["--gpu", "t4", "--batch", "16", "--seq-len", "4096", "--json"],
        ["--gpu-memory", "16", "--batch", "8"], ["--gpu-memory", "16", "--json"],
        ["--gpu", "rtx-4090", "--max", "batch"], ["--gpu", "rtx-4090", "--max", "seq-len",
                                                  "--json"],
        ["--gpu", "h100-sxm", "--gpu", "a100-80gb", "--dataset-tokens", "10000000"],
        ["--gpu", "rtx-4090", "--loss-kernel", "liger", "--batch", "8", "--json"],
        ["--gpu", "rtx-4090", "--offload-activations", "checkpoints"],
        ["--gpu", "rtx-4090", "--trainer", "unsloth"],
        ["--gpu", "rtx-4090", "--gpus", "2", "--strategy", "fsdp"],
        ["--gpu", "rtx-4090", "--gpus", "2", "--strategy", "fsdp", "--json"],
        ["--gpu", "rtx-4090", "--task", "infer"], ["--gpu", "t4", "--task", "infer", "--batch",
                                                    "32", "--json"],
        ["--gpu", "rtx-4090", "--task", "merge"], ["--gpu", "t4", "--task", "merge", "--json"],
        [], ["--json"], ["--batch", "16", "--seq-len", "4096"],
        ["--gpu", "t4", "--task", "infer", "--max", "batch"],
        ["--gpu-memory", "8", "--task", "infer", "--json"], ["--task", "merge", "--json"],
    ):
        out.append(["check", *M8, *extra])
    out += [["check"], ["check", "--json"],
            ["check", "--model", "llama-2-70b", "--gpu", "rtx-4090", "--method", "lora",
             "--quant", "none"]]
    # sweep
    for extra in (
        ["--over", "seq-len=512:2048"], ["--over", "seq-len=512:2048", "--json"],
        ["--over", "batch=1:8", "--gpu", "rtx-4090"],
        ["--over", "batch=1:8", "--gpu", "rtx-4090", "--json"],
        ["--over", "rank=8:64", "--csv"],
        ["--over", "batch=1:4", "--loss-kernel", "liger", "--json"],
    ):
        out.append(["sweep", *M8, *extra])
    # compare and fit
    out += [
        ["compare", *M8], ["compare", *M8, "--json"],
        ["compare", *SMALL, "--batch", "4", "--seq-len", "2048"],
        ["compare", *M8, "--optimizer", "adamw_8bit", "--rank", "64", "--json"],
        ["compare", *M8, "--loss-kernel", "liger"],
        ["compare", *SMALL, "--dataset-tokens", "1000000", "--json"],
        ["fit", "--gpu", "rtx-4090"], ["fit", "--gpu", "rtx-4090", "--json"],
        ["fit", "--gpu", "l4", "--rank", "64", "--batch", "4"],
        ["fit", "--gpu", "a100-80gb", "--seq-len", "4096", "--json"],
    ]
    # errors and refusals (exit codes, one Error: line)
    out += [
        ["plan"], ["plan", "--model", "no-such-model"], ["plan", "--model", ""],
        ["plan", *M8, "--batch", "0"], ["plan", *M8, "--rank", "16", "--method", "full"],
        ["plan", *M8, "--max", "batch"], ["plan", *M8, "--gpu", "no-such-gpu"],
        ["plan", *M8, "--gpu", "rtx-4090", "--gpu-memory", "24"],
        ["plan", *M8, "--margin", "1"], ["plan", *M8, "--max", "rank", "--gpu", "t4"],
        ["plan", *M8, "--task", "infer", "--seq-len", "512"],
        ["plan", *M8, "--task", "merge", "--prompt-len", "5"],
        ["plan", *M8, "--prompt-len", "5"], ["plan", *M8, "--loss-kernel", "nope"],
        ["plan", *M8, "--batch-layout", "nope"], ["plan", *M8, "--trainer", "nope"],
        ["plan", *M8, "--tokens-per-step", "100"],
        ["plan", *M8, "--offload-activations", "all", "--no-gradient-checkpointing"],
        ["plan", *M8, "--dataset-tokens", "1000"],
        ["plan", *M8, "--gpus", "2"], ["plan", *M8, "--strategy", "fsdp"],
        ["plan", "--model", "./nope/config.json"],
        ["check", *M8, "--gpu", "no-such-gpu"], ["check", *M8, "--margin", "-1", "--gpu", "t4"],
        ["sweep", *M8], ["sweep", *M8, "--over", "nope=1:2"],
        ["sweep", *M8, "--over", "batch=0:4"],
        ["compare"], ["compare", *M8, "--method", "full"],
        ["fit"], ["fit", "--gpu", "nope"],
    ]
    return out


def _fake_devices() -> list[Any]:
    from vramcalc.hardware.catalog import MIB
    from vramcalc.hardware.devices import DeviceInfo

    def dev(i: int, name: str, total: int, free: int, cc: tuple[int, int]) -> DeviceInfo:
        return DeviceInfo(index=i, name=name, uuid=f"GPU-{i}", total_bytes=total * MIB,
                          free_bytes=free * MIB, used_bytes=(total - free) * MIB,
                          compute_capability=cc)

    return [dev(0, "NVIDIA GeForce RTX 4090", 24564, 23000, (8, 9)),
            dev(1, "NVIDIA H100 80GB HBM3", 81559, 60000, (9, 0))]


def run_all(fast: bool, only: str | None = None) -> dict[str, list[Any]]:
    from typer.testing import CliRunner

    from vramcalc.cli import app
    from vramcalc.commands import targets

    targets.detect_devices = _fake_devices  # type: ignore[assignment]
    if fast:
        from vramcalc.memory.estimate import estimate

        assert estimate.__kwdefaults__ is not None
        estimate.__kwdefaults__["replay"] = False
    runner = CliRunner()
    results: dict[str, list[Any]] = {}
    for argv in _lines():
        key = json.dumps(argv)
        if only and only not in key:
            continue
        r = runner.invoke(app, argv)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            err = "".join(traceback.format_exception(r.exception))
            results[key] = [r.exit_code, r.stdout, r.stderr + "\nTRACEBACK " + err]
        else:
            results[key] = [r.exit_code, r.stdout, r.stderr]
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results here")
    ap.add_argument("--compare", type=Path, help="compare with these results: exit 1 if any "
                    "command line differs")
    ap.add_argument("--fast", action="store_true", help="estimates without the replay")
    ap.add_argument("--only", help="only the command lines containing this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data:
        os.environ.update({"VRAMCALC_DATA_DIR": data, "HF_HUB_OFFLINE": "1",
                           "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"})
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        os.chdir(REPO)
        t0 = time.perf_counter()
        results = run_all(args.fast, args.only)
        took = time.perf_counter() - t0
    tracebacks = [k for k, v in results.items() if "TRACEBACK" in v[2]]
    print(f"{len(results)} command lines in {took:.1f} s; {len(tracebacks)} tracebacks",
          file=sys.stderr)
    for k in tracebacks:
        print(f"  traceback: {k}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = [k for k in results if k in before and before[k] != results[k]]
        missing = [k for k in results if k not in before]
        for k in differ:
            print(f"DIFFERS: {k}", file=sys.stderr)
            for i, part in enumerate(("exit", "stdout", "stderr")):
                if before[k][i] != results[k][i]:
                    print(f"  {part}: was {str(before[k][i])[:300]!r}\n"
                          f"        now {str(results[k][i])[:300]!r}", file=sys.stderr)
        for k in missing:
            print(f"NEW: {k}", file=sys.stderr)
        print(f"{len(results) - len(differ) - len(missing)} same, {len(differ)} differ, "
              f"{len(missing)} new", file=sys.stderr)
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
