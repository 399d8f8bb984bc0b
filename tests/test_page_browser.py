"""The page of `vramcalc serve` in a real headless browser: Debian's chromium driven by
Playwright (the test extra; .ci/run installs chromium with apt-get). Load the page, move a
slider, read the chart's numbers and the verdicts and compare them with the API, follow a
shared link, export the command and the axolotl YAML and run them, and no console errors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

import pytest

from vramcalc.serve import VramcalcServer, make_server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run "
                "installs it", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra)")

# Playwright's own browser download does not work here: Debian's chromium, headless.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# The page's answers run the allocator replay, as the command line does; conftest.py turns
# it off in the test's own thread unless a test is marked `replay`.
pytestmark = pytest.mark.replay
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server() -> Iterator[VramcalcServer]:
    srv = make_server("127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class Page:
    """One tab on the page, with its console errors and the API answers it received."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.errors: list[str] = []
        self.answers: dict[tuple[str, str], str] = {}  # (endpoint, query) -> body
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", self._record)
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]", timeout=TIMEOUT_MS)

    def _record(self, response: Any) -> None:
        url = urlsplit(response.url)
        if url.path.startswith("/api/") and response.ok:
            self.answers[url.path.removeprefix("/api/"), url.query] = response.text()

    def shown(self, endpoint: str) -> tuple[str, str]:
        """The query and the answer behind what the page draws now (plan or check)."""
        query = self.page.evaluate(f"document.body.dataset.{endpoint}Query")
        return query, self.answers[endpoint, query]

    def last(self, endpoint: str) -> str:
        """The answer of the last request to /api/ENDPOINT."""
        return [body for (e, _), body in self.answers.items() if e == endpoint][-1]

    def generation(self) -> int:
        return int(self.page.evaluate("document.body.dataset.generation || '0'"))

    def settle(self, before: int) -> None:
        """Wait until an update newer than `before` has been drawn."""
        self.page.wait_for_function(f"Number(document.body.dataset.generation) > {before} && "
                                    "!document.querySelector('#status').textContent"
                                    ".includes('computing')", timeout=TIMEOUT_MS)

    def chart(self) -> dict[str, int]:
        return self.page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#bar rect.seg')]"
            ".map(r => [r.dataset.component, Number(r.dataset.bytes)]))")

    def legend(self) -> dict[str, str]:
        return self.page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#legend tr')]"
            ".map(r => [r.dataset.component, r.querySelector('td.num').textContent]))")

    def step_seconds(self) -> dict[str, float]:
        return self.page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.verdict[data-step-seconds]')]"
            ".map(v => [v.dataset.gpu, Number(v.dataset.stepSeconds)]))")

    def verdicts(self) -> dict[str, str]:
        return self.page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.verdict[data-gpu]')]"
            ".map(v => [v.dataset.gpu, v.dataset.certainty]))")


def api(server: VramcalcServer, endpoint: str, query: str) -> Any:
    with urlopen(f"{server.url}api/{endpoint}?{query}", timeout=120) as res:
        return json.loads(res.read())


