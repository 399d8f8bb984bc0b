"""The generated requests of a training step (vramcalc.memory.program.step) and the replayed
slack that `estimate` reports as reserved - allocated."""

from __future__ import annotations

import json

import pytest

from vramcalc.memory.allocator.replay import replay_requests
from vramcalc.memory.effective import effective_train_plan
from vramcalc.memory.estimate import estimate
from vramcalc.memory.program.activations import (
    int8_saved_bytes_per_token,
    layer_saved_bytes_per_token,
)
from vramcalc.memory.program.step import program_peaks, replayed_slack, step_requests
from vramcalc.models.spec import ModelSpec, depth_cut, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.search import largest_fitting
from vramcalc.sizing.verdict import fits_certainly


def _forward_saved(spec_name: str, plan: TrainPlan, layers: int) -> int:
    spec = get_spec(spec_name).model_copy(update={"num_hidden_layers": layers})
    sim = replay_requests(step_requests(spec, plan, steps=1).requests)
    return sim.peak_allocated


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,k_proj,v_proj,o_proj"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_one_more_layer_keeps_what_autograd_keeps(targets: str, dropout: float) -> None:
    """The generated forward of a 16-bit LoRA layer keeps, per token, the bytes the
    estimator counts (activations.layer_saved_bytes_per_token, itself checked against
    autograd's saved tensors on CPU): the ops' saved tensors are the same ones."""
    plan = TrainPlan(method="lora", rank=16, batch_size=1, seq_len=2048, targets=targets,
                     lora_dropout=dropout, gradient_checkpointing=False)
    per_layer = (_forward_saved("llama-3.1-8b", plan, 3)
                 - _forward_saved("llama-3.1-8b", plan, 2)) / plan.tokens
    want = layer_saved_bytes_per_token(get_spec("llama-3.1-8b"), plan)
    assert per_layer == pytest.approx(want, rel=0.002)


@pytest.mark.parametrize("plan", [
    TrainPlan(method="qlora", rank=16, batch_size=2, seq_len=1024),
    TrainPlan(method="lora", rank=8, batch_size=2, seq_len=1024, attn="eager",
              gradient_checkpointing=False, loop="trainer-plain-outputs"),
    TrainPlan(method="full", batch_size=1, seq_len=512, optimizer="adamw_torch",
              weights_dtype="fp32", expandable_segments=True),
])
def test_every_generated_buffer_is_freed_once(plan: TrainPlan) -> None:
    _freed_once(get_spec("qwen2.5-0.5b"), plan)


@pytest.mark.parametrize(("name", "plan"), [
    ("mixtral-8x7b", TrainPlan(method="qlora", batch_size=1, seq_len=256, lora_dropout=0.0)),
    ("mixtral-8x7b", TrainPlan(method="lora", batch_size=1, seq_len=256, lora_dropout=0.0,
                               gradient_checkpointing=False)),
    ("mixtral-8x7b", TrainPlan(method="full", batch_size=1, seq_len=256,
                               weights_dtype="fp32", compute_dtype="fp16")),
])
def test_every_generated_moe_buffer_is_freed_once(name: str, plan: TrainPlan) -> None:
    _freed_once(get_spec(name).model_copy(update={"num_hidden_layers": 2}), plan)


def _freed_once(spec: ModelSpec, plan: TrainPlan) -> None:
    reqs = step_requests(spec, plan).requests
    sizes: dict[int, int] = {}
    for tid, size in reqs:
        if size:
            assert tid not in sizes
            sizes[tid] = size
        else:
            assert sizes.pop(tid) > 0  # a free of a live buffer
    sim = replay_requests(reqs, expandable=plan.expandable_segments)
    assert sim.peak_reserved >= sim.peak_allocated > 0


@pytest.mark.replay
def test_estimate_reports_the_replayed_slack() -> None:
    spec, plan = get_spec("llama-3.2-1b"), TrainPlan(method="qlora", batch_size=2, seq_len=1024)
    est = estimate(spec, plan)
    assert est.components.allocator_slack == replayed_slack(spec, plan)
    assert est.peak_reserved_bytes == est.peak_allocated_bytes + replayed_slack(spec, plan)
    assert est.peak_device_bytes == (est.peak_reserved_bytes + est.components.cuda_context
                                     + est.paged_bytes)


