"""Issue 28, part B: never answer a question that wasn't asked.

Every case asserts one of: a clean one-line `Error: ...` and its exit code (no traceback), a
documented verdict (exit 0 fits, 3 does not fit), or a correct answer. The option rules:

- every count is bounded (commands/options.py MAX_*, parallel.py MAX_GPUS, specs.py MAX_*),
  and the cost of an inference plan does not grow with its token counts;
- an option the plan does not use is refused in one line, never silently ignored;
- absurd configs are refused by the spec's limits;
- the defaults that surprised (issue 28) follow one stated rule.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.cli import COMMANDS, app

runner = CliRunner()
M = ["-m", "llama-7b"]
HUGE = "99999999999"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 2048}


def one_error(args: list[str], code: int, text: str, env: dict[str, str] | None = None) -> Any:
    r = runner.invoke(app, args, env=env)
    assert r.exit_code == code, (args, r.output)
    assert "Traceback" not in r.output, r.output
    if code == 1:
        assert r.stderr.strip().splitlines()[-1].startswith("Error: "), r.stderr
        assert sum(line.startswith("Error: ") for line in r.stderr.splitlines()) == 1
    assert text in r.stderr, (args, r.stderr)
    return r


# ---- 1. bounds on every count, in every command that takes it ---------------------------

COMMAND_HEADS = {
    "plan": ["plan", *M],
    "check": ["check", *M, "--gpu", "a100-80gb"],
    "compare": ["compare", *M],
    "sweep": ["sweep", *M, "--over", "rank=8:16"],
    "fit": ["fit", "--gpu", "t4"],
}
BOUND_CASES: list[tuple[list[str], str]] = [
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--batch", "-3"], "--batch must be a positive integer"),
    (["--batch", str(2**20 + 1)], "use at most 1048576"),
    (["--batch", HUGE], "use at most 1048576"),
    (["--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--seq-len", "-1"], "--seq-len must be a positive integer"),
    (["--seq-len", str(2**24 + 1)], "use at most 16777216"),
    (["--seq-len", HUGE], "longest context"),
    (["--rank", "0"], "--rank must be a positive integer"),
    (["--rank", str(2**16 + 1)], "use at most 65536"),
    (["--alpha", "-1"], "--alpha must be a positive finite number"),
    (["--alpha", "0"], "--alpha must be a positive finite number"),
    (["--alpha", "nan"], "--alpha must be a positive finite number"),
    (["--alpha", "inf"], "--alpha must be a positive finite number"),
    (["--lora-dropout", "-0.1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-dropout", "nan"], "--lora-dropout must be in [0, 1)"),
    (["--margin", "-1"], "--margin"),
    (["--margin", "nan"], "--margin"),
]


@pytest.mark.parametrize("command", list(COMMAND_HEADS))
@pytest.mark.parametrize(("extra", "text"), BOUND_CASES,
                         ids=[" ".join(a) for a, _ in BOUND_CASES])
def test_counts_are_bounded_everywhere(command: str, extra: list[str], text: str) -> None:
    if command == "sweep" and extra[0] == "--margin":
        pytest.skip("sweep has no --margin")  # 1 x 2 cases
    head = COMMAND_HEADS[command]
    if command == "sweep" and extra[0] == "--rank":
        head = ["sweep", *M, "--over", "seq-len=512:1024"]
    if command == "plan" and extra[0] == "--margin":
        head = [*head, "--gpu", "a100-80gb"]
    one_error([*head, *extra], 1, text)


PARALLEL_BOUNDS = [
    (["--gpus", "0"], "--gpus must be a positive integer"),
    (["--gpus", "-2"], "--gpus must be a positive integer"),
    (["--gpus", "16385"], "use at most 16384"),
    (["--gpus", HUGE], "use at most 16384"),
    (["--gpus", "2", "--gpus-per-node", "0"], "--gpus-per-node must be a positive integer"),
    (["--gpus", "2", "--gpus-per-node", "99999"], "use at most 16384"),
]


@pytest.mark.parametrize(("extra", "text"), PARALLEL_BOUNDS)
def test_gpu_counts_are_bounded(extra: list[str], text: str) -> None:
    one_error(["plan", *M, *extra], 1, text)


INFER_BOUNDS = [
    (["--prompt-len", "0"], "--prompt-len must be a positive integer"),
    (["--prompt-len", HUGE], "use at most 16777216"),
    (["--new-tokens", "0"], "--new-tokens must be a positive integer"),
    (["--new-tokens", "-5"], "--new-tokens must be a positive integer"),
    (["--new-tokens", HUGE], "use at most 16777216"),
    (["--prompt-len", str(2**24), "--new-tokens", "1"], "--prompt-len + --new-tokens"),
    (["--batch", HUGE], "use at most 1048576"),
    (["--rank", "70000"], "use at most 65536"),
]


@pytest.mark.parametrize("command", ["plan", "check"])
@pytest.mark.parametrize(("extra", "text"), INFER_BOUNDS,
                         ids=[" ".join(a) for a, _ in INFER_BOUNDS])
def test_inference_counts_are_bounded(command: str, extra: list[str], text: str) -> None:
    head = ["check", *M, "--gpu", "t4"] if command == "check" else ["plan", *M]
    one_error([*head, "--task", "infer", *extra], 1, text)


@pytest.mark.parametrize("over", [
    f"batch=1:{HUGE}:+1", f"seq-len=1:{HUGE}:*1.0001", "rank=1:100000:99999",
    f"seq-len=512:{HUGE}", f"batch=1:{HUGE}:3", "rank=1:99999",
])
def test_sweep_points_are_bounded(over: str) -> None:
    t0 = time.monotonic()
    r = runner.invoke(app, ["sweep", *M, "--over", over])
    assert r.exit_code == 1 and r.stderr.startswith("Error: "), r.output
    assert time.monotonic() - t0 < 10


def test_the_new_tokens_hang_is_gone() -> None:
    """`plan --task infer --new-tokens N` at the bound costs what it costs at 128."""
    t0 = time.monotonic()
    r = runner.invoke(app, ["plan", *M, "--task", "infer", "--new-tokens", str(2**24 - 512),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 5
    assert "max_position_embeddings" in r.stderr  # the context warning, as training gives


# ---- 2. options a plan does not use: refused in one line ---------------------------------

REFUSED: list[tuple[list[str], str]] = [
    # LoRA options with full fine-tuning
    (["plan", *M, "--method", "full", "--rank", "8"], "--rank: LoRA options"),
    (["plan", *M, "--method", "full", "--dora"], "--dora: LoRA options"),
    (["plan", *M, "--method", "full", "--targets", "q_proj"], "--targets: LoRA options"),
    (["plan", *M, "--method", "full", "--lora-dropout", "0.1"], "--lora-dropout: LoRA"),
    (["plan", *M, "--method", "full", "--alpha", "16"], "--alpha: LoRA options"),
    (["check", *M, "--gpu", "h100", "--method", "full", "--rank", "8"], "--rank: LoRA"),
    (["sweep", *M, "--method", "full", "--dora"], "--dora: LoRA options"),
    (["sweep", *M, "--method", "full", "--over", "rank=8:16"], "--method full has no LoRA"),
    # double quant without a 4-bit base
    (["plan", *M, "--quant", "int8", "--no-double-quant"], "--double-quant: only with a 4-bit"),
    (["plan", *M, "--method", "lora", "--double-quant"], "--double-quant: only with a 4-bit"),
    (["plan", *M, "--task", "infer", "--quant", "none", "--double-quant"], "--double-quant"),
    (["plan", *M, "--task", "merge", "--no-double-quant"], "--double-quant"),
    # --moe-experts without a quantized MoE
    (["plan", *M, "--moe-experts", "quantized"], "--moe-experts: only with"),
    (["plan", "-m", "mixtral-8x7b", "--method", "lora", "--moe-experts", "quantized"],
     "--moe-experts: only with"),
    # several GPUs
    (["plan", *M, "--strategy", "fsdp"], "--strategy: needs --gpus N"),
    (["plan", *M, "--offload", "cpu"], "--offload: needs --gpus N"),
    (["plan", *M, "--gpus-per-node", "8"], "--gpus-per-node: needs --gpus N"),
    (["plan", *M, "--gpus", "2", "--use-orig-params"], "only with --strategy fsdp, not ddp"),
    (["plan", *M, "--gpus", "2", "--strategy", "zero3", "--sharding-strategy",
      "SHARD_GRAD_OP"], "--sharding-strategy: only with --strategy fsdp, not zero3"),
    (["plan", *M, "--gpus", "2", "--strategy", "fsdp", "--device-map", "sequential"],
     "--device-map: only with --strategy device-map, not fsdp"),
    (["plan", *M, "--sharding-strategy", "NO_SHARD"], "only with several GPUs"),
    (["plan", *M, "--device-map", "sequential"], "only with several GPUs"),
    (["plan", *M, "--use-orig-params"], "only with several GPUs"),
    # --margin without a card
    (["plan", *M, "--margin", "2"], "--margin: only with --gpu NAME or --gpu-memory"),
    (["plan", *M, "--task", "infer", "--margin", "2"], "--margin: only with --gpu"),
    # train options with --task infer / merge
    (["plan", *M, "--task", "infer", "--seq-len", "100"], "use --prompt-len and --new-tokens"),
    (["plan", *M, "--task", "infer", "--gpus", "2", "--strategy", "device-map"],
     "--gpus: not used by --task infer"),
    (["plan", *M, "--task", "infer", "--method", "lora"], "--method: not used by --task infer"),
    (["plan", *M, "--task", "infer", "--optimizer", "sgd"], "--optimizer: not used"),
    (["plan", *M, "--task", "infer", "--lora-dropout", "0.1"], "--lora-dropout: not used"),
    (["plan", *M, "--task", "infer", "--dora"], "--dora: not used"),
    (["plan", *M, "--task", "infer", "--no-gradient-checkpointing"],
     "--gradient-checkpointing: not used"),
    (["plan", *M, "--task", "infer", "--loop", "plain"], "--loop: not used"),
    (["plan", *M, "--task", "infer", "--weights-dtype", "fp32"], "--weights-dtype: not used"),
    (["plan", *M, "--task", "infer", "--expandable-segments"], "--expandable-segments: not"),
    (["plan", *M, "--task", "infer", "--no-calibration"], "--no-calibration: not used"),
    (["plan", *M, "--task", "infer", "--strategy", "fsdp"], "--strategy: not used"),
    (["plan", *M, "--task", "merge", "--batch", "4"], "--batch: not used by --task merge"),
    (["plan", *M, "--task", "merge", "--compute-dtype", "fp16"], "--compute-dtype: not used"),
    (["plan", *M, "--task", "merge", "--attn", "eager"], "--attn: not used by --task merge"),
    (["plan", *M, "--task", "merge", "--seq-len", "100"], "--seq-len: not used"),
    (["plan", *M, "--task", "merge", "--gpu-memory", "80", "--max", "batch"], "--max: not"),
    (["plan", *M, "--task", "infer", "--merged", "--rank", "8"], "--merged has no adapter"),
    (["plan", *M, "--task", "infer", "--merged", "--targets", "q_proj"], "--merged has no"),
    (["plan", *M, "--task", "infer", "--merged", "--adapter-dtype", "bf16"], "--merged has"),
    (["check", *M, "--gpu", "t4", "--task", "infer", "--seq-len", "64"], "--seq-len: not"),
    (["check", *M, "--gpu", "t4", "--task", "merge", "--gpus", "2"], "--gpus: not used"),
    (["check", *M, "--gpu", "t4", "--task", "infer", "--max", "batch"], "gives a verdict only"),
    (["plan", *M, "--task", "infer", "--from-config", "no-such.yml"], "--from-config: not used"),
    (["check", *M, "--gpu", "t4", "--task", "merge", "--from-config", "x.yml"], "--from-config"),
    # sweep: the swept option given too
    (["sweep", *M, "--over", "seq-len=512:4096", "--seq-len", "100"], "--over seq-len sets"),
    (["sweep", *M, "--over", "batch=1:8", "--batch", "2"], "--over batch sets it"),
    (["sweep", *M, "--over", "rank=8:64", "--rank", "4"], "--over rank sets it"),
    # check without a model: plan options have nothing to apply to
    (["check", "--batch", "4"], "plan options need --model"),
    (["check", "--rank", "4", "--json"], "plan options need --model"),
    # an explicit bf16 on a card without bf16 is never silently changed
    (["plan", *M, "--gpu", "t4", "--compute-dtype", "bf16"],
     "t4 (compute capability 7.5) has no bf16"),
    (["check", *M, "--gpu", "t4", "--compute-dtype", "bf16"], "has no bf16"),
    (["check", *M, "--gpu", "a100-80gb", "--gpu", "v100-16gb", "--compute-dtype", "bf16"],
     "has no bf16"),
]


@pytest.mark.parametrize(("args", "text"), REFUSED,
                         ids=[" ".join(a[:1] + a[3:]) for a, _ in REFUSED])
def test_options_a_plan_does_not_use_are_refused(args: list[str], text: str) -> None:
    one_error(args, 1, text)


@pytest.mark.parametrize("value", ["Maybe", "true", "1", "yes", ""])
def test_alloc_conf_is_read_as_torch_reads_it(value: str) -> None:
    one_error(["plan", *M], 1, "expandable_segments takes True or False",
              env={"PYTORCH_CUDA_ALLOC_CONF": f"expandable_segments:{value}"})


@pytest.mark.parametrize(("conf", "on"), [
    ("expandable_segments:True", True), ("expandable_segments:False", False),
    ("max_split_size_mb:128,expandable_segments:True", True),
    ("garbage_collection_threshold:0.6", False), ("", False),
])
def test_alloc_conf_values_torch_accepts(conf: str, on: bool) -> None:
    r = runner.invoke(app, ["plan", *M, "--json"], env={"PYTORCH_CUDA_ALLOC_CONF": conf})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["expandable_segments"] is on


@pytest.mark.parametrize("given", [
    ["--compute-dtype", "fp16"], ["--rank", "8"], ["--lora-dropout", "0"], ["--no-dora"],
    ["--batch", "2"], ["--quant", "fp4", "--no-double-quant"], ["--moe-experts", "unquantized"],
])
def test_options_that_apply_are_used(given: list[str]) -> None:
    """The same options, where the plan uses them: accepted and in the plan."""
    model = ["-m", "mixtral-8x7b"] if "--moe-experts" in given else M
    extra = ["--lora-dropout", "0"] if model != M else []
    r = runner.invoke(app, ["plan", *model, *given, *extra, "--gpu", "t4", "--json"])
    assert r.exit_code in (0, 3), r.output
    assert "plan" in json.loads(r.stdout)


# ---- 3. verdicts that --help promises -----------------------------------------------------

VERDICTS = [
    (["plan", "-m", "llama-2-70b", "--task", "infer", "--quant", "none", "--gpu", "l40s"], 3),
    (["plan", "-m", "llama-2-70b", "--task", "merge", "--gpu", "l40s"], 3),
    (["plan", "-m", "llama-2-70b", "--task", "merge", "--gpu", "h200"], 0),
    (["plan", *M, "--task", "infer", "--gpu", "a100-80gb"], 0),
    (["plan", *M, "--task", "infer", "--gpu-memory", "2"], 3),
    (["plan", *M, "--task", "infer", "--gpu-memory", "80", "--margin", "79.9"], 3),
    (["plan", *M, "--task", "merge", "--gpu-memory", "80"], 0),
    (["plan", *M, "--gpus", "2", "--strategy", "fsdp", "--gpu", "rtx-4090"], 0),
    (["plan", "-m", "llama-2-70b", "--gpus", "2", "--strategy", "ddp", "--gpu", "t4"], 3),
    (["check", *M, "--gpu", "t4", "--task", "infer"], 0),
    (["check", "-m", "llama-2-70b", "--gpu", "t4", "--task", "infer", "--quant", "none"], 3),
]


@pytest.mark.parametrize(("args", "code"), VERDICTS)
def test_verdicts_and_exit_codes(args: list[str], code: int) -> None:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == code, r.output
    out = json.loads(r.stdout)
    assert out["fits"] is (code == 0)
    if args[0] == "plan":
        assert out["certainty"] in ("fits", "tight", "does_not_fit")
        assert out["spread_bytes"] > 0 and "gpu_memory_bytes" in out and "margin_bytes" in out
    r = runner.invoke(app, args)  # the same verdict in words, on stdout
    assert r.exit_code == code
    assert ("does NOT fit" in r.stdout) is (code == 3)


def test_check_infer_verdict_is_on_stdout() -> None:
    r = runner.invoke(app, ["check", "-m", "llama-2-70b", "--gpu", "t4", "--task", "infer"])
    assert r.exit_code == 3
    assert "does NOT fit" in r.stdout and "does NOT fit" not in r.stderr


def test_multi_gpu_json_keys_mean_what_one_gpu_keys_mean() -> None:
    one = json.loads(runner.invoke(app, ["plan", *M, "--gpu", "rtx-4090", "--json"]).stdout)
    two = json.loads(runner.invoke(app, ["plan", *M, "--gpu", "rtx-4090", "--gpus", "2",
                                         "--strategy", "fsdp", "--json"]).stdout)
    for key in ("gpu", "gpu_memory_bytes", "margin_bytes", "fits", "certainty",
                "spread_bytes", "headroom_bytes"):
        assert key in one and key in two, key
    assert one["gpu_memory_bytes"] == two["gpu_memory_bytes"]  # the card, not the budget
    assert one["margin_bytes"] == two["margin_bytes"]
    assert two["headroom_bytes"] == two["gpu_memory_bytes"] - two["required_device_bytes"]


def test_many_gpus_print_one_row_per_kind() -> None:
    r = runner.invoke(app, ["plan", *M, "--gpus", "10000"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) < 80
    assert "0-9999" in r.stdout


# ---- 4. absurd configs --------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("vocab_size", 10**12), ("hidden_size", 10**30), ("intermediate_size", 10**9),
    ("num_hidden_layers", 10**6), ("num_attention_heads", 10**5), ("vocab_size", 0),
    ("hidden_size", -4), ("num_key_value_heads", 10**6),
])
def test_absurd_configs_are_refused(tmp_path: Path, key: str, value: int) -> None:
    cfg = {**TINY_LLAMA, key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    one_error(["plan", "-m", str(path)], 1, key)


def test_a_real_sized_config_is_accepted(tmp_path: Path) -> None:
    cfg = {**TINY_LLAMA, "vocab_size": 262144, "hidden_size": 16384,
           "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert runner.invoke(app, ["plan", "-m", str(path)]).exit_code == 0


# ---- 5. defaults and help ----------------------------------------------------------------

def test_full_fine_tuning_default_optimizer_is_the_compare_rule() -> None:
    from vramcalc.commands.options import DEFAULT_OPTIMIZER
    from vramcalc.sizing.comparison import FULL_OPTIMIZER, LORA_OPTIMIZER

    assert DEFAULT_OPTIMIZER == {"full": FULL_OPTIMIZER, "lora": LORA_OPTIMIZER}
    full = json.loads(runner.invoke(app, ["plan", *M, "--method", "full", "--json"]).stdout)
    assert full["plan"]["optimizer"] == FULL_OPTIMIZER
    lora = json.loads(runner.invoke(app, ["plan", *M, "--json"]).stdout)
    assert lora["plan"]["optimizer"] == LORA_OPTIMIZER
    cmp = json.loads(runner.invoke(app, ["compare", *M, "--json"]).stdout)
    row = next(r for r in cmp["methods"] if r["method"] == "full")
    assert row["plan"]["optimizer"] == FULL_OPTIMIZER
    assert row["required_device_bytes"] == full["required_device_bytes"]  # the same plan


def test_explicit_optimizer_wins_for_full() -> None:
    r = runner.invoke(app, ["plan", *M, "--method", "full", "--optimizer", "adamw_8bit",
                            "--json"])
    assert json.loads(r.stdout)["plan"]["optimizer"] == "adamw_8bit"


def test_mixtral_with_defaults_runs() -> None:
    r = runner.invoke(app, ["plan", "-m", "mixtral-8x7b", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["lora_dropout"] == 0.0
    assert "--lora-dropout 0" in r.stderr
    r = runner.invoke(app, ["plan", "-m", "mixtral-8x7b", "--lora-dropout", "0.1"])
    assert r.exit_code == 1 and "cannot start" in r.stderr  # an explicit value is kept
    dense = json.loads(runner.invoke(app, ["plan", *M, "--json"]).stdout)
    assert dense["plan"]["lora_dropout"] == 0.05


def test_t4_default_compute_is_fp16_with_a_note() -> None:
    r = runner.invoke(app, ["plan", *M, "--gpu", "t4", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["plan"]["compute_dtype"] == "fp16"
    assert "no bf16" in r.stderr


@pytest.mark.parametrize(("args", "said"), [
    (["plan", *M, "--gpu", "rtx-4090", "--max", "batch"], "at --seq-len 512"),
    (["plan", *M, "--gpu", "rtx-4090", "--max", "batch", "--seq-len", "1024"],
     "at --seq-len 1024"),
    (["plan", *M, "--gpu", "rtx-4090", "--max", "seq-len", "--batch", "2"], "at --batch 2"),
    (["plan", *M, "--gpu", "rtx-4090", "--gpus", "2", "--strategy", "fsdp", "--max",
      "batch"], "at --seq-len 512"),
    (["plan", *M, "--task", "infer", "--gpu", "rtx-4090", "--max", "batch"],
     "at --prompt-len 512, --new-tokens 128"),
])
def test_max_says_what_it_assumed(args: list[str], said: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert said in r.stdout


def test_from_config_lists_ignored_keys_and_maps_fsdp(tmp_path: Path) -> None:
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text("base_model: llama-7b\nadapter: qlora\nmicro_batch_size: 2\n"
                   "sequence_len: 1024\nmicro_batchsize: 8\nlearning_rate: 0.0002\n"
                   "fsdp:\n  - full_shard\n")
    r = runner.invoke(app, ["plan", "--from-config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    assert "ignored keys" in r.stderr and "micro_batchsize" in r.stderr
    assert "learning_rate" in r.stderr
    assert "--gpus N" in r.stderr and "not modelled: fsdp" not in r.stderr
    r = runner.invoke(app, ["plan", "--from-config", str(cfg), "--gpus", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parallel"]["strategy"] == "fsdp"


def _all_commands() -> list[list[str]]:
    out = [[]]
    for name in COMMANDS:
        out.append([name])
    out += [["calibrate", sub] for sub in ("run", "fit", "report", "multi")]
    return out


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: " ".join(c) or "vramcalc")
def test_help_fits_80_columns(command: list[str]) -> None:
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    if r.exit_code == 2 and "No such command" in r.output:
        pytest.skip(f"no command {command}")
    assert r.exit_code == 0, r.output
    wide = [line for line in r.stdout.splitlines() if len(line) > 80]
    assert not wide, wide


def test_check_several_gpus_json_has_the_verdict_keys() -> None:
    r = runner.invoke(app, ["check", "-m", "llama-2-70b", "--gpu", "rtx-4090", "--gpus", "2",
                            "--strategy", "fsdp", "--json"])
    assert r.exit_code in (0, 3), r.output
    out = json.loads(r.stdout)
    for key in ("fits", "certainty", "spread_bytes", "gpu_memory_bytes", "margin_bytes",
                "headroom_bytes"):
        assert key in out, key
    assert out["headroom_bytes"] == out["gpu_memory_bytes"] - out["required_device_bytes"]
    assert out["fits"] is (r.exit_code == 0)


def test_check_max_says_what_it_assumed() -> None:
    r = runner.invoke(app, ["check", *M, "--gpu", "rtx-4090", "--max", "batch",
                            "--seq-len", "1024"])
    assert r.exit_code == 0, r.output
    assert "at --seq-len 1024" in " ".join(r.stdout.split())  # rich wraps the title


def test_compare_mixtral_with_defaults_runs_every_lora_row() -> None:
    r = runner.invoke(app, ["compare", "-m", "mixtral-8x7b", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["methods"]
    assert all(row["error"] is None for row in rows), [row["error"] for row in rows]
    assert "--lora-dropout 0" in r.stderr


def test_api_full_fine_tuning_default_optimizer_is_the_cli_rule() -> None:
    from vramcalc import plan

    assert plan("llama-7b", method="full").plan.optimizer == "adamw_torch_fused"
    assert plan("llama-7b").plan.optimizer == "paged_adamw_8bit"
    assert plan("llama-7b", method="full", optimizer="sgd").plan.optimizer == "sgd"


@pytest.mark.parametrize(("what", "expect"), [("prompt-len", 2**24 - 128), ("batch", 2**20)])
def test_infer_max_reaches_the_option_bound(what: str, expect: int) -> None:
    """On a huge card the search answers the largest value the option accepts."""
    r = runner.invoke(app, ["plan", "-m", "qwen2.5-0.5b", "--task", "infer", "--gpu-memory",
                            "1000000", "--max", what, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["value"] == expect
