"""compare (one model, every method), fit (every model, one GPU) and the faster search
behind fit: the same rule, estimate and usable memory as plan / check."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from rich.console import Console
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.hardware.catalog import catalog, resolve_gpu
from vramcalc.memory.estimate import estimate
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.models.spec import catalog as model_catalog
from vramcalc.plans import TrainPlan
from vramcalc.render import print_comparison, print_fit
from vramcalc.sizing.advice import for_gpu
from vramcalc.sizing.comparison import (
    COMPARE_METHODS,
    FIT_METHODS,
    compare,
    fit_rows,
    method_plan,
)
from vramcalc.sizing.search import UPPER_LIMIT, largest_at_most, largest_fitting, largest_near
from vramcalc.sizing.verdict import certain_need, fits_certainly

GIB = 2**30
MARGIN = GIB // 2
runner = CliRunner()


# ---- the search -----------------------------------------------------------------------------


def _reference(need: Callable[[int], int], budget: int, upper: int) -> int:
    """The plain doubling + bisection the search replaced."""
    if need(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= upper and need(hi) <= budget:
        lo, hi = hi, hi * 2
    if hi > upper:
        return lo if hi // 2 == upper or need(upper) > budget else upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
    return lo


def _brute(need: Callable[[int], int], budget: int, upper: int) -> int:
    return max((n for n in range(1, upper + 1) if need(n) <= budget), default=0)


SHAPES: dict[str, Callable[[int], int]] = {
    "linear": lambda n: 1000 + 37 * n,
    "quadratic": lambda n: 500 + 3 * n + n * n,
    "sqrt": lambda n: 100 + int(4000 * n**0.5),
    "staircase": lambda n: 1000 * (n // 16),
    "jump": lambda n: 10 if n < 7 else 10**6 + n,
    "flat": lambda n: 5,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_search_is_exact_on_monotone_shapes(shape: str) -> None:
    need = SHAPES[shape]
    upper = 3000
    for budget in [0, 4, 5, 10, 999, 1000, 1037, 5000, 20000, 123457, 10**6 + 50, 10**9]:
        calls = 0

        def counted(n: int) -> int:
            nonlocal calls
            assert 1 <= n <= upper, n  # never past the limit, never the sentinel
            calls += 1
            return need(n)

        got = largest_at_most(counted, budget, upper)
        assert got == _brute(need, budget, upper), (shape, budget)
        assert calls <= 2 * 2 * 12 + 2  # within about twice the plain search


def test_search_matches_random_monotone_functions() -> None:
    rng = random.Random(11)
    for _ in range(300):
        upper = rng.randint(1, 600)
        steps = [rng.choice([0, 0, 1, 5, 80]) for _ in range(upper)]
        table = [-1] + [sum(steps[: i + 1]) for i in range(upper)]  # need(n) = table[n]
        budget = rng.randint(-1, table[-1] + 3)
        need = table.__getitem__
        assert largest_at_most(need, budget, upper) == _brute(need, budget, upper)


@pytest.mark.parametrize("what", ["batch", "seq-len"])
def test_search_agrees_with_plain_search_on_real_estimates(what: str) -> None:
    field = {"batch": "batch_size", "seq-len": "seq_len"}[what]
    for name in ("qwen2.5-0.5b", "llama-3.1-8b", "gemma-2-9b", "phi-3-mini"):
        spec = get_spec(name)
        for method in FIT_METHODS:
            plan = method_plan(TrainPlan(), method)
            def need(n: int, spec: ModelSpec = spec, plan: TrainPlan = plan) -> int:
                return certain_need(estimate(spec, plan.model_copy(update={field: n})
                                             ).required_device_bytes, MARGIN)

            for gib in (8, 24, 80):
                got = largest_fitting(spec, plan, what, gib * GIB, MARGIN)
                assert got == _reference(need, gib * GIB, UPPER_LIMIT), (name, method, gib)


def test_search_from_a_guess_and_a_slope_is_exact() -> None:
    """largest_near with a slope (search.largest_from_guess's): exact for any guess and any
    positive slope, near or far, on monotone shapes and random staircases; a guess on the
    boundary with its true slope takes two estimates, one off by a few steps three."""
    rng = random.Random(26)
    for shape, need in SHAPES.items():
        upper = 3000
        for budget in [0, 5, 1037, 20000, 10**6 + 50]:
            want = _brute(need, budget, upper)
            for n in {1, 2, max(want, 1), want + 1, want + 7, rng.randint(1, upper), upper}:
                for slope in (1, 37, 1000, 10**7):
                    calls: list[int] = []

                    def counted(m: int, need: Callable[[int], int] = need,
                                calls: list[int] = calls, upper: int = upper) -> int:
                        assert 1 <= m <= upper, m
                        calls.append(m)
                        return need(m)

                    got = largest_near(counted, budget, min(n, upper), upper, slope)
                    assert got == want, (shape, budget, n, slope)
    for _ in range(300):
        upper = rng.randint(1, 400)
        steps = [rng.choice([0, 1, 5, 80]) for _ in range(upper)]
        table = [-1] + [sum(steps[: i + 1]) for i in range(upper)]
        budget = rng.randint(-1, table[-1] + 3)
        n, slope = rng.randint(1, upper), rng.choice([1, 2, 5, 40, 1000])
        assert largest_near(table.__getitem__, budget, n, upper, slope) == _brute(
            table.__getitem__, budget, upper)
    linear = SHAPES["linear"]
    seen: list[int] = []
    assert largest_near(lambda m: seen.append(m) or linear(m), 1000 + 37 * 50, 50, 3000,
                        37) == 50
    assert seen == [50, 51]
    seen.clear()
    assert largest_near(lambda m: seen.append(m) or linear(m), 1000 + 37 * 50, 46, 3000,
                        37) == 50
    assert seen == [46, 50, 51]


def test_search_stops_at_the_upper_limit() -> None:
    assert largest_at_most(lambda n: 0, 1, UPPER_LIMIT) == UPPER_LIMIT
    assert largest_at_most(lambda n: n, UPPER_LIMIT - 3, UPPER_LIMIT) == UPPER_LIMIT - 3


# ---- compare ----------------------------------------------------------------------------------


def test_compare_rows_use_each_method_and_the_fit_rule() -> None:
    spec = get_spec("llama-3.1-8b")
    base = TrainPlan(batch_size=2, seq_len=1024, rank=32)
    rows = compare(spec, base, MARGIN, catalog())
    assert [r.method for r in rows] == list(COMPARE_METHODS)
    by = {r.method: r for r in rows}
    expected = {"full": ("full", "none", None, "adamw_torch_fused"),
                "full-fp32": ("full", "none", "fp32", "adamw_torch_fused"),
                "lora": ("lora", "none", None, "paged_adamw_8bit"),
                "qlora": ("qlora", "nf4", None, "paged_adamw_8bit"),
                "int8": ("qlora", "int8", None, "paged_adamw_8bit")}
    for name, (method, quant, wd, opt) in expected.items():
        p = by[name].plan
        assert (p.method, p.quant, p.weights_dtype, p.optimizer) == (method, quant, wd, opt)
        assert (p.batch_size, p.seq_len, p.rank) == (2, 1024, 32)  # shared options kept
        TrainPlan.model_validate(p.model_dump())  # a valid plan, though copied unvalidated
        est = by[name].estimate
        assert est is not None and est == estimate(spec, p)
    need = {n: r.estimate.required_device_bytes for n, r in by.items() if r.estimate}
    assert need["full-fp32"] > need["full"] > need["lora"] > need["qlora"]
    # int8 keeps every layer's fp32 inputs outside checkpointing (activations.py,
    # measured on the H200): above QLoRA, and not necessarily below 16-bit LoRA
    assert need["int8"] > need["qlora"]
    # the smallest GPU: fits by the rule there, and no GPU with less usable memory does
    for r in rows:
        small = r.smallest_gpu
        assert small is not None
        gpu = resolve_gpu(small.gpu)
        p = for_gpu(r.plan, gpu.bf16_supported)
        assert small.verdict.required_bytes == estimate(spec, p).required_device_bytes
        assert small.verdict.certainty == "fits"
        assert small.verdict.memory_bytes == gpu.usable_bytes
        for g in catalog():
            if g.usable_bytes < gpu.usable_bytes:
                q = for_gpu(r.plan, g.bf16_supported)
                assert not fits_certainly(g.usable_bytes, estimate(spec, q).required_device_bytes,
                                          MARGIN)


def test_compare_user_optimizer_applies_to_every_row() -> None:
    rows = compare(get_spec("qwen2.5-0.5b"), TrainPlan(), MARGIN, catalog(),
                   optimizer="adamw_8bit")
    assert {r.plan.optimizer for r in rows} == {"adamw_8bit"}


def test_compare_row_that_cannot_start_says_why() -> None:
    rows = compare(get_spec("mixtral-8x7b"), TrainPlan(), MARGIN, catalog())
    by = {r.method: r for r in rows}
    for name in ("lora", "qlora", "int8"):
        assert by[name].estimate is None and by[name].smallest_gpu is None
        assert "lora_dropout" in str(by[name].error)
    assert by["full"].estimate is not None and by["full"].error is None
    console = Console(width=80, record=True, force_terminal=False)
    print_comparison("mixtral-8x7b", 1, rows, MARGIN, console)
    text = console.export_text()
    assert text.count("cannot start") == 4  # three cells, one reason said once
    assert all(len(line) <= 80 for line in text.splitlines())


def test_compare_cli_text_and_json() -> None:
    r = runner.invoke(app, ["compare", "-m", "llama-3.1-8b", "--seq-len", "1024"],
                      terminal_width=80)
    assert r.exit_code == 0, r.output
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    for label in ("full (bf16)", "full, fp32 master", "LoRA (bf16 base)", "QLoRA (nf4)",
                  "8-bit LoRA (int8)"):
        assert label in r.stdout
    j = runner.invoke(app, ["compare", "-m", "llama-3.1-8b", "--seq-len", "1024", "--json"])
    assert j.exit_code == 0
    data = json.loads(j.stdout)
    assert [m["method"] for m in data["methods"]] == list(COMPARE_METHODS)
    spec = get_spec("llama-3.1-8b")
    for m in data["methods"]:
        p = TrainPlan.model_validate(m["plan"])
        est = estimate(spec, p)
        assert m["peak_allocated_bytes"] == est.peak_allocated_bytes
        assert m["required_device_bytes"] == est.required_device_bytes
        assert m["smallest_gpu"]["certainty"] in ("fits", "tight")
        assert f"{est.required_device_bytes / GIB:.2f}" in r.stdout


def test_compare_and_fit_do_not_offer_per_method_options() -> None:
    """The method, --quant and --weights-dtype are set per row: not options of either."""
    for cmd in (["compare", "-m", "llama-3.1-8b"], ["fit", "--gpu", "t4"]):
        for extra in (["--method", "full"], ["--quant", "int8"], ["--weights-dtype", "fp32"]):
            r = runner.invoke(app, [*cmd, *extra])
            assert r.exit_code == 2
            assert "No such option" in r.stderr and extra[0] in r.stderr
        assert "--weights-dtype" not in runner.invoke(app, [cmd[0], "--help"]).stdout


@pytest.mark.parametrize(("args", "code", "text"), [
    (["compare", "-m", "no-such-model"], 1, "unknown model"),
    (["compare", "-m", "llama-3.1-8b", "--batch", "0"], 1, "--batch"),
    (["compare", "-m", "llama-3.1-8b", "--targets", "nope"], 1, "unknown target module"),
    (["compare", "-m", "llama-3.1-8b", "--margin", "-1"], 1, "--margin"),
    (["compare"], 2, "--model"),
    (["fit", "--gpu", "no-such-gpu"], 1, "unknown GPU"),
    (["fit", "--gpu", "t4", "--optimizer", "nope"], 1, "unknown optimizer"),
    (["fit"], 2, "--gpu"),
])
def test_bad_inputs_are_one_error_line(args: list[str], code: int, text: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and text in r.stderr
    if code == 1:
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ")


# ---- fit ----------------------------------------------------------------------------------------


def test_fit_rows_against_the_rule_and_the_search() -> None:
    gpu = resolve_gpu("rtx-4090")
    base = TrainPlan(seq_len=1024, batch_size=2)
    specs = [get_spec(n) for n in ("qwen2.5-0.5b", "llama-3.1-8b", "llama-3.1-70b",
                                   "mixtral-8x7b")]
    rows = fit_rows(specs, base, gpu, MARGIN)
    assert len(rows) == len(specs) * len(FIT_METHODS)
    memory = gpu.usable_bytes

    def fits(plan: TrainPlan) -> bool:  # what plan --gpu calls "fits" (not tight)
        return fits_certainly(memory, estimate(spec, plan).required_device_bytes, MARGIN)

    for r in rows:
        spec = get_spec(r.model)
        p = for_gpu(method_plan(base, r.method), gpu.bf16_supported)
        if r.error is not None:
            assert r.model == "mixtral-8x7b" and r.method != "full" and not r.fits
            continue
        need1 = estimate(spec, p.model_copy(update={"batch_size": 1})).required_device_bytes
        assert r.required_device_bytes == need1
        assert r.fits == (need1 + MARGIN <= gpu.usable_bytes)
        if not r.fits:
            assert r.max_batch == r.max_seq_len == 0
            continue
        b = r.max_batch  # 0: tight at batch 1
        assert b or r.verdict is not None and r.verdict.certainty == "tight"
        assert not b or fits(p.model_copy(update={"batch_size": b}))
        assert not fits(p.model_copy(update={"batch_size": b + 1}))
        s = r.max_seq_len
        if s:  # at the plan's batch (2)
            assert fits(p.model_copy(update={"seq_len": s}))
            assert not fits(p.model_copy(update={"seq_len": s + 1}))
    fits = {(r.model, r.method) for r in rows if r.fits}
    assert ("qwen2.5-0.5b", "full") in fits and ("llama-3.1-8b", "qlora") in fits
    assert ("llama-3.1-8b", "full") not in fits and ("llama-3.1-70b", "qlora") not in fits


def test_fit_uses_fp16_without_bf16() -> None:
    rows = fit_rows([get_spec("qwen2.5-0.5b")], TrainPlan(), resolve_gpu("t4"), MARGIN)
    p = for_gpu(method_plan(TrainPlan(), "qlora"), False)
    assert p.compute_dtype == "fp16"
    (q,) = [r for r in rows if r.method == "qlora"]
    assert q.required_device_bytes == estimate(get_spec("qwen2.5-0.5b"),
                                               p).required_device_bytes


def test_fit_cli_json_covers_every_pair_and_text_fits_80_columns() -> None:
    j = runner.invoke(app, ["fit", "--gpu", "l4", "--json"])
    assert j.exit_code == 0, j.output
    data = json.loads(j.stdout)
    assert data["gpu"] == "l4" and data["gpu_memory_bytes"] == resolve_gpu("l4").usable_bytes
    assert len(data["rows"]) == len(model_catalog()) * len(FIT_METHODS)
    fitting = [r for r in data["rows"] if r["fits"]]
    assert fitting and all(r["certainty"] in ("fits", "tight") for r in fitting)
    # the largest batch is one that fits whatever the allocator does
    assert all(r["max_batch"] >= 1 for r in fitting if r["certainty"] == "fits")
    assert any(r["error"] for r in data["rows"])  # mixtral's LoRA rows cannot start
    t = runner.invoke(app, ["fit", "--gpu", "l4"], terminal_width=80)
    assert t.exit_code == 0
    assert all(len(line) <= 80 for line in t.stdout.splitlines())
    for r in fitting:
        assert any(line.split("│")[1].strip() == r["model"] and r["method"] in line
                   and str(r["max_batch"] or "-") in line for line in t.stdout.splitlines()
                   if line.count("│") > 2)


def test_fit_render_marks_sequences_past_the_context() -> None:
    rows = fit_rows([get_spec("llama-7b")], TrainPlan(), resolve_gpu("h100"), MARGIN)
    console = Console(width=80, record=True, force_terminal=False)
    print_fit("h100-sxm", resolve_gpu("h100").usable_bytes, rows, MARGIN, TrainPlan(),
              console)
    text = console.export_text()
    assert "*" in text and "max_position_embeddings" in text


@pytest.mark.parametrize("cmd", ["compare", "fit"])
def test_help_at_80_columns(cmd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    r = runner.invoke(app, [cmd, "--help"], terminal_width=80)
    assert r.exit_code == 0 and "…" not in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert "adamw_torch_fused" in r.stdout and "Examples:" in r.stdout


def test_api_check_agrees_with_cli_check() -> None:
    """The Python API decides by check's rule: usable memory, certainty and spread."""
    from vramcalc import check

    for gpu, seq in (("rtx-4090", 1024), ("rtx-4090", 6144), ("t4", 4096)):
        res = check("llama-3.1-8b", gpus=[gpu], seq_len=seq)
        (v,) = res.verdicts
        r = runner.invoke(app, ["check", "-m", "llama-3.1-8b", "--gpu", gpu, "--seq-len",
                                str(seq), "--json"])
        cli = json.loads(r.stdout)["gpus"][0]
        assert v.memory_bytes == cli["free_bytes"] == resolve_gpu(gpu).usable_bytes
        assert (v.fits, v.certainty, v.spread_bytes, v.required_bytes) == (
            cli["fits_free"], cli["certainty"], cli["spread_bytes"],
            cli["required_device_bytes"])


def test_compare_says_when_the_stack_runs_another_plan() -> None:
    """falcon's QLoRA rows are planned as LoRA on an fp32 base (effective.py): the table's
    QLoRA needs more than 16-bit LoRA, and the lines under it say why, once."""
    result = CliRunner().invoke(app, ["compare", "-m", "falcon-7b"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("does not quantize its Linears") == 1
    assert "QLoRA (nf4), 8-bit LoRA (int8): falcon-7b" in result.output
    data = json.loads(CliRunner().invoke(app, ["compare", "-m", "falcon-7b", "--json"]).output)
    qlora = next(m for m in data["methods"] if m["method"] == "qlora")
    assert qlora["planned_as"] == {"method": "lora", "quant": "none", "weights_dtype": "fp32",
                                   "attn": "eager"}


def test_search_along_the_secant_of_known_points_is_exact() -> None:
    """largest_near with a known point (search.largest_from_guess's anchor): exact for any
    known value, however wrong its need, on monotone shapes and random staircases; on a
    line, a slope off by a factor 3 reaches the boundary along the secant."""
    rng = random.Random(27)
    for shape, need in SHAPES.items():
        upper = 3000
        for budget in [0, 5, 1037, 20000, 10**6 + 50]:
            want = _brute(need, budget, upper)
            for n in {1, max(want, 1), want + 7, rng.randint(1, upper), upper}:
                for known in {1, max(want - 40, 1), want + 3, rng.randint(1, upper)}:
                    for lie in (0, 1, -(10**9)):
                        got = largest_near(need, budget, min(n, upper), upper, 37,
                                           (known, need(known) + lie))
                        assert got == want, (shape, budget, n, known, lie)
    for _ in range(300):
        upper = rng.randint(1, 400)
        steps = [rng.choice([0, 1, 5, 80]) for _ in range(upper)]
        table = [-1] + [sum(steps[: i + 1]) for i in range(upper)]
        budget = rng.randint(-1, table[-1] + 3)
        n, known = rng.randint(1, upper), rng.randint(1, upper)
        assert largest_near(table.__getitem__, budget, n, upper, rng.choice([1, 5, 1000]),
                            (known, table[known])) == _brute(table.__getitem__, budget, upper)
    linear = SHAPES["linear"]
    seen: list[int] = []
    assert largest_near(lambda m: seen.append(m) or linear(m), 1000 + 37 * 50, 20, 3000,
                        3 * 37, (1, linear(1))) == 50
    assert seen == [20, 50, 51]
