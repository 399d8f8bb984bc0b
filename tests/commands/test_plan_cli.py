"""`vramcalc plan`: the JSON contract, exit codes and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.memory.estimate import estimate
from vramcalc.models.spec import get_spec
from vramcalc.plans import TrainPlan

runner = CliRunner()


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_readme_main_command_works() -> None:
    r = run("plan", "--model", "llama-7b", "--rank", "16", "--batch", "4")
    assert r.exit_code == 0, r.output
    assert "GiB" in r.output and "peak device" in r.output


def test_json_contract() -> None:
    r = run("plan", "--model", "llama-3.1-8b", "--batch", "2", "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    for key in ("params", "components", "peak_phase", "peak_allocated_bytes",
                "peak_reserved_bytes", "peak_device_bytes"):
        assert key in out
    assert out["params"] == get_spec("llama-3.1-8b").num_params()
    assert sum(out["components"].values()) == out["peak_device_bytes"]
    assert "fits" not in out


def test_fits_and_does_not_fit() -> None:
    est = estimate(get_spec("llama-3.1-8b"), TrainPlan())
    gib = est.required_low / 2**30 + 0.5  # + the default margin, as check
    ok = run("plan", "-m", "llama-3.1-8b", "--gpu-memory", f"{gib + 0.1:.3f}", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["fits"] is True
    no = run("plan", "-m", "llama-3.1-8b", "--gpu-memory", f"{gib - 0.1:.3f}", "--json")
    assert no.exit_code == 3 and json.loads(no.stdout)["fits"] is False
    zero = run("plan", "-m", "llama-3.1-8b", "--gpu-memory", f"{gib - 0.4:.3f}", "--margin", "0")
    assert zero.exit_code == 0


def test_max_batch_is_the_boundary() -> None:
    r = run("plan", "-m", "qwen2.5-7b", "--gpu-memory", "24", "--max", "batch", "--json")
    best = json.loads(r.stdout)["value"]
    spec = get_spec("qwen2.5-7b")
    budget = 24 * 2**30 - 2**29  # less the default 0.5 GiB margin
    assert estimate(spec, TrainPlan(batch_size=best)).required_device_bytes <= budget
    assert estimate(spec, TrainPlan(batch_size=best + 1)).required_device_bytes > budget


def test_max_seq_len_nothing_fits_exits_3() -> None:
    r = run("plan", "-m", "llama-3.1-70b", "--gpu-memory", "8", "--max", "seq-len")
    assert r.exit_code == 3


def test_config_json_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
           "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run("plan", "-m", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--model", "lama-7b"), "did you mean 'llama-7b'"),
        (("--model", "llama-7b", "--rank", "0"), "--rank must be a positive integer"),
        (("--model", "llama-7b", "--batch", "-3"), "--batch must be a positive integer"),
        (("--model", "llama-7b", "--optimizer", "adam"), "unknown optimizer 'adam'"),
        (("--model", "llama-7b", "--quant", "nf3"), "unknown quantization 'nf3'"),
        (("--model", "llama-7b", "--attn", "flash"), "unknown attention 'flash'"),
        (("--model", "llama-7b", "--targets", "qproj"), "unknown target module 'qproj'"),
        (("--model", "llama-7b", "--lora-dropout", "1.0"), "--lora-dropout must be in [0, 1)"),
        (("--model", "./missing/config.json"), "no such file"),
        (("--model", "llama-7b", "--max", "rank", "--gpu-memory", "8"), "--max takes one of"),
        (("--model", "llama-7b", "--max", "batch"), "--max needs --gpu NAME or --gpu-memory"),
    ],
)
def test_bad_input_is_one_line_exit_1(args: tuple[str, ...], needle: str) -> None:
    r = run("plan", *args)
    assert r.exit_code == 1
    assert needle in r.stderr
    assert "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_non_number_is_a_usage_error() -> None:
    r = run("plan", "--model", "llama-7b", "--batch", "four")
    assert r.exit_code == 2


def test_incomplete_config_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    r = run("plan", "-m", str(p))
    assert r.exit_code == 1 and "required key missing" in r.stderr


def test_option_values_from_the_command_line_are_still_coerced() -> None:
    """cli._AlreadyTyped passes typed defaults through; strings still go to typer."""
    from typer.testing import CliRunner

    from vramcalc.cli import app

    r = CliRunner().invoke(app, ["plan", "-m", "llama-7b", "--rank", "abc"])
    assert r.exit_code == 2 and "--rank" in r.output
    r = CliRunner().invoke(app, ["plan", "-m", "llama-7b", "--rank", "8", "--json",
                                 "--gpu-memory", "24", "--margin", "1"])
    assert r.exit_code == 0, r.output


def test_loop_plain_and_use_cache_options() -> None:
    """`--loop plain` keeps the KV cache without checkpointing; `--no-use-cache` turns it
    off (the Trainer's tensors again); a name from before issue 27 is one Error line."""
    args = ("plan", "-m", "llama-2-7b", "--rank", "64", "--targets", "q_proj,v_proj",
            "--batch", "2", "--seq-len", "1024", "--no-gradient-checkpointing", "--json")
    peak = {}
    for extra in ((), ("--loop", "plain"), ("--loop", "plain", "--no-use-cache"),
                  ("--use-cache",)):
        r = run(*args, *extra)
        assert r.exit_code == 0, r.output
        peak[extra] = json.loads(r.stdout)["peak_allocated_bytes"]
    cache = 32 * 2048 * 2 * 4096 * 4  # layers x tokens x K and V x width x fp32
    # (the exact sum is test_estimate's; `plan` shows the step program's peak)
    assert abs(peak[("--loop", "plain")] - peak[()] - cache) < 0.01 * cache
    assert peak[("--loop", "plain", "--no-use-cache")] == peak[()]
    assert peak[("--use-cache",)] == peak[("--loop", "plain")]
    r = run("plan", "-m", "llama-2-7b", "--loop", "plain-outputs")
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: unknown loop 'plain-outputs'; valid: trainer, plain,")
    assert r.stderr.count("\n") == 1
