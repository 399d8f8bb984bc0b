"""The time of several GPUs (timing/parallel_time.py): the collectives' bytes by their ring
formulas, the overlap rule, what is refused, and the command line's fields."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vramcalc.errors import PlanError
from vramcalc.hardware.catalog import catalog as gpu_catalog
from vramcalc.hardware.catalog import resolve_gpu
from vramcalc.memory.multi_gpu import ParallelPlan, trainable_grad_bytes
from vramcalc.memory.program.trainable import lora_param_count
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.timing.gpu_speed import Link, gpu_link, gpu_speed, parse_speed_table, speed_table
from vramcalc.timing.parallel_time import (
    DDP_BUCKET_BYTES,
    NCCL_CALL_S,
    collectives,
    gathered_bytes,
    parallel_step_time,
)
from vramcalc.timing.step_time import step_time, train_work


def _spec(name: str) -> ModelSpec:
    from vramcalc.models.spec import catalog

    return {s.name: s for s in catalog()}[name]


def _speed(name: str) -> Any:
    speed = gpu_speed(resolve_gpu(name))
    assert speed is not None
    return speed


def _link(name: str) -> Link:
    link = gpu_link(resolve_gpu(name))
    assert link is not None
    return link


LORA = TrainPlan(method="lora", quant="none", batch_size=4, seq_len=1024)
FULL = TrainPlan(method="full", quant="none", batch_size=1, seq_len=4096,
                 optimizer="adamw_torch_fused")


def test_every_timed_gpu_has_a_link_and_each_link_a_source() -> None:
    table = speed_table()
    assert set(table.links) == set(table.gpus)
    for link in table.links.values():
        assert link.basis == "derived" and link.source and 0 < link.efficiency <= 1


@pytest.mark.parametrize(("links", "error"), [
    ("links: {x: {bandwidth: 1, efficiency: 0.5, basis: derived, gpus: [nope], source: s}}",
     "'nope' is not a GPU of this file"),
    ("links: {x: {bandwidth: 1, efficiency: 0.5, basis: derived, gpus: [g], source: s},\n"
     "        y: {bandwidth: 1, efficiency: 0.5, basis: derived, gpus: [g], source: s}}",
     "'g' is also under x"),
    ("links: {x: {bandwidth: 1, efficiency: 1.5, basis: derived, gpus: [g], source: s}}",
     "efficiency must be in (0, 1]"),
])
def test_bad_links_are_refused(links: str, error: str) -> None:
    from vramcalc.errors import SpecError

    text = ("efficiencies: {}\ngpus: {g: {fp32: 1, bandwidth: 1, tensor16: 2, source: s}}\n"
            + links)
    with pytest.raises(SpecError, match="links"):
        parse_speed_table(text, "t.yaml")
    try:
        parse_speed_table(text, "t.yaml")
    except SpecError as err:
        assert error in str(err)


def test_ddp_all_reduces_the_gradients_in_buckets() -> None:
    spec, n = _spec("llama-2-7b"), 4
    link = _link("rtx-4090")
    (c,) = collectives(spec, LORA, ParallelPlan(gpus=n, strategy="ddp"), link)
    grads = trainable_grad_bytes(spec, LORA)
    assert c.bus_bytes == pytest.approx(2 * (n - 1) / n * grads)
    assert c.calls == -(-grads // DDP_BUCKET_BYTES)
    assert c.seconds == pytest.approx(c.bus_bytes / (link.bandwidth * link.efficiency)
                                      + c.calls * NCCL_CALL_S)


def test_fsdp_gathers_twice_and_reduce_scatters_once() -> None:
    spec, n = _spec("llama-2-7b"), 8
    par = ParallelPlan(gpus=n, strategy="fsdp")
    found = {c.name: c for c in collectives(spec, FULL, par, _link("a100-sxm4-80gb"))}
    gathered = gathered_bytes(spec, FULL)
    # bf16 weights, full fine-tuning: every parameter, 2 bytes (each tensor rounded to 512)
    assert gathered == pytest.approx(2 * spec.num_params(), rel=1e-4)
    assert found["all-gather parameters (forward)"].bus_bytes == pytest.approx(
        (n - 1) / n * gathered)
    root = (spec.embedding_params() + spec.lm_head_params() + spec.hidden_size) * 2
    assert found["all-gather parameters (backward)"].bus_bytes == pytest.approx(
        (n - 1) / n * (gathered - root))
    assert found["reduce-scatter gradients"].bus_bytes == pytest.approx(
        (n - 1) / n * trainable_grad_bytes(spec, FULL))
    grad_op = collectives(spec, FULL, ParallelPlan(gpus=n, strategy="fsdp",
                                                   sharding_strategy="SHARD_GRAD_OP"),
                          _link("a100-sxm4-80gb"))
    assert "all-gather parameters (backward)" not in {c.name for c in grad_op}


def test_qlora_gathers_the_packed_weights() -> None:
    spec = _spec("llama-2-70b")
    qlora = TrainPlan(batch_size=1, seq_len=2048)
    lora = qlora.model_copy(update={"method": "lora", "quant": "none"})
    assert gathered_bytes(spec, qlora) < 0.35 * gathered_bytes(spec, lora)


def test_zero2_waits_for_its_collectives_and_zero3_overlaps() -> None:
    spec, n = _spec("llama-2-7b"), 4
    speed, link = _speed("rtx-4090"), _link("rtx-4090")
    z2 = parallel_step_time(spec, LORA, ParallelPlan(gpus=n, strategy="zero2"), speed, link)
    assert z2.exposed_seconds == pytest.approx(z2.comm_seconds)
    after = [c for c in z2.collectives if c.phase == "after"]
    assert after and after[0].bus_bytes == pytest.approx(
        (n - 1) / n * 2 * lora_param_count(spec, LORA))
    z3 = parallel_step_time(spec, LORA, ParallelPlan(gpus=n, strategy="zero3"), speed, link)
    assert z3.exposed_seconds < z3.comm_seconds


def test_the_step_is_the_compute_plus_what_is_exposed() -> None:
    spec = _spec("llama-3.1-8b")
    speed, link = _speed("h100-sxm"), _link("h100-sxm")
    for strategy in ("ddp", "fsdp", "zero2", "zero3"):
        pt = parallel_step_time(spec, LORA, ParallelPlan(gpus=2, strategy=strategy), speed,
                                link)
        assert pt.step_seconds == pytest.approx(pt.compute_seconds + pt.exposed_seconds)
        assert pt.exposed_seconds >= 0 and pt.tokens == 2 * LORA.batch_size * LORA.seq_len
        s = pt.step
        assert s.forward_seconds > 0 and s.backward_seconds > s.forward_seconds
        assert s.step_seconds == pytest.approx(s.forward_seconds + s.backward_seconds
                                               + s.optimizer_seconds + train_work(
                                                   spec, LORA).host_step_s * speed.host_factor)


def test_a_slower_link_never_makes_a_step_faster() -> None:
    spec, speed = _spec("llama-2-7b"), _speed("a100-sxm4-80gb")
    fast = _link("a100-sxm4-80gb")
    for strategy in ("ddp", "fsdp", "zero2", "zero3"):
        par = ParallelPlan(gpus=8, strategy=strategy)
        times = [parallel_step_time(spec, FULL, par, speed,
                                    fast._replace(bandwidth=fast.bandwidth / k)).step_seconds
                 for k in (1, 4, 16, 64)]
        assert times == sorted(times), strategy


def test_sharded_optimizer_step_is_a_shard_of_the_one_gpu_step() -> None:
    spec, speed = _spec("llama-2-7b"), _speed("a100-sxm4-80gb")
    one = step_time(train_work(spec, FULL), speed)
    pt = parallel_step_time(spec, FULL, ParallelPlan(gpus=8, strategy="zero3"), speed,
                            _link("a100-sxm4-80gb"))
    assert pt.step.optimizer_seconds < one.optimizer_seconds
    ddp = parallel_step_time(spec, FULL, ParallelPlan(gpus=8, strategy="ddp"), speed,
                             _link("a100-sxm4-80gb"))
    assert ddp.step.optimizer_seconds == pytest.approx(one.optimizer_seconds)


def test_device_map_is_the_one_gpu_step() -> None:
    spec, speed = _spec("llama-2-70b"), _speed("a100-sxm4-80gb")
    plan = TrainPlan(batch_size=1, seq_len=1024)
    one = step_time(train_work(spec, plan), speed)
    pt = parallel_step_time(spec, plan, ParallelPlan(gpus=2, strategy="device-map"), speed,
                            _link("a100-sxm4-80gb"))
    assert pt.step_seconds == pytest.approx(one.step_seconds) and pt.tokens == one.tokens
    assert pt.collectives == ()


@pytest.mark.parametrize(("par", "why"), [
    (ParallelPlan(gpus=4, strategy="zero3", offload="cpu"), "--offload cpu"),
    (ParallelPlan(gpus=4, strategy="ddp", gpus_per_node=2), "between machines"),
])
def test_what_is_not_modelled_is_refused(par: ParallelPlan, why: str) -> None:
    with pytest.raises(PlanError, match="time of several GPUs"):
        parallel_step_time(_spec("llama-2-7b"), LORA, par, _speed("h100-sxm"),
                           _link("h100-sxm"))
    from vramcalc.timing.parallel_time import not_timed

    assert why in str(not_timed(LORA, par))


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from vramcalc.cli import app

    return CliRunner().invoke(app, list(args))


def test_plan_and_check_give_the_same_time_of_several_gpus() -> None:
    common = ["-m", "llama-3.1-8b", "--gpus", "4", "--strategy", "fsdp", "--gpu", "h100-sxm",
              "--dataset-tokens", "1000000", "--price", "h100-sxm=2", "--json"]
    plan = json.loads(_cli("plan", *common).output)
    check = json.loads(_cli("check", *common).output)
    keys = ("step_seconds", "tokens_per_second", "tokens_per_step", "total_seconds",
            "cost_usd", "gpus", "link", "communication_seconds",
            "exposed_communication_seconds", "time_basis")
    assert {k: plan[k] for k in keys} == {k: check[k] for k in keys}
    assert plan["gpus"] == 4 and plan["link"] == "nvlink4" and plan["time_basis"] == "derived"
    # every GPU's tokens; the cost is the four GPUs' hours at the price
    assert plan["tokens_per_step"] == 4 * 512
    assert plan["cost_usd"] == pytest.approx(plan["total_seconds"] / 3600 * 2 * 4)


def test_one_gpu_json_has_no_fields_of_several() -> None:
    out = json.loads(_cli("plan", "-m", "llama-3.1-8b", "--gpu", "h100-sxm", "--json").output)
    assert "step_seconds" in out and "gpus" not in out and "link" not in out


def test_every_catalog_gpu_with_peaks_can_time_several() -> None:
    for gpu in gpu_catalog():
        if gpu_speed(gpu) is not None:
            assert gpu_link(gpu) is not None, gpu.name


def test_fp32_weights_are_gathered_in_the_compute_dtype() -> None:
    """FSDP MixedPrecision / DeepSpeed bf16 over fp32 weights: 16-bit gathers, the root
    left out of the backward's at the same width."""
    spec, n = _spec("qwen2.5-1.5b"), 2
    fp32 = FULL.model_copy(update={"weights_dtype": "fp32"})
    assert gathered_bytes(spec, fp32) == gathered_bytes(spec, FULL)
    found = {c.name: c for c in collectives(spec, fp32, ParallelPlan(gpus=n, strategy="fsdp"),
                                            _link("h100-sxm"))}
    root = (spec.embedding_params() + spec.lm_head_params() + spec.hidden_size) * 2
    assert found["all-gather parameters (backward)"].bus_bytes == pytest.approx(
        (n - 1) / n * (gathered_bytes(spec, fp32) - root))