@pytest.mark.replay
def test_the_quick_estimate_stays_close_to_the_full_one() -> None:
    """The searches' first guess is the quick estimate (the phase formula, the linear
    slack rule); the full one takes the peak from the replayed step program where it
    covers the plan. The two stay within 2 % of each other on a covered plan, and the
    phase formula is what an uncovered plan (parallel blocks) reports either way."""
    spec, plan = get_spec("llama-3.2-1b"), TrainPlan(method="lora", batch_size=2, seq_len=1024)
    full = estimate(spec, plan)
    quick = estimate(spec, plan, replay=False)
    assert abs(quick.peak_allocated_bytes / full.peak_allocated_bytes - 1) < 0.02
    assert quick.components.allocator_slack != full.components.allocator_slack
    phi = get_spec("phi-2").model_copy(update={"num_hidden_layers": 2})
    plain = TrainPlan(method="lora", batch_size=1, seq_len=512)
    formula = estimate(phi, plain, replay=False).peak_allocated_bytes
    assert estimate(phi, plain).peak_allocated_bytes == formula


@pytest.mark.replay
def test_the_peak_is_the_step_programs_where_it_covers_the_plan() -> None:
    """Covered plans: each step phase's peak is the replayed program's, the components add
    up to it, and reserved - allocated is the program's at that peak."""
    spec = get_spec("mistral-7b").model_copy(update={"num_hidden_layers": 2})
    plan = TrainPlan(method="qlora", quant="int8", batch_size=2, seq_len=512)
    eff, _, _ = effective_train_plan(spec, plan)
    program = program_peaks(spec, eff)
    est = estimate(spec, plan)
    assert est.peak_phase == "backward"
    assert est.phases["backward"] == program.phases["backward"] == program.peak_allocated
    assert est.phases["forward"] == program.phases["forward"]
    assert est.peak_allocated_bytes == program.peak_allocated
    assert est.peak_reserved_bytes == program.peak_reserved
    parts = est.components
    assert (parts.total() - parts.allocator_slack - parts.cuda_context - parts.optimizer_paged
            == est.peak_allocated_bytes)
    assert min(v for _, v in parts.items()) >= 0


@pytest.mark.replay
def test_a_search_lands_on_the_full_estimates_boundary() -> None:
    """The search starts from the phase formula's answer and moves to the full estimate's
    own boundary: the answer fits by the full estimate and the next value does not."""
    spec = get_spec("mistral-7b").model_copy(update={"num_hidden_layers": 2})
    plan = TrainPlan(method="qlora", quant="int8", batch_size=1, seq_len=1024)
    memory, margin = 12 * 2**30, 2**29
    best = largest_fitting(spec, plan, "batch", memory, margin)
    need = [estimate(spec, plan.model_copy(update={"batch_size": n})).required_device_bytes
            for n in (best, best + 1)]
    assert fits_certainly(memory, need[0], margin) and not fits_certainly(memory, need[1], margin)


@pytest.mark.replay
def test_moe_replays_its_expert_layers() -> None:
    """MoE models use the replayed slack too; with LoRA on the expert stacks (peft
    ParamWrapper) each layer makes its folded gate_up stack three times a step: the
    parametrization's registration check, the cached fold the experts use, its gradient
    (H200 trace t17-y013-mixtral-8x7b: 6 of 3584 MiB a step on two layers)."""
    spec = get_spec("mixtral-8x7b").model_copy(update={"num_hidden_layers": 2})
    plan = TrainPlan(method="qlora", quant="fp4", batch_size=1, seq_len=256, lora_dropout=0.0,
                     gradient_checkpointing=False)
    est = estimate(spec, plan)
    assert est.components.allocator_slack == replayed_slack(spec, plan)
    rule = estimate(spec, plan, replay=False)
    assert est.components.allocator_slack != rule.components.allocator_slack
    gate_up = 8 * 2 * 14336 * 4096 * 4  # fp32 after prepare_model_for_kbit_training
    reqs = step_requests(spec, plan, steps=1).requests
    assert sum(1 for _, size in reqs if size == gate_up) == 6


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit", "paged_adamw_32bit",
                                       "sgd"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_state_tensors_add_up_to_the_optimizer_bytes(optimizer: str, method: str) -> None:
    """The replayed state tensors are the ones `optimizer_bytes` counts (less the 8-bit
    optimizers' two shared quantization maps, too small to replay)."""
    from vramcalc.memory.program.optimizer import (
        DYNAMIC_MAP_BYTES,
        optimizer_bytes,
        optimizer_state_sizes,
    )
    from vramcalc.memory.program.weights import rounded

    spec = get_spec("qwen2.5-0.5b")
    plan = TrainPlan(method=method, optimizer=optimizer, batch_size=1, seq_len=256)
    maps = 2 * rounded(DYNAMIC_MAP_BYTES) if optimizer.endswith("8bit") else 0
    assert sum(optimizer_state_sizes(spec, plan)) == optimizer_bytes(spec, plan).device - maps


