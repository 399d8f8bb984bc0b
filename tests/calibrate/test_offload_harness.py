"""The worker's Unsloth-style offloaded checkpoints (calibrate/offload.py CheckpointOffload)
free the GPU copy of each offloaded layer input after forward, and train as plain
checkpointing does. Run 31's k010/k021 held both copies (host bytes as planned, device
peak unchanged): the pack hook's closure kept the input, and autograd keeps that hook
with every tensor it saved until backward.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramcalc.calibrate.offload import CheckpointOffload  # noqa: E402

LAYERS = 4


def _model() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=4, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def test_offloaded_layer_inputs_are_freed_after_forward_and_the_gradients_are_unchanged(
) -> None:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = _model()
    plain(input_ids=ids, labels=ids).loss.backward()

    model = _model()
    off = CheckpointOffload(LAYERS)
    assert off.install(model) == LAYERS
    inputs: list[Any] = []
    checkpoint = off.checkpoint

    def spy(function: Any, *args: Any, **kwargs: Any) -> Any:
        inputs.append(weakref.ref(args[0]))
        return checkpoint(function, *args, **kwargs)

    for module in model.modules():
        if getattr(module, "_gradient_checkpointing_func", None) == checkpoint:
            module._gradient_checkpointing_func = spy
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = [ref() is not None for ref in inputs]
    # every layer input but the last went to the host, and only there
    assert alive == [False] * (LAYERS - 1) + [True]
    assert off.host == (LAYERS - 1) * 2 * 16 * 64 * 4  # fp32 hidden states on CPU
    loss.backward()
    assert off.host == 0
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