def assert_axolotl_read_back(tab: Page, tmp_path: Path) -> None:
    """The page's axolotl YAML, read back by `plan --from-config`, plans the page's settings
    as axolotl prepares them: for a 4/8-bit base, norms, embeddings and lm_head in the load
    dtype and fp32 adapters (trainers.py `_AXOLOTL_KBIT` sources; the YAML says so in a
    comment), i.e. the page's exported `plan` command with --no-kbit-prep, to the byte;
    every other field of the plan is the page's."""
    yaml_text = tab.page.evaluate("document.querySelector('#export').dataset.axolotl")
    (tmp_path / "axolotl.yml").write_text(yaml_text)
    out = subprocess.run([sys.executable, "-m", "vramcalc", "plan", "--from-config",
                          str(tmp_path / "axolotl.yml"), "--json"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    shown = json.loads(tab.shown("plan")[1])
    read = json.loads(out.stdout)
    assert shown["plan"]["method"] == "qlora" and shown["plan"]["kbit_prep"] is True
    assert "prepares a 4/8-bit model its own way" in yaml_text
    assert read["plan"] == {**shown["plan"], "kbit_prep": False}
    argv = shlex.split(tab.page.evaluate("document.querySelector('#export').dataset.command"))
    assert argv[:2] == ["vramcalc", "plan"]
    same = subprocess.run([sys.executable, "-m", "vramcalc", *argv[1:], "--no-kbit-prep",
                           "--json"], capture_output=True, text=True)
    assert same.returncode == 0, same.stderr
    assert out.stdout == same.stdout


def nonzero(components: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in components.items() if v > 0}


def test_page_slider_chart_verdicts_link_and_exports(server: VramcalcServer, browser: Any,
                                                     tmp_path: Path) -> None:
    tab = Page(browser, f"{server.url}?model=llama-3.1-8b&seq-len=2048&gpu2=a100-40gb")
    # the chart shows the API's components, byte for byte, and the legend in GiB
    query, body = tab.shown("plan")
    plan = json.loads(body)
    assert tab.chart() == nonzero(plan["components"])
    assert tab.legend() == {k: f"{v / 2**30:.2f}" for k, v in nonzero(plan["components"]).items()}
    check = json.loads(tab.shown("check")[1])
    assert tab.verdicts() == {g["name"]: g["certainty"] for g in check["gpus"]}
    # each catalog card's time is check's, to the digit (the one estimator of time)
    assert tab.step_seconds() == {g["name"]: g["step_seconds"] for g in check["gpus"]}

    # move the batch slider: the chart and the verdicts follow, and the URL holds the state
    latencies = []
    for batch in (2, 4, 8):
        before = tab.generation()
        tab.page.locator("#batch").fill(str(batch))
        tab.settle(before)
        latencies.append((float(tab.page.evaluate("document.body.dataset.chartMs")),
                          float(tab.page.evaluate("document.body.dataset.updateMs"))))
        query, body = tab.shown("plan")
        assert f"batch={batch}" in query
        plan = json.loads(body)
        assert plan["plan"]["batch_size"] == batch
        assert tab.chart() == nonzero(plan["components"])
        assert tab.chart() == nonzero(api(server, "plan", query)["components"])
    print(f"\nslider -> (chart, verdicts) drawn, ms from the last input event (the 30 ms "
          f"debounce included): {latencies}")
    check = api(server, "check", tab.shown("check")[0])
    assert tab.verdicts() == {g["name"]: g["certainty"] for g in check["gpus"]}
    assert check["gpus"][0]["certainty"] == "does_not_fit"  # 8 x 2048 on a 4090
    shown = tab.page.locator("#suggestions ul").first.locator("li").all_inner_texts()
    assert len(shown) == len(check["suggestions"]) > 0
    for text, sg in zip(shown, check["suggestions"], strict=True):
        assert text.startswith(sg["description"]) and sg["flags"] in text
    several = tab.page.locator("#suggestions ul").nth(1).locator("li").all_inner_texts()
    assert len(several) == min(3, len(check["several_gpus"]))

    # the shared link reproduces the plan in a fresh tab
    link = tab.page.url
    assert "batch=8" in link and "seq-len=2048" in link and "gpu2=a100-40gb" in link
    other = Page(browser, link)
    assert other.chart() == tab.chart() and other.verdicts() == tab.verdicts()
    assert other.page.input_value("#batch") == "8"

    # the exported command, run, prints what the page shows
    command = tab.page.evaluate("document.querySelector('#export').dataset.command")
    argv = shlex.split(command)
    assert argv[:2] == ["vramcalc", "check"]
    out = subprocess.run([sys.executable, "-m", "vramcalc", *argv[1:], "--json"],
                         capture_output=True, text=True)
    assert out.returncode in (0, 3), out.stderr
    assert json.loads(out.stdout) == check
    # the axolotl YAML, read back by `plan --from-config`, is the page's plan as axolotl
    # prepares a 4-bit model
    one_gpu = Page(browser, f"{server.url}?model=qwen2.5-7b&batch=2&seq-len=1024&rank=32"
                   "&targets=q_proj,v_proj&optimizer=adamw_8bit&gpu=")
    assert_axolotl_read_back(one_gpu, tmp_path)
    # the command for one GPU is `plan`; run it, the same bytes as the API
    argv = shlex.split(one_gpu.page.evaluate("document.querySelector('#export').dataset.command"))
    assert argv[:2] == ["vramcalc", "plan"]
    out = subprocess.run([sys.executable, "-m", "vramcalc", *argv[1:], "--json"],
                         capture_output=True, text=True)
    assert out.stdout == one_gpu.shown("plan")[1]
    tab.page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert tab.errors == [] and other.errors == [] and one_gpu.errors == []


def test_page_curve_compare_fit_and_tasks(server: VramcalcServer, browser: Any) -> None:
    tab = Page(browser, f"{server.url}?model=qwen2.5-0.5b&gpu=t4")
    tab.page.wait_for_selector("#curve-svg[data-done=true]", timeout=TIMEOUT_MS)
    points = tab.page.evaluate("[...document.querySelectorAll('#curve-svg circle.pt')]"
                               ".map(c => [Number(c.dataset.x), Number(c.dataset.bytes)])")
    assert [x for x, _ in points] == [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    for x, required in points:  # each point is plan --json's required memory at that length
        assert required == api(server, "plan", f"model=qwen2.5-0.5b&seq-len={x}")[
            "required_device_bytes"]
    label = tab.page.text_content("#curve-svg .gpu-label") or ""
    assert label.startswith("t4 ") and "fits up to" in label

    tab.page.click("#compare-btn")
    tab.page.wait_for_selector("#compare-table", timeout=TIMEOUT_MS)
    compare = json.loads(tab.last("compare"))
    rows = tab.page.locator("#compare-table tbody tr").count()
    assert rows == len(compare["methods"])

    tab.page.click("#fit-btn")
    tab.page.wait_for_selector("#fit-table", timeout=TIMEOUT_MS)
    fit = json.loads(tab.last("fit"))
    assert tab.page.locator("#fit-table tbody tr").count() == sum(r["fits"] for r in fit["rows"])

    before = tab.generation()
    tab.page.check("input[name=task][value=infer]")
    tab.settle(before)
    query, body = tab.shown("plan")
    assert "task=infer" in query and json.loads(body)["task"] == "infer"
    assert tab.chart() == nonzero(json.loads(body)["components"])
    assert tab.errors == []


def test_bad_input_shows_the_error_line(server: VramcalcServer, browser: Any) -> None:
    tab = Page(browser, f"{server.url}?model=llama-3.1-8b&targets=nope_proj")
    tab.page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
    assert "nope_proj" in tab.page.inner_text("#error")
    # the browser logs the 400 itself; nothing else went wrong
    assert all("400" in e for e in tab.errors), tab.errors


def test_uploaded_config_is_planned(server: VramcalcServer, browser: Any,
                                    tmp_path: Path) -> None:
    """A config.json chosen in the page is uploaded, planned, and kept in the link."""
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    tab = Page(browser, f"{server.url}?model=llama-3.1-8b&gpu=")
    before = tab.generation()
    tab.page.set_input_files("#upload", str(path))
    tab.settle(before)
    query, body = tab.shown("plan")
    model = tab.page.input_value("#model")
    assert model.startswith("upload:") and "model=upload%3A" in query
    stored = server.uploads.root / model.removeprefix("upload:") / "config.json"
    out = subprocess.run([sys.executable, "-m", "vramcalc", "plan", "--json", "--model",
                          str(stored)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == body
    assert "2 layers" in tab.page.inner_text("#model-info")
    assert f"model={model.replace(':', '%3A')}" in tab.page.url
    assert tab.errors == []


def test_slider_latency_is_reported(server: VramcalcServer, browser: Any) -> None:
    """Slider move -> chart drawn, in this browser on this machine (printed; the estimate
    itself is most of it)."""
    tab = Page(browser, f"{server.url}?model=llama-3.1-8b")
    times = []
    for i in (3, 4, 5, 6, 5, 4):
        before = tab.generation()
        t0 = time.perf_counter()
        tab.page.locator("#seq").fill(str(i))
        tab.settle(before)
        times.append((float(tab.page.evaluate("document.body.dataset.chartMs")),
                      float(tab.page.evaluate("document.body.dataset.updateMs")),
                      (time.perf_counter() - t0) * 1000))
    print("\nslider -> (chart, verdicts, test's own clock) ms:",
          [tuple(round(t) for t in row) for row in times])
    assert all(0 < chart <= verdicts for chart, verdicts, _ in times)


def test_memory_saver_controls(server: VramcalcServer, browser: Any, tmp_path: Path) -> None:
    """The loss kernel and offloading controls: the query carries them, the chart is the
    API's plan with them, the total names the host memory, the link keeps them, and the
    axolotl YAML exported, read back by `plan --from-config`, plans the same bytes; the
    trainer preset sets the controls to its defaults."""
    tab = Page(browser, f"{server.url}?model=qwen2.5-7b&batch=2&seq-len=1024&gpu=")
    for control, value in (("#loss-kernel", "liger"), ("#offload-activations", "all")):
        before = tab.generation()
        tab.page.select_option(control, value)
        tab.settle(before)
    query, body = tab.shown("plan")
    assert "loss-kernel=liger" in query and "offload-activations=all" in query
    plan = json.loads(body)
    assert plan["plan"]["loss_kernel"] == "liger" and plan["host_bytes"] > 0
    assert tab.chart() == nonzero(api(server, "plan", query)["components"])
    assert f"host {plan['host_bytes'] / 2**30:.2f} GiB" in tab.page.inner_text("#total")
    assert "loss-kernel=liger" in tab.page.url
    other = Page(browser, tab.page.url)
    assert other.page.input_value("#loss-kernel") == "liger"
    assert other.chart() == tab.chart()
    yaml_text = tab.page.evaluate("document.querySelector('#export').dataset.axolotl")
    assert "liger_fused_linear_cross_entropy: true" in yaml_text
    assert_axolotl_read_back(tab, tmp_path)
    # a trainer preset: the controls take its defaults, the plan is `--trainer trl`'s
    before = tab.generation()
    tab.page.select_option("#trainer", "trl")
    tab.settle(before)
    assert tab.page.input_value("#loss-kernel") == "trl-fused"
    assert tab.page.input_value("#offload-activations") == "none"
    query, body = tab.shown("plan")
    assert "trainer=trl" in query
    alone = api(server, "plan", "model=qwen2.5-7b&trainer=trl")
    assert json.loads(body)["plan"] == alone["plan"]
    assert tab.errors == [] and other.errors == []
