"""`estimate.required_bytes` (what verdicts and searches read, without the allocator's
replay) is the full estimate's required_device_bytes and required_low, byte for byte, and
`program.step.requested_peak` is the replay's largest requested peak: on every catalog
model and fit's methods, and on plans that take the template's other paths."""

from __future__ import annotations

import pytest

from vramcalc.errors import PlanError
from vramcalc.memory.estimate import estimate, required_bytes
from vramcalc.memory.program import step
from vramcalc.memory.program.step import program_peaks, requested_peak
from vramcalc.models.spec import catalog, depth_cut, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.comparison import FIT_METHODS, method_plan
from vramcalc.sizing.search import quick_estimate

# batch 1 (fit's verdict), and a larger batch and length (a search's points: other
# requests cross program.load MIN_REQUEST, other cut shapes)
pytestmark = pytest.mark.replay

POINTS = ({"batch_size": 1, "seq_len": 512}, {"batch_size": 6, "seq_len": 1536})


def _full(spec: object, plan: TrainPlan) -> tuple[object, ...]:
    try:
        e = estimate(spec, plan)  # type: ignore[arg-type]
    except PlanError as err:
        return ("PlanError", str(err))
    return (e.required_device_bytes, e.required_low)


def _required(spec: object, plan: TrainPlan, formula: bool = False) -> tuple[object, ...]:
    try:
        if formula:
            return required_bytes(spec, plan, quick_estimate(spec, plan))  # type: ignore[arg-type]
        return required_bytes(spec, plan)  # type: ignore[arg-type]
    except PlanError as err:
        return ("PlanError", str(err))


@pytest.mark.parametrize("name", sorted(s.name for s in catalog()))
def test_required_bytes_are_the_estimates_on_the_catalog(name: str) -> None:
    spec = get_spec(name)
    for method in FIT_METHODS:
        for i, point in enumerate(POINTS):
            plan = method_plan(TrainPlan(), method).model_copy(update=point)
            assert _required(spec, plan, formula=bool(i)) == _full(spec, plan), (method, point)


@pytest.mark.parametrize("changes", [
    {},
    {"gradient_checkpointing": False},
    {"offload_activations": "all"},  # generated whole: no template
    {"loop": "trainer-plain-outputs"},
    {"loss_kernel": "liger"},
    {"method": "full", "optimizer": "adamw_torch"},
    {"expandable_segments": True, "batch_size": 3, "seq_len": 2048},
])
def test_requested_peak_is_the_replays(changes: dict[str, object]) -> None:
    for spec in (get_spec("llama-3.1-8b"), get_spec("gemma-2-2b"),
                 depth_cut(get_spec("qwen2.5-0.5b"), 4)):  # 4 layers: no template
        plan = TrainPlan(**changes)  # type: ignore[arg-type]
        want = max(program_peaks(spec, plan).requested.values())
        assert requested_peak(spec, plan) == want, (spec.name, changes)
        if spec.name == "qwen2.5-0.5b":
            py = program_peaks(spec, plan, engine="python")
            assert max(py.requested.values()) == want


@pytest.mark.skipif(step._SPAN_CHANGES is None, reason="the compiled replay is not built")
def test_both_span_passes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled `span_changes` and its pure-Python fallback give the same spans."""
    for name, method in (("llama-3.1-8b", "qlora"), ("gemma-2-2b", "int8"),
                         ("qwen2.5-0.5b", "full")):
        plan = method_plan(TrainPlan(), method).model_copy(update={"batch_size": 3})
        spec = get_spec(name)
        compiled = requested_peak(spec, plan)
        requests = step.step_requests(depth_cut(spec, 6), plan).requests
        spans = [(0, len(requests)), (5, 5), (10, 2000), (len(requests) // 2, len(requests))]
        c = step._span_changes(requests, spans)
        monkeypatch.setattr(step, "_SPAN_CHANGES", None)
        assert step._span_changes(requests, spans) == c
        assert requested_peak(spec, plan) == compiled
        monkeypatch.undo()
