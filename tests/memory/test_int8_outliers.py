"""The share of the MLP down projection's input columns that bitsandbytes int8 keeps as
outliers (subA), counted on models built from their config on CPU.

MatMul8bitLt keeps the columns of its input A with any |value| >= 6 (bitsandbytes 0.50.2
backends/cuda/ops.py int8_vectorwise_quant, backends/default/ops.py
int8_mixed_scaled_mm). The counts here are taken directly from the down projection's
input of a transformers model with `from_config` weights, without any vramcalc formula,
and compared with `activations.int8_outlier_fraction` and its per-element tail, which
derive them from the width, the MLP's activation and the initializer's standard deviation.
"""

from __future__ import annotations

import math

import pytest

from vramcalc.memory.program.activations import INT8_THRESHOLD, _outlier_tail, int8_outlier_fraction
from vramcalc.models.spec import ModelSpec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOKENS = [512, 1024, 2048, 4096]


def _down_input(spec: ModelSpec, tokens: int, seed: int = 0) -> torch.Tensor:
    """The down projection's input of layer 0 for `tokens` random token ids, 2-D."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**spec.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    seen: list[torch.Tensor] = []
    down = model.model.layers[0].mlp.down_proj
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    ids = torch.randint(0, spec.vocab_size, (1, tokens))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _narrow(name: str, hidden: int, **extra: object) -> ModelSpec:
    """One layer of the given width and 1024 MLP columns: what the fraction depends on
    (hidden size, the MLP's activation and layout, the initializer range) kept, the rest
    made small. The vocabulary stays large: the rows must be distinct tokens, as a real
    vocabulary draws them (256 tokens repeat within 1024 rows)."""
    base = {"model_type": "llama", "vocab_size": 32768, "tie_word_embeddings": True,
            "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
            "hidden_act": "silu", "mlp_layout": "gated", "intermediate_size": 1024}
    return ModelSpec(name=name, hidden_size=hidden, **{**base, **extra})  # type: ignore[arg-type]


CASES = {
    "h2048": _narrow("narrow-2048", 2048),
    "h2560": _narrow("narrow-2560", 2560),
    "h1024-init0.04": _narrow("narrow-1024", 1024, extra_config={"initializer_range": 0.04}),
}


@pytest.fixture(scope="module", params=list(CASES))
def counted(request: pytest.FixtureRequest) -> tuple[ModelSpec, torch.Tensor]:
    spec = CASES[request.param]
    return spec, _down_input(spec, max(TOKENS)).abs() >= INT8_THRESHOLD


def test_element_tail_matches_the_counted_elements(
        counted: tuple[ModelSpec, torch.Tensor]) -> None:
    """P(|act(g) u| >= 6) with g, u ~ N(0, initializer_range^2 h): the share of elements,
    counted over 4M of them (>= 200 events), within 4 standard errors."""
    spec, over = counted
    sigma = spec.extra_config.get("initializer_range", 0.02)
    p = _outlier_tail(round(sigma * math.sqrt(spec.hidden_size), 6), "silu", True)
    n = over.numel()
    seen = over.float().mean().item()
    assert seen * n >= 200
    assert abs(seen - p) <= 4 * math.sqrt(p * (1 - p) / n) + 0.02 * p, (seen, p)


def test_column_fraction_is_bounded_by_independent_rows(
        counted: tuple[ModelSpec, torch.Tensor]) -> None:
    """1 - (1 - p)^rows takes rows as independent; attention's component shared by all
    tokens clusters a column's outliers, so fewer columns pass: within [0.6, 1] of it
    (plus the count's sampling error, 1024 columns), growing with the rows."""
    spec, over = counted
    for n in TOKENS:
        seen = over[:n].any(dim=0).float().mean().item()
        formula = int8_outlier_fraction(spec, n)
        assert 0.6 * formula - 0.03 <= seen <= formula + 0.03, (n, seen, formula)
    fractions = [int8_outlier_fraction(spec, n) for n in TOKENS]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]


def test_initializer_range_from_the_config_is_read() -> None:
    wide = CASES["h1024-init0.04"]
    plain = _narrow("narrow-1024", 1024)
    assert int8_outlier_fraction(wide, 1024) > int8_outlier_fraction(plain, 1024) + 0.2
