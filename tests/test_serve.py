"""`vramcalc serve`'s JSON API: the same bytes as the command line, 4xx on bad requests."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.serve import MAX_BODY_BYTES, MAX_QUERY_BYTES, VramcalcServer, make_server

TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def server() -> Iterator[VramcalcServer]:
    srv = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv: VramcalcServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def get(srv: VramcalcServer, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return request(srv, "GET", path, headers=headers)


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _error_line(stderr: str) -> str:
    return [ln for ln in stderr.splitlines() if ln.startswith("Error:")][-1]


def assert_same_as_cli(srv: VramcalcServer, command: str, params: list[tuple[str, str]],
                       argv: list[str]) -> None:
    """/api/COMMAND?params answers what `vramcalc COMMAND --json ARGV` prints, byte for byte
    (or, where the command fails, its `Error:` line as a 4xx)."""
    status, headers, body = get(srv, f"/api/{command}?{urlencode(params)}")
    code, out, err = cli(command, "--json", *argv)
    if code in (0, 3):
        assert status == 200, (params, body)
        assert body.decode() == out, params
        assert headers["x-vramcalc-exit-code"] == str(code)
    else:
        assert 400 <= status < 500, (params, status, body)
        assert json.loads(body)["error"] == _error_line(err).removeprefix("Error:").strip()


# ---- the API equals the command line ---------------------------------------------------------

MODELS = ["llama-3.2-1b", "qwen2.5-0.5b", "llama-3.1-8b", "gemma-2-2b", "phi-3-mini",
          "qwen2.5-7b", "mistral-7b"]


def _random_input(rng: random.Random) -> list[tuple[str, str]]:
    p: list[tuple[str, str]] = [("model", rng.choice(MODELS))]
    task = rng.choices(["train", "infer", "merge"], [8, 1, 1])[0]
    if task != "train":
        p.append(("task", task))
        p.append(("quant", rng.choice(["nf4", "none"])))
        if task == "infer":
            p += [("batch", str(rng.randint(1, 8))), ("prompt-len", str(rng.choice([64, 512]))),
                  ("new-tokens", str(rng.choice([16, 128])))]
        return p
    method = rng.choice(["qlora", "qlora", "lora", "full"])
    p.append(("method", method))
    if method == "qlora":
        p.append(("quant", rng.choice(["nf4", "fp4", "int8"])))
    if method != "full":
        p.append(("rank", str(rng.choice([4, 8, 16, 64]))))
        if rng.random() < 0.2:
            p.append(("targets", "q_proj,v_proj"))
        if rng.random() < 0.2:
            p.append(("dora", "true"))
    p += [("batch", str(rng.randint(1, 8))), ("seq-len", str(rng.choice([128, 512, 1024, 2048])))]
    if rng.random() < 0.3:
        p.append(("gradient-checkpointing", "false"))
    if rng.random() < 0.3:
        p.append(("optimizer", rng.choice(["adamw_torch", "adamw_8bit", "paged_adamw_32bit"])))
    if rng.random() < 0.2:
        p.append(("loop", rng.choice(["plain", "plain-outputs"])))
    if rng.random() < 0.2:
        p.append(("attn", rng.choice(["eager", "flash_attention_2"])))
    # the memory savers (issue 29): a kernel a model may refuse (an Error line then, the
    # same from both), a layout with or without the real tokens, offloading, a trainer
    if rng.random() < 0.4:
        p.append(("loss-kernel", rng.choice(["liger", "cce", "chunked", "trl-chunked"])))
    if rng.random() < 0.3:
        layout = rng.choice(["packed", "padding-free"])
        p.append(("batch-layout", layout))
        if layout == "padding-free" and rng.random() < 0.5:
            p.append(("tokens-per-step", str(rng.choice([100, 700, 3000]))))
    if rng.random() < 0.3:
        p.append(("offload-activations", rng.choice(["checkpoints", "all"])))
    if rng.random() < 0.2:
        p.append(("trainer", rng.choice(["trl", "hf", "unsloth", "axolotl"])))
    if rng.random() < 0.3:
        p.append(("gpu", rng.choice(["rtx-4090", "a100-80gb", "t4"])))
    elif rng.random() < 0.2:
        p.append(("gpu-memory", str(rng.choice([12, 24, 40]))))
    return p


def _argv(params: list[tuple[str, str]]) -> list[str]:
    """The command line a user types for the same settings."""
    out = []
    for k, v in params:
        if v in ("true", "false") and k in ("dora", "gradient-checkpointing"):
            out.append(f"--{k}" if v == "true" else f"--no-{k}")
        else:
            out += [f"--{k}", v]
    return out


# The server's threads run the estimate as the command line does, with the allocator replay
# (conftest.py turns it off in the test's own thread unless a test is marked `replay`).
@pytest.mark.replay
@pytest.mark.parametrize("seed", range(40))
def test_api_plan_equals_plan_json(server: VramcalcServer, seed: int) -> None:
    params = _random_input(random.Random(seed))
    assert_same_as_cli(server, "plan", params, _argv(params))


@pytest.mark.replay  # the subprocess replays; conftest.py may turn it off in this process
def test_api_plan_equals_the_installed_command(server: VramcalcServer) -> None:
    """Against a real `vramcalc plan --json` process, not only the CLI runner."""
    params = [("model", "llama-3.1-8b"), ("batch", "4"), ("seq-len", "2048"),
              ("gpu", "rtx-4090")]
    status, _, body = get(server, f"/api/plan?{urlencode(params)}")
    out = subprocess.run([sys.executable, "-m", "vramcalc", "plan", "--json", *_argv(params)],
                         capture_output=True, text=True)
    assert status == 200 and out.returncode == 3  # does not fit a 4090: still a 200
    assert body.decode() == out.stdout


@pytest.mark.replay
@pytest.mark.parametrize("command,params", [
    ("check", [("model", "qwen2.5-7b"), ("batch", "2"), ("gpu", "rtx-4090"),
               ("gpu", "a100-40gb")]),
    ("check", [("model", "llama-3.1-8b"), ("batch", "16"), ("seq-len", "4096"),
               ("gpu", "rtx-4090")]),
    ("compare", [("model", "qwen2.5-0.5b"), ("batch", "2")]),
    ("compare", [("model", "qwen2.5-0.5b"), ("batch", "2"), ("loss-kernel", "trl-chunked"),
                 ("offload-activations", "all"), ("trainer", "trl")]),
    ("sweep", [("model", "qwen2.5-0.5b"), ("over", "batch=1:4"), ("batch-layout",
               "padding-free"), ("offload-activations", "checkpoints"),
               ("loss-kernel", "liger")]),
    ("sweep", [("model", "qwen2.5-0.5b"), ("over", "batch=1:8"), ("gpu", "t4")]),
    ("plan", [("model", "llama-3.1-8b"), ("gpus", "2"), ("strategy", "fsdp"),
              ("method", "full"), ("gpu", "a100-80gb")]),
])
def test_api_commands_equal_their_json(server: VramcalcServer, command: str,
                                       params: list[tuple[str, str]]) -> None:
    assert_same_as_cli(server, command, params, _argv(params))


@pytest.mark.replay
def test_api_fit_equals_fit_json(server: VramcalcServer) -> None:
    params = [("gpu", "t4"), ("seq-len", "256")]
    assert_same_as_cli(server, "fit", params, _argv(params))


def test_answers_are_kept(server: VramcalcServer) -> None:
    """The same query is answered again from memory, byte for byte; check of this machine's
    GPUs (NVML's free memory changes) is always run again."""
    from vramcalc.serve import AnswerCache

    query = "/api/plan?model=qwen2.5-0.5b&batch=3&seq-len=384"
    first = get(server, query)
    hits = server.answers.hits
    again = get(server, query)
    assert server.answers.hits == hits + 1
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert not AnswerCache.cacheable("check", ["--json", "--model=llama-7b"])
    assert AnswerCache.cacheable("check", ["--json", "--model=llama-7b", "--gpu=t4"])


def test_models_search(server: VramcalcServer) -> None:
    status, _, body = get(server, "/api/models?q=qwen+7b")
    names = [m["name"] for m in json.loads(body)["models"]]
    assert status == 200 and names and all("qwen" in n and "7b" in n for n in names)
    _, _, body = get(server, "/api/models?q=Meta-Llama/Llama-3.1-8B")  # an alias, any case
    assert [m["name"] for m in json.loads(body)["models"]] == ["llama-3.1-8b"]


def test_page_and_assets_are_served(server: VramcalcServer) -> None:
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                       ("/static/style.css", "text/css")):
        status, headers, body = get(server, path)
        assert status == 200 and headers["content-type"].startswith(kind) and body
    _, _, page = get(server, "/")
    # every asset is local: no CDN, works offline
    assert not re.search(rb"(src|href)=\"(https?:)?//", page)


