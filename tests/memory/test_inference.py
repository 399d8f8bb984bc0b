"""Inference and merging (`plan --task infer|merge`): formulas by hand, invariants, real
transformers / peft tensors of tiny models on CPU, and the CLI contract."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.memory.allocator.replay import LARGE_BUFFER
from vramcalc.memory.inference import (
    adapter_bytes,
    estimate_inference,
    estimate_merge,
    growing_tensors_reserved,
    kv_cache_bytes,
    layer_live_bytes,
    layer_windows,
    linear_peak,
    merged_disk_bytes,
    segment_bytes,
)
from vramcalc.models.spec import ModelSpec, get_spec
from vramcalc.plans import InferPlan, MergePlan
from vramcalc.units import MiB

# in / intermediate multiples of 64: bitsandbytes' CPU 4-bit path needs whole blocks per row
TINY = dict(name="tiny-llama", model_type="llama", vocab_size=320, hidden_size=128,
            intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TINY_GEMMA2 = dict(name="tiny-gemma2", model_type="gemma2", vocab_size=256, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                   norms_per_layer=4,
                   extra_config={"sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh",
                                 "query_pre_attn_scalar": 16})


def spec_(kw: dict) -> ModelSpec:  # type: ignore[type-arg]
    return ModelSpec(**kw)


# ---- formulas by hand -----------------------------------------------------------------------


def test_kv_cache_by_hand() -> None:
    spec = spec_(TINY)  # 2 layers, 2 kv heads, head_dim 32, bf16
    plan = InferPlan(batch_size=3, prompt_len=10, new_tokens=6)
    # 15 tokens (10 + 6 - 1) x 3 x 2 heads x 32 x 2 B = 5760 B -> 6144 (512-rounded), K and V
    assert kv_cache_bytes(spec, plan) == 2 * 2 * 6144
    # static: max_cache_len is the same 15 tokens
    assert kv_cache_bytes(spec, plan.model_copy(update={"cache": "static"})) == 2 * 2 * 6144


def test_sliding_layers_by_hand() -> None:
    spec = spec_(TINY_GEMMA2)  # window 8 on layers 0 and 2, per token 1 x 2 x 16 x 2 = 64 B
    assert layer_windows(spec) == [8, None, 8]
    plan = InferPlan(prompt_len=5, new_tokens=9, quant="none")  # 13 tokens at the end
    assert kv_cache_bytes(spec, plan) == 2 * (2 * 512 + 1024)  # 8 x 64 -> 512; 13 x 64 -> 1024
    # one new token: only the prefill ran; sliding layers keep a view of the whole prompt
    plan = InferPlan(prompt_len=12, new_tokens=1, quant="none")
    assert kv_cache_bytes(spec, plan) == 2 * 3 * 1024


def test_adapter_bytes_by_hand() -> None:
    spec = spec_(TINY)
    lora = InferPlan(rank=8, targets="q_proj,v_proj").lora_plan()
    # q: A 8x128, B 128x8; v: A 8x128, B 64x8 -> fp32: 4096, 4096, 4096, 2048 per layer
    assert adapter_bytes(spec, lora, "fp32") == 2 * (4096 * 3 + 2048)
    assert adapter_bytes(spec, lora, "bf16") == 2 * (2048 * 3 + 1024)


def test_linear_peak_by_hand() -> None:
    """peft Linear4bit.forward: clone of the base output, x cast to fp32, B(A(x)) and its
    scaled copy in fp32 alive at once; the dequantized weight only while F.linear runs."""
    spec = spec_(TINY)
    up = next(lin for lin in spec.block_linears() if lin.role == "up")  # 128 -> 384
    plan = InferPlan(rank=8)  # nf4, bf16 compute, fp32 adapter
    t = 1024
    out_c, x32, r32, out32 = t * 384 * 2, t * 128 * 4, t * 8 * 4, t * 384 * 4
    assert linear_peak(t, up, plan, wrapped=True) == out_c + x32 + r32 + 2 * out32
    # not wrapped: the output and the weight dequantized to bf16 (384 x 128 x 2 B)
    assert linear_peak(t, up, plan, wrapped=False) == out_c + 384 * 128 * 2
    # a bf16 adapter: no cast of x, B(A(x)) and its scaled copy in bf16
    bf16 = plan.model_copy(update={"adapter_dtype": "bf16"})
    assert linear_peak(t, up, bf16, wrapped=True) == out_c + t * 8 * 2 + 2 * out_c


def test_mlp_runs_up_proj_next_to_one_intermediate_tensor() -> None:
    """LlamaMLP down(act(gate(x)) * up(x)): the prefill peak of a wide-MLP layer is
    act(gate) + up_proj's LoRA peak, plus the layer input, the residual and the normed sum
    (per token: 12 x intermediate + 6 x hidden bytes for bf16 + fp32 LoRA; the measured
    H200 run 3 points give 12 x intermediate + 12 x hidden with the embeddings output and
    the position embeddings outside the layer)."""
    spec = spec_(TINY)
    t = 4096
    plan = InferPlan(batch_size=1, prompt_len=t, rank=8, quant="none")
    up = next(lin for lin in spec.block_linears() if lin.role == "up")
    mlp = 3 * t * 128 * 2 + t * 384 * 2 + linear_peak(t, up, plan, wrapped=True)
    assert layer_live_bytes(spec, plan, t, t) == mlp


def test_allocator_segments_by_hand() -> None:
    assert segment_bytes(1000) == 2 * MiB
    assert segment_bytes(3 * MiB) == LARGE_BUFFER
    assert segment_bytes(10 * MiB + 1) == 12 * MiB
    # 4 tensors growing from 11 MiB to 13 MiB: segments 12 then 14 MiB; the 12 MiB ones
    # (4 + the rotating one) stay cached
    sizes = [11 * MiB, 12 * MiB, 13 * MiB]
    assert growing_tensors_reserved(4, sizes) == 5 * 14 * MiB + 5 * 12 * MiB


def test_merge_by_hand() -> None:
    spec = spec_(TINY)
    plan = MergePlan(rank=4, targets="down_proj")
    est = estimate_merge(spec, plan)
    # down_proj 128 x 384: (B @ A) and its scaled copy in fp32
    assert est.components.transient == 2 * 128 * 384 * 4
    # disk: every parameter in bf16 (tensors, no header)
    assert merged_disk_bytes(spec, plan) == 2 * spec.num_params()


# ---- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["batch_size", "prompt_len", "new_tokens"])
@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-2-7b", "gemma-2-2b", "phi-3-mini"])
def test_monotone(model: str, field: str) -> None:
    spec = get_spec(model)
    prev = None
    for n in (1, 8, 64, 512, 4096):
        est = estimate_inference(spec, InferPlan(**{field: n}))
        # reserved memory can fall when the work grows (the replayed allocator places the
        # tensors differently); what decides "fits" must not (issue 27)
        assert est.peak_reserved_bytes >= est.peak_allocated_bytes
        if prev is not None:
            assert est.peak_allocated_bytes >= prev.peak_allocated_bytes
            assert est.required_device_bytes >= prev.required_device_bytes
        prev = est


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-2b"])
def test_static_cache_and_merged_adapter(model: str) -> None:
    spec = get_spec(model)
    plan = InferPlan(batch_size=4, prompt_len=2048, new_tokens=256)
    dyn = estimate_inference(spec, plan)
    static = estimate_inference(spec, plan.model_copy(update={"cache": "static"}))
    # static allocates max_cache_len at the prefill: its prefill holds more. (It does not
    # leave less slack: calibration/h200/run3-infer.jsonl inf05, static, measured 1.81 GiB
    # of reserved - allocated against 1.59 GiB for the same plan with a dynamic cache, inf01.)
    assert static.phases["prefill"] > dyn.phases["prefill"]
    merged = estimate_inference(spec, plan.model_copy(update={"merged": True}))
    assert merged.components.adapter_weights == 0 < dyn.components.adapter_weights
    assert merged.peak_allocated_bytes < dyn.peak_allocated_bytes


@pytest.mark.parametrize("plan", [
    InferPlan(), InferPlan(batch_size=32, prompt_len=8192, new_tokens=512),
    InferPlan(new_tokens=1), InferPlan(quant="none", cache="static"),
])
def test_components_add_up(plan: InferPlan) -> None:
    est = estimate_inference(get_spec("llama-3.1-8b"), plan)
    assert est.components.total() == est.peak_device_bytes
    assert est.peak_allocated_bytes <= est.peak_reserved_bytes <= est.peak_device_bytes
    assert est.required_device_bytes <= est.peak_device_bytes
    m = estimate_merge(get_spec("llama-3.1-8b"), MergePlan(rank=64))
    assert m.components.total() == m.peak_device_bytes


def test_dynamic_cache_leaves_outgrown_segments_reserved() -> None:
    # llama-2-7b, batch 1: 8 KiB per token and tensor, a 2 MiB boundary every 256 tokens
    # from 10 MiB on: each leaves the 64 tensors' (and one rotating) segments cached, with
    # nothing from a short prefill that could reuse them
    est = estimate_inference(get_spec("llama-2-7b"), InferPlan(
        prompt_len=128, new_tokens=4096, merged=True, quant="none"))
    assert est.peak_reserved_bytes - est.peak_allocated_bytes > 65 * 10 * 2**20
    # a 32k prompt's prefill leaves blocks that the growing cache moves into instead: its
    # 2047 decode steps reserve nothing past what the prefill and one decode step reserved
    plan = InferPlan(prompt_len=32768, new_tokens=2048, merged=True)
    long = estimate_inference(get_spec("llama-3.1-8b"), plan)
    one = estimate_inference(get_spec("llama-3.1-8b"), plan.model_copy(update={"new_tokens": 2}))
    assert long.peak_reserved_bytes == one.peak_reserved_bytes


# ---- against real tensors (CPU) -----------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def _load(spec: ModelSpec, tmp_path, quant: str, rank: int, targets: str,  # type: ignore[no-untyped-def]
          merged: bool = False):
    from vramcalc.calibrate.infer_worker import load_with_adapter, make_adapter
    from vramcalc.calibrate.weights import save_random_weights
    from vramcalc.memory.effective import attention_impl

    wdir, adir = tmp_path / "w", tmp_path / "a"
    save_random_weights(spec, str(wdir), device="cpu")
    make_adapter(str(wdir), rank, targets, str(adir))
    model = load_with_adapter(str(wdir), str(adir), quant=quant, compute_dtype="bf16",
                              double_quant=True, device="cpu",
                              attn=attention_impl(spec, "sdpa"))
    return model.merge_and_unload() if merged else model


@pytest.mark.parametrize(("kw", "plan"), [
    (TINY, InferPlan(batch_size=2, prompt_len=7, new_tokens=5)),
    (TINY, InferPlan(batch_size=2, prompt_len=7, new_tokens=5, cache="static", quant="none")),
    (TINY_GEMMA2, InferPlan(batch_size=2, prompt_len=5, new_tokens=9, quant="none")),
    (TINY_GEMMA2, InferPlan(prompt_len=12, new_tokens=1, quant="none")),
])
def test_kv_cache_matches_generate(kw, plan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vramcalc.calibrate.infer_worker import cache_tensor_bytes, generate

    spec = spec_(kw)
    model = _load(spec, tmp_path, plan.quant, 4, "all-linear")
    out = generate(model, spec, plan, "cpu")
    assert out.sequences.shape[1] == plan.prompt_len + plan.new_tokens
    assert cache_tensor_bytes(out.past_key_values, 512) == kv_cache_bytes(spec, plan)


def test_adapter_bytes_as_peft_loads_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = spec_(TINY)
    model = _load(spec, tmp_path, "nf4", 8, "q_proj,v_proj,down_proj")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in lora} == {torch.float32}
    measured = sum(-(-p.numel() * p.element_size() // 512) * 512 for p in lora)
    plan = InferPlan(rank=8, targets="q_proj,v_proj,down_proj")
    assert measured == adapter_bytes(spec, plan.lora_plan(), "fp32")


def test_merged_checkpoint_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vramcalc.calibrate.infer_worker import dir_tensor_bytes

    spec = spec_(TINY)
    merged = _load(spec, tmp_path, "none", 8, "all-linear", merged=True)
    merged.save_pretrained(str(tmp_path / "m"))
    total, header = dir_tensor_bytes(tmp_path / "m")
    assert total - header == merged_disk_bytes(spec, MergePlan(rank=8))


# ---- CLI ----------------------------------------------------------------------------------

runner = CliRunner()
KEYS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes",
        "required_device_bytes", "components", "phases", "peak_phase", "task")


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_cli_infer_json() -> None:
    r = run("plan", "-m", "llama-3.1-8b", "--task", "infer", "--batch", "2", "--prompt-len",
            "1024", "--new-tokens", "64", "--json", "--gpu-memory", "80")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert all(k in out for k in KEYS) and out["task"] == "infer" and out["fits"] is True
    est = estimate_inference(get_spec("llama-3.1-8b"),
                             InferPlan(batch_size=2, prompt_len=1024, new_tokens=64))
    assert out["peak_allocated_bytes"] == est.peak_allocated_bytes
    assert sum(out["components"].values()) == out["peak_device_bytes"]


def test_cli_infer_table_and_does_not_fit() -> None:
    r = run("plan", "-m", "llama-3.1-8b", "--task", "infer", "--batch", "64", "--prompt-len",
            "32768", "--gpu-memory", "80")
    assert r.exit_code == 3
    assert "KV cache" in r.output and "adapter (fp32)" in r.output


def test_cli_merge_json() -> None:
    r = run("plan", "-m", "llama-3.1-8b", "--task", "merge", "--rank", "64", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["task"] == "merge" and out["disk_bytes"] > 16 * 10**9 - 10**9
    assert all(k in out for k in KEYS)
    r = run("plan", "-m", "llama-3.1-8b", "--task", "merge", "--quant", "nf4")
    assert r.exit_code == 0 and "rounding errors" in r.output


def test_cli_max() -> None:
    r = run("plan", "-m", "llama-3.1-8b", "--task", "infer", "--max", "batch",
            "--gpu-memory", "24", "--prompt-len", "8192", "--json")
    assert r.exit_code == 0, r.output
    best = json.loads(r.stdout)["value"]
    spec = get_spec("llama-3.1-8b")
    fits = [estimate_inference(spec, InferPlan(batch_size=b, prompt_len=8192))
            .required_device_bytes <= 24 * 2**30 for b in (best, best + 1)]
    assert fits == [True, False]


def test_cli_check_infer() -> None:
    r = run("check", "-m", "llama-3.1-8b", "--task", "infer", "--gpu-memory", "8", "--batch",
            "8", "--prompt-len", "8192", "--json")
    assert r.exit_code == 3
    assert json.loads(r.stdout)["fits"] is False


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "infer", "--cache", "bogus"], "--cache takes one of dynamic, static"),
    (["--prompt-len", "5"], "--prompt-len: only with --task infer or --task merge"),
    (["--task", "merge", "--prompt-len", "5"], "--prompt-len is a --task infer option"),
    (["--task", "infer", "--new-tokens", "0"], "--new-tokens must be a positive integer"),
    (["--task", "foo"], "unknown task 'foo'"),
    (["--task", "infer", "--max", "seq-len", "--gpu-memory", "8"], "--max with --task infer"),
    (["--task", "merge", "--quant", "int8"], "--quant with --task merge takes none"),
    (["--task", "infer", "--targets", "nope"], "unknown target module 'nope'"),
])
def test_cli_bad_inputs(args: list[str], message: str) -> None:
    r = run("plan", "-m", "llama-3.1-8b", *args)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr


@pytest.mark.parametrize(("run", "n_ok"), [("run3", 30), ("run5", 27)])
def test_h200_inference_replay(run: str, n_ok: int) -> None:
    """Peak allocated of the H200 inference points within 2 %, and out-of-memory where the
    card ran out: run 3 (calibration/h200/run3-infer.jsonl, where the prefill terms were
    explained) and run 5 (the pre-registered holdout, whose two sliding-window misses
    were explained after it was measured). A regression check, no holdout any more."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "bench"))
    try:
        import accuracy_infer as replay
    finally:
        sys.path.pop(0)
    records_path, matrix_path, _ = replay.RUNS[run]
    points = {p["id"]: p for p in json.loads(matrix_path.read_text())["points"]
              if p.get("worker") == "vramcalc.calibrate.infer_worker"}
    checked = 0
    for line in records_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["id"] not in points:
            continue
        est = replay.current_estimate(points[rec["id"]])
        if rec["status"] == "oom":
            assert est.required_device_bytes > replay.H200_USABLE, rec["id"]
        elif rec["status"] == "ok":
            meas = rec["measurement"]["peak_allocated_bytes"]
            assert abs(est.peak_allocated_bytes / meas - 1) < 0.02, rec["id"]
            checked += 1
    assert checked == n_ok


