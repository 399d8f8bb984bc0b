"""fp16 and bf16 make the same requests (program.step.as_generated): the step generator and
the load read a 16-bit dtype only through its size, so an fp16 plan (a GPU without bf16)
may reuse its bf16 twin's generation; nor do they read expandable_segments or alpha.
Generated afresh for both, over the catalog, the methods and the switches that read a
dtype."""

from __future__ import annotations

import pytest

from vramcalc.memory.estimate import estimate
from vramcalc.memory.program import step
from vramcalc.memory.program.load import load_requests
from vramcalc.memory.program.step import as_generated, step_requests
from vramcalc.models.spec import catalog, depth_cut, get_spec
from vramcalc.plans import TrainPlan

SHORT = {"batch_size": 2, "seq_len": 256}
METHODS = [
    {"method": "qlora"},
    {"method": "qlora", "quant": "int8"},
    {"method": "qlora", "kbit_prep": False, "adapter_dtype": "bf16"},
    {"method": "lora"},
    {"method": "lora", "gradient_checkpointing": False, "attn": "eager"},
    {"method": "full", "optimizer": "adamw_torch"},
    {"method": "full", "loop": "trainer-plain", "optimizer": "adamw_8bit"},
]


def _fp16(options: dict[str, object]) -> dict[str, object]:
    out = {**options, "compute_dtype": "fp16"}
    if options.get("adapter_dtype") == "bf16":
        out["adapter_dtype"] = "fp16"
    return out


def _generated(name: str, options: dict[str, object]) -> tuple[object, ...]:
    spec = depth_cut(get_spec(name), 4)
    plan = TrainPlan.model_validate({**SHORT, **options})
    gen = step_requests(spec, plan)
    return gen.requests, gen.phases, gen.runs, gen.host_peak, load_requests(spec, plan)


@pytest.mark.parametrize("name", sorted(s.name for s in catalog()))
def test_fp16_requests_are_bf16s(name: str) -> None:
    for options in METHODS:
        assert _generated(name, _fp16(options)) == _generated(name, options), options


@pytest.mark.parametrize("name", ["llama-3.2-1b", "gemma-2-2b", "qwen2.5-0.5b", "mixtral-8x7b"])
def test_unread_fields_change_no_request(name: str) -> None:
    for options in METHODS:
        other = {**options, "expandable_segments": True, "alpha": 7.0}
        assert _generated(name, other) == _generated(name, options), options


def test_only_all_fp16_plans_are_renamed() -> None:
    bf16 = TrainPlan(method="lora")
    fp16 = TrainPlan(method="lora", compute_dtype="fp16")
    mixed = TrainPlan(method="lora", compute_dtype="fp16", weights_dtype="bf16")
    assert as_generated(bf16) is bf16
    assert as_generated(fp16) == bf16.model_copy(update={"weights_dtype": None})
    assert as_generated(mixed) is mixed  # autocast casts bf16 weights to fp16: kept
    fp32 = TrainPlan(method="full", compute_dtype="fp16", weights_dtype="fp32")
    assert as_generated(fp32).compute_dtype == "bf16"
    assert as_generated(fp32).weights_dtype == "fp32"


def _clear_caches() -> None:
    step.STEP_CACHE.clear()
    step._LOADS.clear()
    step._LOAD_REQUESTED.clear()


def test_fp16_estimate_is_its_own_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp16 plan estimated after its bf16 twin (the twin's generation reused) gives the
    bytes of its own generation (as_generated turned off, the caches emptied)."""
    spec = get_spec("llama-3.2-1b")
    fp16 = TrainPlan(method="lora", batch_size=4, seq_len=512, compute_dtype="fp16")
    estimate(spec, fp16.model_copy(update={"compute_dtype": "bf16"}))
    reused = estimate(spec, fp16)
    _clear_caches()
    monkeypatch.setattr(step, "as_generated", lambda plan: plan)
    own = estimate(spec, fp16)
    _clear_caches()
    assert (reused.peak_allocated_bytes, reused.peak_reserved_bytes,
            reused.peak_device_bytes, reused.required_device_bytes) == (
        own.peak_allocated_bytes, own.peak_reserved_bytes, own.peak_device_bytes,
        own.required_device_bytes)