# ---- bad requests --------------------------------------------------------------------------

BAD = [
    ("/api/plan?model=llama-3.1-8b&batch=-1", 400, "--batch must be a positive integer"),
    ("/api/plan?model=llama-3.1-8b&batch=abc", 400, "Invalid value for '--batch'"),
    ("/api/plan?model=llama-3.1-8b&seq-len=99999999999", 400, "--seq-len"),
    ("/api/plan?model=llama-3.1-8b&rank=1e9", 400, "rank"),
    ("/api/plan?model=llama-3.1-8b&gpu-memory=nan", 400, "--gpu-memory"),
    ("/api/plan?model=no-such-model", 400, "unknown model"),
    ("/api/plan?model=llama-3.1-8b&bogus=1", 400, "unknown parameter 'bogus'"),
    ("/api/plan?model=llama-3.1-8b&dora=maybe", 400, "true or false"),
    ("/api/plan?model=llama-3.1-8b&batch=1&batch=2", 400, "give it once"),
    ("/api/plan?model=/etc/passwd", 400, "not paths"),
    ("/api/plan?model=../config.json", 400, "not paths"),
    ("/api/plan?model=upload:0123456789abcdef", 404, "upload the config.json again"),
    ("/api/plan?model=upload:../../etc", 400, "not an upload id"),
    ("/api/plan?from-config=/etc/passwd", 400, "reads a file"),
    ("/api/plan?model=llama-3.1-8b&lengths=/etc/passwd", 400, "reads a file"),
    ("/api/sweep?model=llama-3.1-8b&plot=/tmp/x.png", 400, "writes a file"),
    ("/api/check?model=llama-3.1-8b" + "&gpu=t4" * 17, 400, "at most 16"),
    ("/api/sweep?model=llama-3.1-8b&over=seq-len=1:999999:%2B1", 400, "points"),
    ("/api/nothing", 404, "no such page"),
    ("/static/../serve.py", 404, "no such"),
    ("/static/app.js.map", 404, "no such file"),
]


