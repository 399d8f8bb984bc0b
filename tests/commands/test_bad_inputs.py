"""Every bad input gets one `Error: ...` line and a documented exit code, never a traceback.

The battery drives `plan` and `check` (and a few other commands) through CliRunner with
inputs a user can type by mistake; a few run in a real subprocess too. Exit codes: 1 error,
2 usage (typer's own), 3 does not fit, 4 no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vramcalc.cli import app

runner = CliRunner()
M = ["--model", "llama-7b"]
DOCUMENTED = {1, 2, 3, 4}

BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 2048}


def corrections_file(tmp: Path, **factors: Any) -> str:
    entry = {"gpu_family": "H100", "stack": "torch2.11-transformers5", "n_points": 3,
             "k_act": 1.0, "k_slack": 1.0, **factors}
    p = tmp / "corrections.json"
    p.write_text(json.dumps({"entries": [entry]}))
    return str(p)


# (id, argv, expected exit codes); "{tmp}" is replaced by a fresh folder of prepared files.
CASES: list[tuple[str, list[str], set[int]]] = []
for cmd in (["plan", *M], ["check", *M]):
    c = cmd[0]
    for value in ("nan", "inf", "-inf", "-1", "0", "1e308"):
        CASES.append((f"{c}-gpu-memory-{value}", [*cmd, "--gpu-memory", value], {1}))
        CASES.append((f"{c}-gpu-memory-{value}-json", [*cmd, "--gpu-memory", value, "--json"],
                      {1}))
        CASES.append((f"{c}-gpu-memory-{value}-max", [*cmd, "--gpu-memory", value, "--max",
                                                      "batch"], {1}))
    for value in ("nan", "inf", "-1"):
        CASES.append((f"{c}-margin-{value}", [*cmd, "--gpu", "h100", "--margin", value], {1}))
    for value in ("nan", "inf", "-inf"):
        CASES.append((f"{c}-alpha-{value}", [*cmd, "--gpu", "h100", "--alpha", value], {1}))
    CASES += [
        (f"{c}-dropout-nan", [*cmd, "--gpu", "h100", "--lora-dropout", "nan"], {1}),
        (f"{c}-batch-1e12", [*cmd, "--gpu", "h100", "--batch", str(10**12)], {1}),
        (f"{c}-batch-2e63", [*cmd, "--gpu", "h100", "--batch", str(2**63)], {1}),
        (f"{c}-batch-2e63-max", [*cmd, "--gpu", "h100", "--batch", str(2**63), "--max", "seq-len"],
         {1}),
        (f"{c}-seq-1e9", [*cmd, "--gpu", "h100", "--seq-len", str(10**9)], {1}),
        (f"{c}-rank-1e9", [*cmd, "--gpu", "h100", "--rank", str(10**9)], {1}),
        (f"{c}-rank-neg", [*cmd, "--gpu", "h100", "--rank", "-5"], {1}),
        (f"{c}-targets-mixed", [*cmd, "--gpu", "h100", "--targets", "all-linear,q_proj"], {1}),
        (f"{c}-targets-empty", [*cmd, "--gpu", "h100", "--targets", ""], {1}),
        (f"{c}-targets-commas", [*cmd, "--gpu", "h100", "--targets", ",,"], {1}),
        (f"{c}-unknown-gpu", [*cmd, "--gpu", "rtx-9999"], {1}),
        (f"{c}-empty-gpu", [*cmd, "--gpu", ""], {1}),
        (f"{c}-max-bad", [*cmd, "--gpu", "h100", "--max", "rank"], {1}),
        (f"{c}-batch-text", [*cmd, "--batch", "four"], {2}),
        (f"{c}-gpu-and-memory", [*cmd, "--gpu", "h100", "--gpu-memory", "24"], {1}),
    ]
for c in ("plan", "check"):
    g = ["--gpu", "h100"]
    CASES += [
        (f"{c}-model-empty", [c, "--model", "", *g], {1}),
        (f"{c}-model-blank", [c, "--model", "  ", *g], {1}),
        (f"{c}-model-dev-null", [c, "--model", "/dev/null", *g], {1}),
        (f"{c}-model-missing-file", [c, "--model", "./nope/config.json", *g], {1}),
        (f"{c}-folder-no-config", [c, "--model", "{tmp}/empty", *g], {1}),
        (f"{c}-folder-broken-config", [c, "--model", "{tmp}/broken", *g], {1}),
        (f"{c}-config-not-object", [c, "--model", "{tmp}/list/config.json", *g], {1}),
        (f"{c}-bert", [c, "--model", "{tmp}/bert", *g], {1}),
        (f"{c}-unsupported-type", [c, "--model", "{tmp}/weird", *g], {1}),
        (f"{c}-spec-yaml-broken", [c, "--model", "{tmp}/broken.yaml", *g], {1}),
        (f"{c}-unknown-model", [c, "--model", "llama-9000b", *g], {1}),
    ]
CASES += [
    ("check-gpu-bad-second", ["check", *M, "--gpu", "h100", "--gpu", "nope"], {1}),
    ("check-gpu-no-model", ["check", "--gpu", "h100"], {1}),
    ("check-max-no-model", ["check", "--max", "batch"], {1}),
    ("calibrate-report-missing", ["calibrate", "report", "--data", "/does/not/exist"], {1, 2}),
    ("plan-no-model", ["plan"], {2}),
    ("unknown-command", ["estimate"], {2}),
]
# Calibration files with bad factors: the raw estimate still answers, or one Error line.
BAD_CORRECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("nan", {"k_act": float("nan")}),
    ("negative", {"k_act": -2.0}),
    ("negative-slack", {"k_slack": -1.0}),
    ("wrong-type", {"k_act": "big"}),
    ("context-negative", {"context_bytes": -5}),
]


def _prepare(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "broken").mkdir()
    (tmp / "broken" / "config.json").write_text("{not json")
    (tmp / "list").mkdir()
    (tmp / "list" / "config.json").write_text("[1, 2]")
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps(BERT))
    (tmp / "weird").mkdir()
    (tmp / "weird" / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "zzz"}))
    (tmp / "broken.yaml").write_text("name: [unclosed\n")


def assert_one_error(result: Any, codes: set[int]) -> str:
    """One `Error: ...` line on stderr, a documented non-zero exit, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception, result.output)
    assert result.exit_code in codes & DOCUMENTED, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    if result.exit_code != 2:  # typer's usage errors add a 'Usage:' and 'Try' line
        assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
        assert result.stdout == "", "nothing half-written on stdout"
    return errors[0]


