"""The GPU measurement harness on CPU: every method through measure_point on tiny models,
the allocator-trace summarizer on a synthetic snapshot, depth cuts, and the matrix driver
end to end (two tiny points, two workers at once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramcalc.errors import SpecError
from vramcalc.models.spec import ModelSpec, depth_cut, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.units import MiB

TINY = ModelSpec(
    name="tiny-llama", model_type="llama", vocab_size=256, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TINY_MOE = ModelSpec(
    name="tiny-mixtral", model_type="mixtral", vocab_size=256, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=4, num_experts_per_tok=2,
    extra_config={"num_local_experts": 4, "num_experts_per_tok": 2},
)


def _measure(spec: ModelSpec, **plan: Any) -> dict[str, Any]:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramcalc.calibrate.run import measure_point

    p = TrainPlan(batch_size=1, seq_len=16, optimizer="adamw_torch", **plan)
    return measure_point(spec, p, None, steps=1, device="cpu")


def _ok(result: dict[str, Any]) -> None:
    assert result["oom"] is False
    assert "error" not in result, result.get("error")
    assert not result.get("cannot_start")


# ---- methods -----------------------------------------------------------------------------


def test_qlora_nf4() -> None:
    r = _measure(TINY)
    _ok(r)
    st = r["static_after_peft"]
    assert st["base_weights"] == TINY.quantizable_params() // 2  # packed 4-bit
    assert st["lora"] > 0
    # fp32 AdamW: exp_avg and exp_avg_sq, each the size of every (fp32) LoRA parameter
    assert r["optimizer_state_bytes"]["device"] == 2 * st["lora"]
    assert r["trainable_params"] * 4 == st["lora"]


def test_qlora_int8() -> None:
    r = _measure(TINY, quant="int8")
    if r.get("error") and "int8" in r["error"].lower():
        pytest.skip(f"bitsandbytes int8 does not run on this CPU: {r['error']}")
    _ok(r)
    st = r["static_after_peft"]
    assert st["base_weights"] == TINY.quantizable_params()  # one byte per weight
    assert st["quant_constants"] > 0  # fp32 row scales (SCB)
    assert r["optimizer_state_bytes"]["device"] == 2 * st["lora"]


def test_lora_bf16_base_is_not_quantized() -> None:
    r = _measure(TINY, method="lora")
    _ok(r)
    st = r["static_after_peft"]
    assert st["base_weights"] == 0 and st["quant_constants"] == 0
    assert st["unquantized"] == 2 * TINY.num_params()  # bf16, no prepare_model upcast
    assert r["optimizer_state_bytes"]["device"] == 2 * st["lora"]


@pytest.mark.parametrize(("dtype", "nbytes"), [("bf16", 2), ("fp32", 4)])
def test_full(dtype: str, nbytes: int) -> None:
    r = _measure(TINY, method="full", weights_dtype=dtype)
    _ok(r)
    n = TINY.num_params()
    assert r["trainable_params"] == n
    assert r["static_after_peft"]["lora"] == 0
    assert r["static_after_peft"]["unquantized"] == nbytes * n
    # AdamW states follow the parameter dtype: pure bf16 keeps bf16 states
    assert r["optimizer_state_bytes"]["device"] == 2 * nbytes * n


@pytest.mark.parametrize("loop", ["trainer-plain", "trainer-plain-outputs",
                                  "trainer-plain-outputs-del"])
def test_trainer_plain_loop_uses_the_trainer_optimizer(loop: str) -> None:
    r = _measure(TINY, method="lora", loop=loop)
    _ok(r)
    assert r["loop"] == loop
    assert r["use_cache"] is False  # Trainer.__init__: config.use_cache = args.use_cache
    assert r["optimizer_state_bytes"]["device"] == 2 * r["static_after_peft"]["lora"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_tutorial_loop_builds_no_trainer(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--loop plain`: no Trainer constructed (constructing one fails here), the optimizer
    built directly, use_cache left on; it records the same fields as the Trainer paths."""
    import transformers

    def no_trainer(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the plain loop constructed a Trainer")

    monkeypatch.setattr(transformers, "Trainer", no_trainer)
    dtype: dict[str, Any] = {"weights_dtype": "bf16"} if method == "full" else {}
    r = _measure(TINY, method=method, loop="plain", **dtype)
    _ok(r)
    assert r["loop"] == "plain" and r["use_cache"] is True
    # AdamW states follow the trained tensors' dtype: 2 x the LoRA weights, 2 x bf16 params
    trained = r["static_after_peft"]["lora"] if method == "lora" else 2 * TINY.num_params()
    assert r["optimizer_state_bytes"]["device"] == 2 * trained
    monkeypatch.undo()
    trainer = _measure(TINY, method=method, **dtype)
    _ok(trainer)
    assert set(trainer) == set(r)


def test_tutorial_loop_use_cache_off() -> None:
    r = _measure(TINY, method="lora", loop="plain", use_cache=False)
    _ok(r)
    assert r["use_cache"] is False


def test_moe_all_linear_with_dropout_cannot_start() -> None:
    r = _measure(TINY_MOE, method="lora", lora_dropout=0.05)
    assert r["cannot_start"] is True
    assert "dropout" in r["error"]
    assert "\n" not in r["error"]


def test_moe_all_linear_without_dropout_trains_experts() -> None:
    r = _measure(TINY_MOE, method="lora", lora_dropout=0.0)
    _ok(r)
    # the 3-D experts got adapters too: more trainable parameters than attention alone
    attn_only = _measure(TINY_MOE, method="lora", lora_dropout=0.0, targets="q_proj,v_proj")
    _ok(attn_only)
    assert r["trainable_params"] > attn_only["trainable_params"] > 0


# ---- depth cut ---------------------------------------------------------------------------


def test_depth_cut_keeps_shapes() -> None:
    spec = get_spec("llama-3.1-8b")
    cut = depth_cut(spec, 4)
    assert cut.name == "llama-3.1-8b@4L" and cut.aliases == ()
    assert cut.num_hidden_layers == 4 and cut.to_hf_config()["num_hidden_layers"] == 4
    assert cut.hidden_size == spec.hidden_size and cut.vocab_size == spec.vocab_size
    per_layer = (spec.num_params() - cut.num_params()) // (spec.num_hidden_layers - 4)
    assert spec.num_params() - 28 * per_layer == cut.num_params()
    if spec.expected_params == spec.num_params():
        assert cut.expected_params == cut.num_params()
    assert depth_cut(spec, spec.num_hidden_layers) is spec
    with pytest.raises(SpecError):
        depth_cut(spec, spec.num_hidden_layers + 1)


def test_depth_cut_cuts_per_layer_lists() -> None:
    spec = TINY.model_copy(update={"extra_config": {"layer_types": ["a", "b"], "x": [1, 2, 3]}})
    cut = depth_cut(spec, 1)
    assert cut.extra_config == {"layer_types": ["a"], "x": [1, 2, 3]}


# ---- trace summary -----------------------------------------------------------------------

SITE = "/venv/lib/python3.12/site-packages/"


def _f(path: str, name: str, line: int = 1) -> dict[str, Any]:
    return {"filename": SITE + path, "name": name, "line": line}


def _synthetic_snapshot() -> tuple[dict[str, Any], int]:
    """A 20 MiB segment holding a 4 MiB parameter allocated before the trace, a 2 MiB small
    segment; step 0 allocates 6 MiB of attention output then frees it; step 1 allocates
    a 2 MiB loss tensor and an 8 MiB bnb dequant buffer (the peak), frees the dequant."""
    from vramcalc.calibrate.run import MARK_END, MARK_STEP

    seg, small = 0x10000000, 0x20000000
    param = seg
    mark = [_f("torch/cuda/memory.py", "mark")]
    attn = [_f("torch/nn/functional.py", "scaled_dot_product_attention"),
            _f("transformers/integrations/sdpa_attention.py", "sdpa_attention_forward", 90)]
    loss = [_f("torch/nn/functional.py", "cross_entropy", 3400),
            _f("transformers/loss/loss_utils.py", "fixed_cross_entropy", 40)]
    deq = [_f("bitsandbytes/functional.py", "dequantize_4bit", 1000),
           _f("peft/tuners/lora/bnb.py", "forward", 500)]
    trace: list[dict[str, Any]] = []

    def ev(action: str, addr: int, size: int, frames: list[dict[str, Any]] | None = None) -> None:
        trace.append({"action": action, "addr": addr, "size": size, "frames": frames or []})

    def marks(pair: tuple[int, int], at: int) -> None:
        ev("alloc", at, pair[0], mark)
        ev("alloc", at + pair[0], pair[1], mark)
        ev("free_requested", at, pair[0])
        ev("free_completed", at, pair[0])
        ev("free_requested", at + pair[0], pair[1])
        ev("free_completed", at + pair[0], pair[1])

    ev("segment_alloc", small, 2 * MiB)
    marks(MARK_STEP, small)
    ev("alloc", seg + 4 * MiB, 6 * MiB, attn)
    ev("free_completed", seg + 4 * MiB, 6 * MiB)
    marks(MARK_STEP, small)
    ev("alloc", seg + 4 * MiB, 2 * MiB, loss)
    ev("alloc", seg + 6 * MiB, 8 * MiB, deq)  # peak of step 1: 4 + 2 + 8 = 14 MiB
    ev("free_completed", seg + 6 * MiB, 8 * MiB)
    marks(MARK_END, small)
    segments = [
        {"address": seg, "total_size": 20 * MiB, "segment_type": "large", "blocks": [
            {"address": param, "size": 4 * MiB, "state": "active_allocated", "frames": []},
            {"address": seg + 4 * MiB, "size": 2 * MiB, "state": "active_allocated",
             "frames": loss},
            {"address": seg + 6 * MiB, "size": 14 * MiB, "state": "inactive", "frames": []},
        ]},
        {"address": small, "total_size": 2 * MiB, "segment_type": "small", "blocks": [
            {"address": small, "size": 2 * MiB, "state": "inactive", "frames": []}]},
    ]
    return {"segments": segments, "device_traces": [trace]}, param


def test_summarize_snapshot_finds_the_peak_of_the_last_step() -> None:
    from vramcalc.calibrate.run import MARK_END, MARK_STEP
    from vramcalc.calibrate.trace import summarize_snapshot

    snap, param = _synthetic_snapshot()
    s = summarize_snapshot(snap, step=-1, known={param: "parameters_frozen"},
                           step_mark=MARK_STEP, end_mark=MARK_END)
    assert s["window"] == "step 1 of 2"
    assert s["peak_allocated"] == 14 * MiB
    assert s["categories"] == {"bnb_dequant_matmul": 8 * MiB, "parameters_frozen": 4 * MiB,
                               "loss": 2 * MiB}
    assert s["top_frames"][0] == {"frame": "bitsandbytes/functional.py:dequantize_4bit:1000",
                                  "bytes": 8 * MiB}
    assert s["reserved_at_peak"] == 22 * MiB
    assert [b["bytes"] for b in s["largest_blocks"]] == [8 * MiB, 4 * MiB, 2 * MiB]
    assert s["largest_blocks"][0]["category"] == "bnb_dequant_matmul"
    assert s["before_peak"][-1]["action"] == "alloc"  # the request that made the peak
    large = s["segments"]["segments_2_to_20MiB"]
    assert large == {"segments": 1, "reserved": 20 * MiB, "allocated": 14 * MiB,
                     "free": 6 * MiB}
    assert s["segments"]["small_pool_le_1MiB_blocks"]["allocated"] == 0


def test_summarize_snapshot_first_step_and_no_frames() -> None:
    from vramcalc.calibrate.run import MARK_END, MARK_STEP
    from vramcalc.calibrate.trace import summarize_snapshot

    snap, _ = _synthetic_snapshot()
    s = summarize_snapshot(snap, step=0, step_mark=MARK_STEP, end_mark=MARK_END)
    assert s["peak_allocated"] == 10 * MiB  # the parameter + the 6 MiB attention output
    assert s["categories"] == {"modeling_attention": 6 * MiB, "static_before_trace": 4 * MiB}
    # no markers, no frames at all, no segments: still a summary, never an exception
    bare = {"device_traces": [[{"action": "alloc", "addr": 1, "size": 512}]]}
    s = summarize_snapshot(bare)
    assert s["window"].startswith("whole trace")
    assert s["categories"] == {"no_frames": 512}


# ---- matrix driver -----------------------------------------------------------------------


def test_matrix_driver_end_to_end_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    spec = TINY.model_dump(mode="json")
    matrix = [
        {"id": "lora", "spec": spec, "plan": {"method": "lora", "batch_size": 1, "seq_len": 16,
                                              "optimizer": "adamw_torch"}, "steps": 1},
        {"id": "full-plain", "spec": spec, "layers": 1, "steps": 1,
         "plan": {"method": "full", "weights_dtype": "bf16", "loop": "trainer-plain", "seq_len": 16,
                  "optimizer": "adamw_torch", "expandable_segments": True}},
        {"id": "bad", "spec": "no-such-model", "plan": {}},
    ]
    mpath, out = tmp_path / "m.json", tmp_path / "out.jsonl"
    mpath.write_text(json.dumps(matrix))
    proc = subprocess.run(
        [sys.executable, "-m", "vramcalc.calibrate.matrix", str(mpath), "--out", str(out),
         "--weights-cache", str(tmp_path / "w"), "--max-parallel", "2", "--device", "cpu",
         "--deadline-s", "120"],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"lora", "full-plain", "bad"}
    assert records["bad"]["status"] == "cannot_start"
    for pid in ("lora", "full-plain"):
        rec = records[pid]
        assert rec["status"] == "ok", rec["measurement"]
        assert rec["prediction"]["peak_allocated_bytes"] > 0
    full = records["full-plain"]
    assert full["spec"] == "tiny-llama@1L" and full["layers"] == 1
    assert full["measurement"]["trainable_params"] == depth_cut(TINY, 1).num_params()
    assert full["measurement"]["alloc_conf"] == "expandable_segments:True"
    assert records["lora"]["measurement"]["alloc_conf"] == ""
    assert (tmp_path / "w" / "tiny-llama@1L" / "config.json").is_file()
    assert "full-plain" in proc.stdout and "err %" in proc.stdout


def test_summarize_snapshot_expandable_segment_maps_inside_its_range() -> None:
    """expandable_segments:True: segment_map events map pages inside one segment's range
    (not at its start); undoing them leaves nothing reserved before the trace."""
    from vramcalc.calibrate.trace import summarize_snapshot

    base = 0x7F0000000000
    trace = [
        {"action": "segment_map", "addr": base, "size": 20 * MiB},
        {"action": "alloc", "addr": base, "size": 12 * MiB, "frames": []},
        {"action": "segment_map", "addr": base + 20 * MiB, "size": 20 * MiB},
        {"action": "alloc", "addr": base + 12 * MiB, "size": 24 * MiB, "frames": []},
        {"action": "free_completed", "addr": base, "size": 12 * MiB},
    ]
    snap = {"segments": [{"address": base, "total_size": 40 * MiB, "segment_type": "large",
                          "blocks": [{"address": base, "size": 12 * MiB, "state": "inactive"},
                                     {"address": base + 12 * MiB, "size": 24 * MiB,
                                      "state": "active_allocated", "frames": []},
                                     {"address": base + 36 * MiB, "size": 4 * MiB,
                                      "state": "inactive"}]}],
            "device_traces": [trace]}
    s = summarize_snapshot(snap)
    assert s["peak_allocated"] == 36 * MiB
    assert s["reserved_at_peak"] == 40 * MiB


def test_compact_trace_is_written_gzip_and_atomically(tmp_path: Path) -> None:
    """`--trace-dir` files: the stack-free trace as compact gzip JSON, no temporary left."""
    import gzip

    from vramcalc.calibrate.trace import ACTIONS, compact_trace
    from vramcalc.corrections.factors import write_json_atomic

    snap, _ = _synthetic_snapshot()
    out = tmp_path / "traces" / "p.json.gz"
    write_json_atomic(out, compact_trace(snap))
    back = json.loads(gzip.open(out, "rt", encoding="utf-8").read())
    assert back["actions"] == list(ACTIONS)
    assert len(back["events"]) == len(snap["device_traces"][0])
    assert [p.name for p in out.parent.iterdir()] == ["p.json.gz"]


def test_only_snapshot_points_get_a_trace_file(tmp_path: Path) -> None:
    from vramcalc.calibrate.matrix import _job_for, load_points

    base = {"spec": "qwen2.5-0.5b", "plan": {"batch_size": 1, "seq_len": 256}}
    snap, plain = load_points([{**base, "id": "a", "snapshot": True}, {**base, "id": "b"}])
    assert _job_for(snap, "cuda", tmp_path)["trace_file"] == str(tmp_path.resolve() / "a.json.gz")
    assert _job_for(plain, "cuda", tmp_path)["trace_file"] is None
    assert _job_for(snap, "cuda")["trace_file"] is None  # no --trace-dir


def test_an_inference_snapshot_point_gets_a_trace_file(tmp_path: Path) -> None:
    """The inference worker records the allocator trace of a `snapshot` point too."""
    from vramcalc.calibrate.matrix import _job_for, load_points

    root = Path(__file__).resolve().parents[2]
    point = json.loads((root / "calibration" / "matrices" / "h200-infer-holdout4.json")
                       .read_text())["points"][0]
    snap, plain = load_points([{**point, "id": "i1", "snapshot": True}, {**point, "id": "i2"}])
    assert _job_for(snap, "cuda", tmp_path)["trace_file"] == str(tmp_path.resolve() / "i1.json.gz")
    assert "trace_file" not in _job_for(plain, "cuda", tmp_path)