@pytest.mark.parametrize("path,status,message", BAD)
def test_bad_requests_get_a_4xx_with_a_message(server: VramcalcServer, path: str, status: int,
                                               message: str) -> None:
    got, headers, body = get(server, path)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert message in error and "Traceback" not in error


def test_long_query_is_refused(server: VramcalcServer) -> None:
    status, _, body = get(server, "/api/plan?model=" + "x" * (MAX_QUERY_BYTES + 1))
    assert status == 414 and "longer than" in json.loads(body)["error"]


def test_foreign_host_header_is_refused(server: VramcalcServer) -> None:
    """A page whose own name resolves to 127.0.0.1 (DNS rebinding) cannot use the API."""
    status, _, body = get(server, "/api/plan?model=llama-3.1-8b", Host="attacker.example:80")
    assert status == 421 and "not this server" in json.loads(body)["error"]
    assert get(server, "/api/models", Host=f"localhost:{server.server_address[1]}")[0] == 200


# ---- uploads -------------------------------------------------------------------------------


@pytest.mark.replay
def test_upload_config_then_plan_it(server: VramcalcServer, tmp_path: Path) -> None:
    raw = json.dumps(TINY_CONFIG).encode()
    status, _, body = request(server, "POST", "/api/config", raw,
                              {"Content-Type": "application/json"})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model"].startswith("upload:") and answer["spec"]["num_hidden_layers"] == 2
    upload_id = answer["model"].removeprefix("upload:")
    stored = server.uploads.root / upload_id / "config.json"
    assert stored.read_bytes() == raw
    params = [("model", answer["model"]), ("batch", "2"), ("seq-len", "256")]
    assert_same_as_cli(server, "plan", params,
                       ["--model", str(stored), "--batch", "2", "--seq-len", "256"])


