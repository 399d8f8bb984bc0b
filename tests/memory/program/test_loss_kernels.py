"""Loss kernels (TrainPlan.loss_kernel, `--loss-kernel`): liger-kernel's fused linear
cross-entropy, cut-cross-entropy and torchtune-style chunked cross-entropy change the
step program (step_requests._fused_head), are refused where they do not apply, are offered
by `check` and shown by `compare`, with the same bytes everywhere."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.calibrate.run import MARK_STEP
from vramcalc.calibrate.trace import generated_step, recorded_step
from vramcalc.cli import app
from vramcalc.errors import PlanError
from vramcalc.memory.effective import effective_train_plan
from vramcalc.memory.estimate import estimate
from vramcalc.memory.program.step import requested_peaks, step_requests
from vramcalc.models.spec import depth_cut, get_spec
from vramcalc.plans import CHUNKED_LOSS_CHUNKS, TrainPlan
from vramcalc.sizing import advice

runner = CliRunner()
GIB = 2**30


def _program(spec_name: str, plan: TrainPlan, layers: int = 2) -> tuple[Any, dict[str, int]]:
    spec = depth_cut(get_spec(spec_name), layers)
    r = step_requests(spec, plan, steps=1)
    return r, requested_peaks([], r.requests, r.phases)


def _sizes(r: Any) -> set[int]:
    return {size for _, size in r.requests if size}


# ---- the step program --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_kernels_never_make_the_logits(method: str) -> None:
    """liger and cce: no request of the logits (tokens x vocab), nor of an eighth of
    them; the default program makes both the logits and their fp32 copy; liger makes its
    chunk of rows."""
    spec = get_spec("qwen2.5-0.5b")
    t, v, h = 2048, spec.vocab_size, spec.hidden_size
    torch_r, _ = _program(spec.name, TrainPlan(method=method, seq_len=t))
    assert t * v * 2 in _sizes(torch_r) and t * v * 4 in _sizes(torch_r)
    # liger-kernel fused_linear_cross_entropy_forward: inc_factor = ceil(V / H), rows =
    # next power of two of ceil(BT / inc_factor)
    rows = 2 ** math.ceil(math.log2(math.ceil(t / math.ceil(v / h))))
    for kernel in ("liger", "cce"):
        r, _ = _program(spec.name, TrainPlan(method=method, seq_len=t, loss_kernel=kernel))
        logits_like = [s for s in _sizes(r) if s >= t * v * 2 // 8]
        # what is left that large: the lm_head weight's bf16 casts (QLoRA's fp32 head)
        assert all(s == v * h * 2 for s in logits_like), (kernel, logits_like)
    liger, _ = _program(spec.name, TrainPlan(method=method, seq_len=t, loss_kernel="liger"))
    assert rows * v * 2 in _sizes(liger)  # a chunk's logits


def test_chunked_keeps_one_fp32_chunk_at_a_time() -> None:
    """Chunked cross-entropy upcasts one chunk at a time: at the forward's peak the
    default program holds the whole fp32 copy of the logits, the chunked one 1/8 of it,
    so its forward peak is lower by 7/8 of tokens x vocab x 4 (bf16 LoRA: the rest, the
    compute-dtype logits and the kept log-softmax, is the same)."""
    spec = get_spec("qwen2.5-0.5b")
    t, v = 2048, spec.vocab_size
    k = CHUNKED_LOSS_CHUNKS
    _, base = _program(spec.name, TrainPlan(method="lora", seq_len=t))
    r, chunked = _program(spec.name, TrainPlan(method="lora", seq_len=t,
                                               loss_kernel="chunked"))
    assert t * v * 4 not in _sizes(r) and t // k * v * 4 in _sizes(r)
    assert base["forward"] - chunked["forward"] == t * v * 4 * (k - 1) // k


def test_liger_keeps_the_input_gradient_made_in_forward() -> None:
    """liger computes grad_input (tokens x hidden, the final norm's dtype) in forward
    and keeps it into backward: the request is made before the backward phase starts and
    freed only after it."""
    spec = get_spec("llama-3.1-8b")
    t, h = 1024, spec.hidden_size
    r, _ = _program(spec.name, TrainPlan(method="qlora", seq_len=t, loss_kernel="liger"))
    start = dict(r.phases)["backward"]
    # QLoRA: the final norm's output is fp32 (prepare_model_for_kbit_training)
    made = [i for i, (_, size) in enumerate(r.requests[:start]) if size == t * h * 4]
    assert made
    alive = {r.requests[i][0] for i in made}
    freed_in_forward = {bid for bid, size in r.requests[made[0]:start] if size == 0}
    assert alive - freed_in_forward, "grad_input must outlive the forward"


@pytest.mark.replay
@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-1.5b", "gemma-2-2b"])
def test_every_kernel_lowers_a_logits_bound_peak(model: str) -> None:
    """Where the logits dominate (QLoRA, batch 4 x 4096, vocabularies 128k-256k): each
    kernel lowers the peak, the fused ones the most."""
    spec = get_spec(model)
    peak = {k: estimate(spec, TrainPlan(batch_size=4, seq_len=4096, loss_kernel=k))
            .peak_allocated_bytes for k in ("torch", "liger", "cce", "chunked")}
    assert max(peak["liger"], peak["cce"]) < peak["chunked"] < peak["torch"]


def test_trl_chunked_makes_256_row_chunks_and_keeps_the_gathered_rows() -> None:
    """TRL's chunked_nll (trl 1.14.0 sft_trainer.py _chunked_cross_entropy_loss, _chunk):
    no request of the logits; one 256-row chunk's logits in the matmul's dtype and their
    fp32 copy; for bf16 LoRA no copy or cast of the weight (`w.to(h.dtype)` is a no-op and
    autocast leaves bf16 alone; trl 1.4-1.12's `w.float()` made an fp32 one per chunk),
    under QLoRA (fp32 rows and head) autocast's bf16 cast of the weight per chunk; the
    gathered copy of the hidden states (tokens x hidden) is made in forward and outlives
    it."""
    spec = get_spec("qwen2.5-0.5b")
    t, v, h = 2048, spec.vocab_size, spec.hidden_size
    r, peaks = _program(spec.name, TrainPlan(method="lora", seq_len=t,
                                             loss_kernel="trl-chunked"))
    sizes = _sizes(r)
    assert not any(s > 256 * v * 4 for s in sizes)
    assert 256 * v * 2 in sizes and 256 * v * 4 in sizes
    assert v * h * 4 not in sizes and v * h * 2 not in sizes
    q, _ = _program(spec.name, TrainPlan(method="qlora", seq_len=t, loss_kernel="trl-chunked"))
    q_sizes = _sizes(q)
    assert v * h * 2 in q_sizes and v * h * 4 not in q_sizes
    assert not any(s > 256 * v * 4 and s != v * h * 2 for s in q_sizes)
    start = dict(r.phases)["backward"]
    made = {bid for bid, size in r.requests[:start] if size == t * h * 2}
    freed = {bid for bid, size in r.requests[:start] if size == 0}
    assert made - freed, "the gathered rows must outlive the forward"
    _, torch_peaks = _program(spec.name, TrainPlan(method="lora", seq_len=t))
    assert peaks["forward"] < torch_peaks["forward"]


def test_trl_chunked_replays_a_partial_last_chunk() -> None:
    """A step of 300 tokens: one full chunk of 256 rows and one of 44."""
    spec = get_spec("qwen2.5-0.5b")
    r, _ = _program(spec.name, TrainPlan(method="lora", seq_len=300,
                                         loss_kernel="trl-chunked"))
    assert {256 * spec.vocab_size * 4, 44 * spec.vocab_size * 4} <= _sizes(r)


@pytest.mark.replay
def test_default_is_the_torch_head() -> None:
    spec = get_spec("llama-3.2-1b")
    plan = TrainPlan(batch_size=2, seq_len=1024)
    assert plan.loss_kernel == "torch"
    assert estimate(spec, plan) == estimate(spec, plan.model_copy(
        update={"loss_kernel": "torch"}))


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    (["--model", "llama-3.1-8b", "--task", "infer", "--loss-kernel", "liger"],
     "Error: --loss-kernel: not used by --task infer"),
    (["--model", "llama-3.1-8b", "--loss-kernel", "fused"],
     "Error: unknown loss kernel 'fused'; valid: torch, liger, cce, chunked, trl-chunked"),
    (["--model", "phi-2", "--loss-kernel", "cce"],
     "Error: --loss-kernel cce: cut-cross-entropy's cce_patch does not know model type phi"),
    (["--model", "phi-2", "--loss-kernel", "liger"],
     "Error: --loss-kernel liger: liger-kernel has no kernels for model type phi"),
    (["--model", "qwen3-0.6b", "--loss-kernel", "cce"],
     "Error: --loss-kernel cce: cut-cross-entropy's cce_patch does not know model type qwen3"),
    (["--model", "llama-3.2-1b", "--loss-kernel", "chunked", "--loop",
      "trainer-plain-outputs"],
     "Error: --loss-kernel chunked: not modelled with --loop trainer-plain-outputs"),
])
def test_refused_in_one_line(args: list[str], error: str) -> None:
    r = runner.invoke(app, ["plan", *args])
    assert r.exit_code != 0
    assert r.stderr.startswith(error), r.stderr
    assert "Traceback" not in r.output


def test_api_refuses_too() -> None:
    with pytest.raises(PlanError, match="liger-kernel has no kernels for model type phi"):
        estimate(get_spec("phi-2"), TrainPlan(loss_kernel="liger"))


# ---- check, compare, one answer --------------------------------------------------------------

ISSUE_CASE = ["--model", "llama-3.1-8b", "--batch", "8", "--seq-len", "4096"]


def _plan_json(*args: str) -> dict[str, Any]:
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.replay
def test_check_offers_liger_when_it_changes_the_verdict() -> None:
    """The issue's case: llama-3.1-8b QLoRA 8 x 4096 does not fit 48 GiB; Liger does, and
    check says so with the bytes `plan --loss-kernel liger` gives."""
    liger = _plan_json(*ISSUE_CASE, "--loss-kernel", "liger")["required_device_bytes"]
    torch_need = _plan_json(*ISSUE_CASE)["required_device_bytes"]
    memory = 48
    assert liger + GIB // 2 <= memory * GIB < torch_need
    r = runner.invoke(app, ["check", *ISSUE_CASE, "--gpu-memory", str(memory), "--json"])
    assert r.exit_code == 3, r.output
    offered = {s["changes"].get("loss_kernel"): s for s in json.loads(r.stdout)["suggestions"]
               if s["kind"] == "loss_kernel"}
    assert offered["liger"]["required_device_bytes"] == liger
    assert offered["liger"]["fits"] and offered["liger"]["cost"]
    text = runner.invoke(app, ["check", *ISSUE_CASE, "--gpu-memory", str(memory)]).stdout
    assert (f"Liger fused linear cross-entropy (`use_liger_kernel=True`): needs "
            f"{liger / GIB:.2f} GiB") in " ".join(text.split())


@pytest.mark.replay
def test_no_loss_kernel_offer_when_it_does_not_change_the_verdict() -> None:
    """A plan that fits is offered nothing; a kernel already on is not offered again."""
    r = runner.invoke(app, ["check", *ISSUE_CASE, "--gpu-memory", "141", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["suggestions"] == []
    spec = get_spec("llama-3.1-8b")
    plan = TrainPlan(batch_size=8, seq_len=4096, loss_kernel="liger")
    assert advice.loss_kernel_suggestions(spec, plan, 20 * GIB, GIB // 2) == []


def test_suggestions_come_cheapest_first() -> None:
    spec = get_spec("llama-3.1-8b")
    plan = TrainPlan(batch_size=8, seq_len=4096, optimizer="adamw_torch",
                     gradient_checkpointing=False)
    found = advice.suggest(spec, plan, 70 * GIB, GIB // 2)
    assert found
    ranks = [s.cost_rank for s in found if s.kind != "combined"]
    assert ranks == sorted(ranks)
    assert all(s.cost for s in found)


@pytest.mark.replay
def test_compare_rows_and_one_answer() -> None:
    """compare's loss-kernel cells are `plan --loss-kernel K` of that method's plan, to the
    byte, and the API gives the same."""
    r = runner.invoke(app, ["compare", *ISSUE_CASE, "--switches", "--json"])
    assert r.exit_code == 0, r.output
    rows = {m["method"]: m for m in json.loads(r.stdout)["methods"]}
    qlora = rows["qlora"]["loss_kernels"]
    assert list(qlora) == ["torch", "liger", "cce", "chunked", "trl-chunked", "trl-fused"]
    assert qlora["torch"]["required_device_bytes"] == rows["qlora"]["required_device_bytes"]
    for kernel in ("liger", "cce", "chunked", "trl-chunked", "trl-fused"):
        plan = _plan_json(*ISSUE_CASE, "--loss-kernel", kernel)
        assert qlora[kernel]["required_device_bytes"] == plan["required_device_bytes"]
        assert qlora[kernel]["peak_allocated_bytes"] == plan["peak_allocated_bytes"]
    import vramcalc

    api = vramcalc.plan("llama-3.1-8b", batch_size=8, seq_len=4096, loss_kernel="liger")
    assert api.required_device_bytes == qlora["liger"]["required_device_bytes"]
    lora = rows["lora"]["loss_kernels"]
    plan = _plan_json(*ISSUE_CASE, "--method", "lora", "--loss-kernel", "cce")
    assert lora["cce"]["required_device_bytes"] == plan["required_device_bytes"]


def test_compare_says_where_a_kernel_does_not_apply() -> None:
    r = runner.invoke(app, ["compare", "--model", "phi-2", "--switches", "--json"])
    assert r.exit_code == 0, r.output
    cells = json.loads(r.stdout)["methods"][0]["loss_kernels"]
    assert cells["liger"]["required_device_bytes"] is None
    assert "no kernels for model type phi" in cells["liger"]["error"]


# ---- the calibration worker's heads (CPU, a tiny random model) --------------------------------


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_worker_chunked_loss_is_the_models_loss(softcap: float | None) -> None:
    """The worker's chunked head (calibrate/run.py `_head_loss_forward`) computes the same
    loss as transformers' own forward, and its gradient reaches the lm_head and the
    decoder; outside training it is the original forward."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vramcalc.calibrate.run import apply_loss_kernel

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if softcap:  # the config key gemma-2 has; llama's forward ignores it, so cap by hand
        model.config.final_logit_softcapping = softcap
    ids = torch.randint(0, 96, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100
    model.train()
    ref = model(input_ids=ids).logits
    if softcap:
        ref = torch.tanh(ref / softcap) * softcap
    want = torch.nn.functional.cross_entropy(
        ref[:, :-1].reshape(-1, 96).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    apply_loss_kernel(model, TrainPlan(method="full", quant="none", loss_kernel="chunked"))
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert torch.allclose(out.loss, want, atol=1e-5)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    model.eval()
    assert model(input_ids=ids).logits.shape == (2, 24, 96)


RUN32 = Path(__file__).resolve().parents[3] / "calibration" / "h100" / "run32"


def test_chunked_capping_follows_every_chunks_matmul_as_traced() -> None:
    """gemma-2's final logit capping under chunked CE: the worker caps the list of chunk
    logits after every chunk's matmul ran; the program's step makes the same requests of
    200 MiB or more, in the same order, as the recorded second step of run 32's trace
    (tr-k-g-chunked-gemma-2-2b, H100; capping each chunk after its own matmul left 6.5
    GiB less cache than measured)."""
    trace = json.loads(gzip.open(RUN32 / "tr-k-g-chunked-gemma-2-2b.json.gz", "rt").read())
    spec = get_spec("gemma-2-2b")
    plan = TrainPlan(method="qlora", quant="nf4", batch_size=4, seq_len=2048,
                     loop="trainer-plain", loss_kernel="chunked")
    eff, _, _ = effective_train_plan(spec, plan)
    gen = step_requests(spec, eff)
    least = 200 * 2**20
    generated = [r for r in generated_step(gen.requests, gen.starts, 1) if r[1] >= least]
    recorded = [r for r in recorded_step(trace, 1, MARK_STEP) if r[1] >= least]
    assert len(recorded) > 1000 and generated == recorded
