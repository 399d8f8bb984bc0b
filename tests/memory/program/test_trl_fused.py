"""TRL >= 1.15 SFTTrainer's fused LM head (`--loss-kernel trl-fused`, step.py
_trl_fused_head): the requests it makes in forward and backward, in order, with the sizes
of trl 1.16.0 trainer/utils.py `add_fused_lm_head` (_fused_forward) and
kernels/chunked_logprob.py `ChunkedLogProbFunction`; the `--trainer trl` preset and
--from-config's loss_type mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vramcalc.memory.program.step as step
from vramcalc.errors import PlanError
from vramcalc.memory.estimate import check_loss_kernel, estimate
from vramcalc.memory.program.load import MIN_REQUEST
from vramcalc.models.spec import depth_cut, get_spec
from vramcalc.plans import TrainPlan
from vramcalc.trainers import TRAINERS
from vramcalc.training_config import read_training_config

# trl 1.16.0: kernels/chunked_logprob.py TOKEN_CHUNK_SIZE, trainer/utils.py
# _CHUNKED_LOGPROB_CHUNK_SIZE (written here from the source, not imported from step.py)
TOKENS, COLUMNS = 4096, 32768


def _head_requests(monkeypatch: pytest.MonkeyPatch, spec_name: str, plan: TrainPlan
                   ) -> tuple[list[int], list[tuple[int, int]], Any]:
    """The sizes the head's forward allocates, in order, and the whole step's requests."""
    spans: list[tuple[int, int]] = []
    inner = step._trl_fused_head

    def spy(g: Any, *a: Any, **k: Any) -> Any:
        start = len(g.requests)
        out = inner(g, *a, **k)
        spans.append((start, len(g.requests)))
        return out

    monkeypatch.setattr(step, "_trl_fused_head", spy)
    r = step.step_requests(depth_cut(get_spec(spec_name), 2), plan, steps=1)
    (lo, hi), = spans
    return [size for _, size in r.requests[lo:hi] if size], r.requests, r


def _big(*sizes: int) -> list[int]:
    return [s for s in sizes if s >= MIN_REQUEST]


def test_qlora_forward_requests_follow_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """QLoRA (fp32 final norm output and fp32 lm_head, bf16 autocast): 4 x 4097 tokens
    give N = 4 x 4096 labelled positions after the shift: 4 tiles of 4096 rows, each cast
    to bf16, and per tile 5 column casts of the weight (4 x 32768 + the rest of 151936)."""
    spec = get_spec("qwen2.5-0.5b")
    h, v = spec.hidden_size, spec.vocab_size
    plan = TrainPlan(method="qlora", batch_size=4, seq_len=4097, loss_kernel="trl-fused")
    got, _, _ = _head_requests(monkeypatch, spec.name, plan)
    n = m = 4 * 4096
    cols = [min(COLUMNS, v - c) for c in range(0, v, COLUMNS)]
    assert len(cols) == 5
    want = _big(m, n * 16, n * h * 4, n * 16, n * 8, *[n * 4] * 7, TOKENS * COLUMNS * 2)
    for _ in range(n // TOKENS):
        want += [TOKENS * h * 2] + [c * h * 2 for c in cols]
    want += _big(n * 4, n * 4, n * 4, n * 4, n * 4, n, n, n)  # log_z, logprobs, entropy, top1
    for width in (4, 4, 1):  # log_probs, entropy, is_top1 scattered back to [B, S-1]
        want += _big(m * width, m * width, m * 8)
    want += [m * 4]  # compute_loss: -outputs.log_probs
    assert got == want


def test_bf16_lora_makes_no_casts_and_one_tile_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit LoRA: the rows and the weight are already bf16 (no `.to` copies); mm_buf is
    min(N, 4096) x 32768 whatever the vocabulary."""
    spec = get_spec("qwen2.5-0.5b")
    plan = TrainPlan(method="lora", weights_dtype="bf16", batch_size=2, seq_len=1025,
                     loss_kernel="trl-fused")
    got, _, _ = _head_requests(monkeypatch, spec.name, plan)
    n, h = 2 * 1024, spec.hidden_size
    assert n * COLUMNS * 2 in got
    assert not any(s in (TOKENS * h * 2, COLUMNS * h * 2) for s in got)
    assert not any(s >= n * spec.vocab_size for s in got)  # never the logits


def test_backward_holds_grad_hidden_tile_and_two_column_casts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ChunkedLogProbFunction.backward under QLoRA: grad_hidden is fp32 like the rows (it
    is the gradient, `.to(fp32)` a no-op), mm_buf, one row cast and two column casts (the
    next made before the last goes) are alive together; then IndexBackward's zeros of the
    [B, S-1, h] slice and SliceBackward's of the whole hidden state."""
    spec = get_spec("qwen2.5-0.5b")
    h = spec.hidden_size
    plan = TrainPlan(method="qlora", batch_size=4, seq_len=4097, loss_kernel="trl-fused")
    _, requests, r = _head_requests(monkeypatch, spec.name, plan)
    start = dict(r.phases)["backward"]
    n = 4 * 4096
    # (the backward thread's cuBLAS workspace, made at its first matmul, left out)
    sizes = [s for _, s in requests[start:start + 40] if s and s != step.CUBLAS_WORKSPACE]
    held = [TOKENS * COLUMNS * 2, TOKENS * h * 2, COLUMNS * h * 2, COLUMNS * h * 2]
    i = sizes.index(held[0])
    assert sizes[i:i + 4] == held
    assert sizes[i + 4] == n * h * 4  # grad_hidden, the rows' gradient (fp32)
    # IndexBackward: the slice's zeros, index_put_'s nonzero and sort indices; then
    # SliceBackward's zeros of the whole [B, S, h] hidden state
    assert sizes[i + 5:i + 10] == [n * h * 4, n * 16, n * 8, n * 8, n * 8]
    assert sizes[i + 10] == 4 * 4097 * h * 4


def test_lower_than_the_full_logits_and_refused_outside_the_trainer() -> None:
    spec = get_spec("llama-3.1-8b")
    base = TrainPlan(batch_size=4, seq_len=2048)
    fused = base.model_copy(update={"loss_kernel": "trl-fused"})
    assert estimate(spec, fused).peak_allocated_bytes < estimate(spec, base).peak_allocated_bytes
    with pytest.raises(PlanError, match="use --loop trainer"):
        check_loss_kernel(spec, fused.model_copy(update={"loop": "plain"}))


def test_trl_preset_is_the_fused_head() -> None:
    """trl 1.16.0 SFTTrainer.__init__ always adds the fused head; trl-chunked stays an
    option for TRL 1.4-1.14."""
    assert TRAINERS["trl"].options["loss_kernel"] == "trl-fused"
    assert TRAINERS["unsloth"].options["loss_kernel"] == "liger"


@pytest.mark.parametrize(("text", "kernel"), [
    ("loss_type: nll\n", "trl-fused"),
    ("loss_type: chunked_nll\n", "trl-fused"),  # a deprecated alias of nll in trl 1.16
    ("loss_type: dft\n", "trl-fused"),
    ("use_liger_kernel: true\n", "liger"),
])
def test_config_loss_type_maps_to_the_fused_head(tmp_path: Path, text: str,
                                                 kernel: str) -> None:
    f = tmp_path / "sft.yaml"
    f.write_text("model_name_or_path: meta-llama/Llama-3.2-1B\n" + text)
    tc = read_training_config(f)
    assert tc.options["loss_kernel"] == kernel
    if "dft" in text or "liger" in text:
        assert tc.unmodelled