@pytest.mark.parametrize(("argv", "codes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv: list[str], codes: set[int], tmp_path: Path) -> None:
    _prepare(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_one_error(runner.invoke(app, argv), codes)


@pytest.mark.parametrize(("what", "factors"), BAD_CORRECTIONS, ids=[b[0] for b in BAD_CORRECTIONS])
def test_bad_corrections_file(what: str, factors: dict[str, Any], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vramcalc.corrections import factors as corrections

    monkeypatch.setenv(corrections.ENV_PATH, corrections_file(tmp_path, **factors))
    corrections._load_cached.cache_clear()
    try:
        result = runner.invoke(app, ["plan", *M, "--gpu", "h100", "--json"])
    finally:
        corrections._load_cached.cache_clear()
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    if result.exit_code == 0:  # ignored with a warning; the raw estimate answers
        assert "corrections ignored" in result.stderr or "warning" in result.stderr
        assert json.loads(result.stdout)["calibration"] is None
    else:
        assert_one_error(result, {1})


def test_unreadable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    folder.chmod(0)
    try:
        if os.access(folder / "config.json", os.R_OK):
            pytest.skip("running as root: a chmod 000 folder is still readable")
        assert_one_error(runner.invoke(app, ["plan", "--model", str(folder)]), {1})
    finally:
        folder.chmod(0o755)


# ---- warnings, not errors -----------------------------------------------------------------


def test_folder_shadowing_a_catalog_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-7b").mkdir()
    r = runner.invoke(app, ["plan", "--model", "llama-7b", "--json"])
    assert r.exit_code == 0 and "using the catalog model" in r.stderr
    assert json.loads(r.stdout)["model"] == "llama-7b"
    r = runner.invoke(app, ["plan", "--model", "./llama-7b"])  # path-like: the folder
    assert r.exit_code == 1 and "config.json" in r.stderr
    (tmp_path / "llama-7b" / "config.json").write_text(json.dumps(TINY_LLAMA))
    r = runner.invoke(app, ["plan", "--model", "llama-7b", "--json"])
    assert r.exit_code == 0 and "using the folder's config.json" in r.stderr
    assert json.loads(r.stdout)["params"] < 10**8


def test_sequence_past_max_position_embeddings_warns(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    r = runner.invoke(app, ["plan", "--model", str(tmp_path), "--seq-len", "4096", "--json"])
    assert r.exit_code == 0 and "max_position_embeddings (2048)" in r.stderr
    json.loads(r.stdout)
    r = runner.invoke(app, ["plan", "--model", str(tmp_path), "--seq-len", "2048"])
    assert "max_position_embeddings" not in r.stderr


def test_unsupported_model_hint_can_work(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BERT))
    line = assert_one_error(runner.invoke(app, ["plan", "--model", str(tmp_path)]), {1})
    assert "spec YAML" in line and "Adding a model" in line


# ---- a real process -----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["plan", *M, "--gpu-memory", "nan", "--json"],
    ["check", *M, "--gpu", "h100", "--batch", str(2**63)],
    ["plan", "--model", "/dev/null"],
    ["check", *M, "--gpu", "nope", "--gpu", "h100"],
], ids=["nan-json", "huge-batch", "dev-null", "bad-gpu"])
def test_in_a_subprocess(argv: list[str]) -> None:
    env = {**os.environ, "VRAMCALC_CORRECTIONS": ""}
    p = subprocess.run([sys.executable, "-m", "vramcalc", *argv], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.startswith("Error: ") and len(p.stderr.strip().splitlines()) == 1


# ---- property-based: random option values never give a traceback --------------------------

_ints = st.one_of(st.integers(-10, 10**4), st.integers(-(2**70), 2**70))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 200))
_words = st.one_of(st.sampled_from(["nf4", "bf16", "sdpa", "adamw_torch", "eager", "none"]),
                   st.text(max_size=12))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cmd=st.sampled_from(["plan", "check"]),
    rank=_ints, batch=_ints, seq=_ints, gpu_memory=_floats, margin=_floats, alpha=_floats,
    dropout=_floats, quant=_words, optim=_words, attn=_words, dtype=_words,
    gpu=st.one_of(st.sampled_from(["h100", "rtx-4090", "t4", "a100-40gb"]), st.text(max_size=8)),
    use_gpu=st.booleans(), max_=st.one_of(st.none(), st.sampled_from(["batch", "seq-len", "x"])),
)
def test_random_options_never_trace(  # type: ignore[no-untyped-def]
    cmd, rank, batch, seq, gpu_memory, margin, alpha, dropout, quant, optim, attn, dtype, gpu,
    use_gpu, max_,
) -> None:
    argv = [cmd, *M, "--rank", str(rank), "--batch", str(batch), "--seq-len", str(seq),
            "--margin", str(margin), "--alpha", str(alpha), "--lora-dropout", str(dropout),
            "--quant", quant, "--optimizer", optim, "--attn", attn, "--compute-dtype", dtype,
            "--json"]
    argv += ["--gpu", gpu] if use_gpu else ["--gpu-memory", str(gpu_memory)]
    if max_ is not None:
        argv += ["--max", max_]
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv, result.exception)
    assert result.exit_code in {0, 1, 2, 3}, (argv, result.output)
    assert "Traceback" not in result.output
