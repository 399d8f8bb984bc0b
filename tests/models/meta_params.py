"""The parameter count transformers gives a config: the reference test_specs.py and
test_hf_config.py check spec parameter counts against (importable from their folder,
which pytest puts on sys.path for them)."""

from __future__ import annotations

import functools
import json

import pytest


@functools.cache
def meta_param_count(config_json: str) -> int:
    """sum(p.numel()) of AutoModelForCausalLM built from a config dict on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = json.loads(config_json)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