def test_a_gradient_too_small_to_track_still_flows() -> None:
    """A tensor under MIN_REQUEST gets no buffer, but backward must still run through it:
    LoRA's lora_A output (tokens x rank) is one, and the large gradient behind it
    (tokens x in_features) must still be made."""
    from vramcalc.memory.program.step import MIN_REQUEST, Graph, Var

    g = Graph()
    x = Var(g.alloc(100 * MIN_REQUEST), 100 * MIN_REQUEST, 100 * MIN_REQUEST, True)
    small = g.op(MIN_REQUEST // 4, [x], save=(x,))  # e.g. lora_A(x): below the threshold
    loss = g.op(4, [small])
    g.drop(small)
    before = len(g.requests)
    g.backward(loss)
    made = [size for _, size in g.requests[before:] if size]
    assert made == [100 * MIN_REQUEST]  # x's gradient


def test_a_fused_gate_up_output_gets_its_gradient() -> None:
    """Phi-3's `gate, up = gate_up_proj(x).chunk(2)`: the two views' gradients join into
    one of the fused output's size in backward (SplitBackward0), so the MLP's backward
    reaches gate_up_proj: its LoRA B factor (2I x r, fp32) gets a gradient."""
    from vramcalc.models.spec import depth_cut

    spec = depth_cut(get_spec("phi-3-mini"), 1)
    plan = TrainPlan(method="lora", quant="none", batch_size=1, seq_len=512, rank=16,
                     optimizer="sgd")
    gate_up_b_grad = 2 * spec.intermediate_size * 16 * 4
    sizes = [size for _, size in step_requests(spec, plan, steps=1).requests]
    assert gate_up_b_grad in sizes


def _live_bytes(spec: ModelSpec, plan: TrainPlan, steps: int) -> int:
    live: dict[int, int] = {}
    for tid, size in step_requests(spec, plan, steps=steps).requests:
        if size:
            live[tid] = size
        else:
            del live[tid]
    return sum(live.values())


@pytest.mark.parametrize("plan", [
    TrainPlan(method="qlora", batch_size=1, seq_len=512),
    TrainPlan(method="qlora", quant="int8", batch_size=1, seq_len=512, attn="eager"),
    TrainPlan(method="lora", batch_size=1, seq_len=512, loop="trainer-plain-outputs"),
    TrainPlan(method="full", batch_size=1, seq_len=512, optimizer="adamw_torch"),
])
def test_no_buffer_outlives_its_step(plan: TrainPlan) -> None:
    """What is left after a step (optimizer states, workspaces, a held output) is the same
    after the next one: the embedding output's gradient under enable_input_require_grads
    goes with the graph, not kept step over step."""
    spec = get_spec("qwen2.5-0.5b").model_copy(update={"num_hidden_layers": 2})
    assert _live_bytes(spec, plan, 3) == _live_bytes(spec, plan, 2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_quantized_experts_setting_needs_a_quantized_base(method: str) -> None:
    """moe_experts="quantized" on a 16-bit base changes nothing: the loader fuses the
    experts (load_requests, weights), so the step program runs the same fused stacks."""
    spec = get_spec("mixtral-8x7b").model_copy(update={"num_hidden_layers": 2})
    kw = dict(method=method, seq_len=256, lora_dropout=0.0)
    fused = step_requests(spec, TrainPlan(**kw), steps=1).requests
    assert step_requests(spec, TrainPlan(**kw, moe_experts="quantized"),
                         steps=1).requests == fused


@pytest.mark.replay
def test_a_load_that_reserves_more_than_the_steps_sets_the_reserved_peak() -> None:
    """prepare_model_for_kbit_training upcasts a transformers-5 MoE's fused experts to
    fp32: with expandable segments, qwen2-moe int8 reserves more there than in any step
    (H200 run 24 g020: 9.34 GiB in prepare, 7.57 in the steps, 9.02 replayed). The
    estimate's reserved peak is the larger of the two; the allocated peak stays the
    steps'."""
    from pathlib import Path

    from vramcalc.calibrate.matrix import point_spec

    matrix = Path(__file__).resolve().parents[3] / "calibration/matrices/h200-holdout13.json"
    point = next(p for p in json.loads(matrix.read_text())["points"]
                 if p["id"] == "g020-qwen2-moe")
    spec, plan = point_spec(point), TrainPlan.model_validate(point["plan"])
    eff, _, _ = effective_train_plan(spec, plan)
    program = program_peaks(spec, eff)
    assert program.load_reserved > program.peak_reserved
    est = estimate(spec, plan)
    assert est.peak_reserved_bytes == program.load_reserved
    assert est.peak_allocated_bytes == program.peak_allocated


def test_the_program_breakdown_adds_up_and_stays_non_negative() -> None:
    """The formula's components for the program's peak phase are made to add up to the
    program's peak: a program above the formula adds to the transients; one below takes
    from transients, then activations, then logits, then (rounding of the static parts on
    the largest full fine-tunes) the largest component."""
    from vramcalc.memory.estimate import _program_breakdown

    formula = {"base_weights": 1000, "gradients": 500, "activations": 40, "transient": 10,
               "logits_loss": 5}
    above = _program_breakdown(formula, 1600)
    assert above["transient"] == 10 + 45 and sum(above.values()) == 1600
    below = _program_breakdown(formula, 1520)
    assert below == {**formula, "transient": 0, "activations": 15}
    static = _program_breakdown(formula, 1490)
    assert sum(static.values()) == 1490 and min(static.values()) == 0
    assert static["base_weights"] == 990


@pytest.mark.replay
def test_the_tutorial_loop_in_the_step_program() -> None:
    """`--loop plain` in the program: the DynamicCache's fp32 keys and values on top of the
    forward's peak (QLoRA, no checkpointing), and the int8 graph the surviving loss keeps
    (ctx.tensors, the embedding leaf and its gradient) through the optimizer step and the
    next forward: what the phase formula adds (activations.kv_cache_bytes_per_token,
    int8_saved_bytes_per_token(after_backward=True)), to the request's rounding."""
    spec = depth_cut(get_spec("llama-2-7b"), 4)
    base = TrainPlan(rank=64, targets="q_proj,v_proj", batch_size=2, seq_len=1024,
                     gradient_checkpointing=False, loop="plain")
    on = program_peaks(spec, base)
    off = program_peaks(spec, base.model_copy(update={"use_cache": False}))
    assert on.phases["forward"] - off.phases["forward"] == 4 * base.tokens * 2 * spec.kv_size * 4
    assert on.phases["backward"] == off.phases["backward"]
    spec = depth_cut(get_spec("llama-3.1-8b"), 4)
    plan = TrainPlan(quant="int8", batch_size=2, seq_len=1024, optimizer="adamw_torch",
                     loop="plain")
    kept = program_peaks(spec, plan)
    dropped = program_peaks(spec, plan.model_copy(update={"loop": "trainer-plain"}))
    graph = (4 * plan.tokens * int8_saved_bytes_per_token(spec, plan, after_backward=True)
             + 2 * plan.tokens * spec.hidden_size * 4)
    for phase in ("forward", "optimizer"):
        assert abs(kept.phases[phase] - dropped.phases[phase] - graph) < 2**20
    # the kept graph goes as backward begins; its saved rotary tables (cos and sin, 512 KiB
    # each here) moved where the forward's blocks landed, by less than a MiB of unsplit rest
    assert abs(kept.phases["backward"] - dropped.phases["backward"]) < 2**20


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-7b"])
def test_a_gemma_norm_keeps_its_fp32_product_where_the_weight_trains(name: str) -> None:
    """GemmaRMSNorm scales in fp32 and casts afterwards (specs.FP32_SCALED_NORM_FAMILIES):
    under full fine-tuning one more layer keeps, per token, 2 B per norm and hidden unit
    more than the same layer whose norm casts first (LlamaRMSNorm keeps the bf16 cast)."""
    plan = TrainPlan(method="full", batch_size=4, seq_len=2048, gradient_checkpointing=False,
                     optimizer="sgd")
    spec = get_spec(name)

    def layer(model_type: str) -> float:
        def peak(n: int) -> int:
            cut = spec.model_copy(update={"model_type": model_type, "num_hidden_layers": n})
            return replay_requests(step_requests(cut, plan, steps=1).requests).peak_allocated
        return (peak(3) - peak(2)) / plan.tokens

    assert spec.norm_scales_in_fp32
    assert layer(spec.model_type) - layer("llama") == pytest.approx(
        2 * spec.norms_per_layer * spec.hidden_size, rel=0.02)


def _one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step generated (no state at a step's start is read: step._Boundary)."""
    from vramcalc.memory.program import step as module

    monkeypatch.setattr(module._Boundary, "of", classmethod(lambda cls, *args: None))


@pytest.mark.parametrize(("name", "options"), [
    ("qwen2.5-0.5b", {}),
    ("qwen2.5-0.5b", {"method": "lora", "gradient_checkpointing": False, "attn": "eager"}),
    ("qwen2.5-0.5b", {"method": "lora", "loop": "trainer-plain-outputs", "lora_dropout": 0.0}),
    ("qwen2.5-0.5b", {"method": "qlora", "quant": "int8", "loop": "plain"}),
    ("qwen2.5-0.5b", {"method": "qlora", "quant": "int8", "loop": "trainer-plain-outputs-del",
                      "gradient_checkpointing": False}),
    ("qwen2.5-0.5b", {"method": "full", "weights_dtype": "fp32", "optimizer": "adamw_8bit",
                      "gradient_checkpointing": False}),
    ("qwen2.5-0.5b", {"method": "full", "optimizer": "adamw_8bit", "loop": "plain",
                      "gradient_checkpointing": False}),
    ("qwen2.5-0.5b", {"method": "lora", "loop": "plain", "gradient_checkpointing": False}),
    ("qwen2.5-0.5b", {"offload_activations": "all"}),
    ("qwen2.5-0.5b", {"offload_activations": "checkpoints"}),
    ("qwen2.5-0.5b", {"loss_kernel": "liger"}),
    ("qwen2.5-0.5b", {"loss_kernel": "trl-chunked", "layout": "padding-free"}),
    ("qwen2.5-0.5b", {"layout": "packed", "expandable_segments": True}),
    ("mixtral-8x7b", {"lora_dropout": 0.0}),
    ("gemma-2-2b", {"seq_len": 4096, "attn": "eager"}),
    ("phi-2", {"method": "full", "optimizer": "adamw_torch"}),
])
@pytest.mark.parametrize("steps", [3, 4])
def test_steps_that_begin_alike_are_the_last_one_repeated(
        monkeypatch: pytest.MonkeyPatch, name: str, options: dict[str, object],
        steps: int) -> None:
    """A step that begins in the state the last one began in is that step again, ids
    renamed (step._Boundary): the requests, runs, phases and host peak are those of every
    step generated one by one, and the repetition is taken (from the third step on here;
    the first makes the optimizer's states)."""
    from vramcalc.memory.program import step as module

    settings: dict[str, object] = {"batch_size": 1, "seq_len": 256, **options}
    spec, plan = depth_cut(get_spec(name), 3), TrainPlan(**settings)  # type: ignore[arg-type]
    repeated: list[bool] = []
    repeats = module._Boundary.repeats

    def spy(self: object, *args: object) -> bool:
        repeated.append(repeats(self, *args))  # type: ignore[arg-type]
        return repeated[-1]

    monkeypatch.setattr(module._Boundary, "repeats", spy)
    fast = step_requests(spec, plan, steps)
    assert repeated[-1:] == [True]
    _one_by_one(monkeypatch)
    slow = step_requests(spec, plan, steps)
    assert fast.requests == slow.requests
    assert (fast.runs, fast.phases, fast.host_peak) == (slow.runs, slow.phases, slow.host_peak)


def test_a_step_that_begins_otherwise_is_generated() -> None:
    """The second step begins with the optimizer's states made and the first step's
    output gone: not the state the first began in, so it is generated, not repeated."""
    from vramcalc.memory.program import step as module

    g = module.Graph()
    first = module._Boundary.of(g, ((), []), 0)
    g.alloc(1 << 20)
    b = g.alloc(1 << 20)
    second = module._Boundary.of(g, ((b,), []), 0)
    assert first is not None and second is not None
    assert not first.repeats(second, g, [], 1)