@pytest.mark.parametrize("body,message", [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (json.dumps({"model_type": "t5", "is_encoder_decoder": True}).encode(), "encoder-decoder"),
    (b"[1, 2]", "JSON object"),
])
def test_bad_uploads_get_a_400(server: VramcalcServer, body: bytes, message: str) -> None:
    status, _, answer = request(server, "POST", "/api/config", body,
                                {"Content-Type": "application/json"})
    assert status == 400 and message in json.loads(answer)["error"]


def test_body_size_limit(server: VramcalcServer) -> None:
    big = b" " * (MAX_BODY_BYTES + 1)
    status, _, answer = request(server, "POST", "/api/config", big,
                                {"Content-Type": "application/json"})
    assert status == 413 and "at most" in json.loads(answer)["error"]
    # a length far past it: refused from the header, the body never read
    status, _, answer = request(server, "POST", "/api/config", b"{}",
                                {"Content-Length": str(10 * 2**30)})
    assert status == 413 and "at most" in json.loads(answer)["error"]
    status, _, answer = request(server, "POST", "/api/plan", b"{}")
    assert status == 404


# ---- the command ---------------------------------------------------------------------------


def test_serve_binds_loopback_and_prints_the_port() -> None:
    """`vramcalc serve --port 0 --no-browser` listens on 127.0.0.1 at a free port it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vramcalc", "serve", "--port", "0",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=60)
        conn.request("GET", "/api/models?q=llama-3.1-8b")
        res = conn.getresponse()
        assert res.status == 200 and json.loads(res.read())["models"]
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0  # SIGTERM ends it cleanly (its uploads folder removed)


def test_serve_refuses_a_bad_port() -> None:
    code, _, err = cli("serve", "--port", "70000", "--no-browser")
    assert code == 1 and err.startswith("Error: --port must be in 0..65535")


def test_default_host_is_loopback() -> None:
    import inspect

    from vramcalc.commands.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_trainer_presets_for_the_page(server: VramcalcServer) -> None:
    """/api/trainers: each preset's options (trainers.py) by the page's keys; the page
    sets its controls to them, so its plan is `--trainer NAME` with those options."""
    from vramcalc.trainers import TRAINERS

    status, _, body = get(server, "/api/trainers")
    assert status == 200
    presets = json.loads(body)["trainers"]
    assert set(presets) == set(TRAINERS)
    trl = presets["trl"]["controls"]
    assert trl["loss-kernel"] == "trl-fused" and trl["seq-len"] == "1024"
    assert presets["unsloth"]["controls"]["offload-activations"] == "checkpoints"
    assert "--compute-dtype fp32" in presets["hf"]["other"]
    # the controls given explicitly plan what the preset alone plans
    given = [("model", "llama-3.2-1b"), ("trainer", "trl"), *trl.items()]
    alone = [("model", "llama-3.2-1b"), ("trainer", "trl")]
    a = json.loads(get(server, f"/api/plan?{urlencode(given)}")[2])
    b = json.loads(get(server, f"/api/plan?{urlencode(alone)}")[2])
    assert a["required_device_bytes"] == b["required_device_bytes"]
    assert a["plan"] == b["plan"]
