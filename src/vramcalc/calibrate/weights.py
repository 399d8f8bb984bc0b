"""Random-weight checkpoints built from a spec, so nothing is downloaded.

Memory does not depend on weight values, so a checkpoint of random bf16 weights of the
right shapes measures the same as the real one. Built on the GPU when there is one (a
7-8B model initialises in seconds there), saved as safetensors, then reloaded in 4-bit by
`from_pretrained` exactly as a real checkpoint would be.
"""

from __future__ import annotations

from typing import Any

from vramcalc.models.spec import ModelSpec


def hf_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**spec.to_hf_config())


def save_random_weights(spec: ModelSpec, out_dir: str, device: str = "cuda") -> None:
    """Instantiate `spec` with random bf16 weights on `device` and save it to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