def test_a_base_bitsandbytes_does_not_convert_loads_unquantized() -> None:
    """falcon's FalconLinear is not converted by transformers 5's bitsandbytes integration
    (effective.py): a 4-bit inference or merge of falcon holds the base in its load dtype,
    the same bytes as asking for no quantization, with planned_as and a note saying so."""
    from vramcalc.memory.inference import estimate_merge
    from vramcalc.plans import MergePlan

    falcon = get_spec("falcon-7b")
    nf4 = estimate_inference(falcon, InferPlan(quant="nf4"))
    none = estimate_inference(falcon, InferPlan(quant="none"))
    assert nf4.peak_allocated_bytes == none.peak_allocated_bytes
    assert nf4.planned_as == {"quant": "none"} and none.planned_as == {}
    assert any("does not quantize" in n for n in nf4.notes)
    merge = estimate_merge(falcon, MergePlan(base_quant="nf4"))
    assert merge.planned_as == {"base_quant": "none"}
    assert merge.peak_allocated_bytes == estimate_merge(falcon, MergePlan()).peak_allocated_bytes
    llama = estimate_inference(get_spec("llama-2-7b"), InferPlan(quant="nf4"))
    assert llama.planned_as == {}


def test_required_never_falls_when_the_work_grows_by_one() -> None:
    """Random generate() plans, each against the same plan with one more row, prompt token
    or new token: required free memory never falls (issue 27). The replayed allocated peak
    can (where a request lands decides whether a block's rest is split off: gemma-2-2b nf4
    b3 p702 -> 703 fell by 1.1 MB before required rested on the requested bytes)."""
    import random

    rng = random.Random(20261207)
    models = ["llama-3.1-8b", "gemma-2-2b", "gemma-2-9b", "qwen2.5-7b", "phi-3-mini"]
    cases = [("gemma-2-2b", {"batch_size": 3, "prompt_len": 702, "new_tokens": 16,
                             "quant": "nf4"}, "prompt_len")]
    for _ in range(40):
        cases.append((rng.choice(models),
                      {"batch_size": rng.choice([1, 2, 3, 4, 8]),
                       "prompt_len": rng.randint(16, 6000),
                       "new_tokens": rng.choice([1, 16, 128]),
                       "quant": rng.choice(["nf4", "int8", "none"])},
                      rng.choice(["batch_size", "prompt_len", "new_tokens"])))
    for model, fields, grown in cases:
        spec = get_spec(model)
        before = estimate_inference(spec, InferPlan(**fields))
        after = estimate_inference(spec, InferPlan(**{**fields, grown: fields[grown] + 1}))
        assert after.required_device_bytes >= before.required_device_bytes, (model, fields,
                                                                             grown)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_int8_linear_peak_is_the_programs(dtype: str) -> None:
    """The phase formula's int8 Linear (linear_peak, the searches' first guess) holds the
    largest live set of the program's MatMul8bitLt chain (program.infer._int8_matmul):
    the fp16 copy of x only off fp16, the cast of the output only off fp16, the down
    projection's subA / subB / addmm at its outlier fraction. Before the chain it counted
    the int8 rows and the int32 product only."""
    from itertools import count

    from vramcalc.memory.allocator.replay import round_size
    from vramcalc.memory.program.activations import OUTLIER_ROLES, int8_outlier_fraction
    from vramcalc.memory.program.infer import _Emit, _int8_matmul, _shape
    from vramcalc.models.spec import depth_cut

    spec = depth_cut(get_spec("llama-3.1-8b"), 2)
    plan = InferPlan(quant="int8", compute_dtype=dtype, merged=True)
    tokens = 32768
    shape = _shape(spec, plan)
    for lin in spec.block_linears():
        e = _Emit(count(1))
        _int8_matmul(e, shape, lin, tokens)
        live: dict[int, int] = {}
        peak = 0
        for tid, size in e.out:
            if size:
                live[tid] = round_size(size)
            else:
                del live[tid]
            peak = max(peak, sum(live.values()))
        outliers = int8_outlier_fraction(spec, tokens) if lin.role in OUTLIER_ROLES else 0.0
        assert linear_peak(tokens, lin, plan, False, outliers) == peak, lin.role
    assert any(lin.role in OUTLIER_ROLES for lin in spec.block_linears())