def test_checks_several_gpu_options_carry_their_time() -> None:
    argv = ["check", "-m", "llama-2-70b", "--gpu", "rtx-4090", "--method", "lora", "--quant",
            "none", "--json"]
    plain = json.loads(_cli(*argv).output)["several_gpus"]
    assert [o["gpus"] for o in plain] == sorted(o["gpus"] for o in plain)  # fewest first
    for o in plain:
        if o["offload"] == "cpu":
            assert o["time"] is None  # the host's step is not modelled
        else:
            assert o["time"]["gpus"] == o["gpus"] and o["time"]["time_basis"] == "derived"
    costed = json.loads(_cli(*argv, "--dataset-tokens", "1000000").output)["several_gpus"]
    costs = [o["time"]["cost_usd"] for o in costed if o["time"] is not None]
    assert costs and costs == sorted(costs)
    assert all(o["time"] is None for o in costed[len(costs):])


def test_mixed_cards_are_not_timed() -> None:
    """Data parallel runs at the slowest card's pace over the slowest link: several GPUs
    of different kinds get no time, and the time options are refused there."""
    argv = ["check", "-m", "llama-3.1-8b", "--gpus", "2", "--strategy", "fsdp", "--gpu",
            "h100-sxm", "--gpu", "a100-80gb"]
    r = _cli(*argv, "--dataset-tokens", "1000")
    assert r.exit_code == 1 and "the time of mixed GPUs" in r.output
    out = json.loads(_cli(*argv, "--json").stdout)
    assert "step_seconds" not in out and out["fits"] is True


def test_sharded_qlora_is_timed_without_kbit_preparation() -> None:
    """fsdp / zero3 over 4-bit weights: the step of the plan without kbit preparation (the
    memory of several GPUs assumes TRL's is_sharded_qlora path); ddp keeps it."""
    spec, speed, link = _spec("llama-3.1-8b"), _speed("h100-sxm"), _link("h100-sxm")
    qlora = TrainPlan(batch_size=4, seq_len=1024)
    bare = qlora.model_copy(update={"kbit_prep": False})
    one_bare = step_time(train_work(spec, bare), speed)
    one_prep = step_time(train_work(spec, qlora), speed)
    assert one_bare.step_seconds < one_prep.step_seconds
    for strategy, expected in (("fsdp", one_bare), ("zero3", one_bare), ("ddp", one_prep)):
        pt = parallel_step_time(spec, qlora, ParallelPlan(gpus=2, strategy=strategy), speed,
                                link)
        assert pt.step.forward_seconds == pytest.approx(expected.forward_seconds), strategy
