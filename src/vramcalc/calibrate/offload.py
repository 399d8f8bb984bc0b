"""The calibration worker's batch layouts and activation offloading (issue 29, part B).

Imported by `run.py` only (torch imported inside the functions): the rows a padded, packed
or padding-free step feeds the model, and the two offloading techniques the step program
models (`program.step.Graph._offload`):

- `CheckpointOffload` ("checkpoints"): Unsloth's offloaded gradient checkpointing
  (unsloth-zoo ce232d6 gradient_checkpointing.py `UnslothCheckpointFunction`) rebuilt on
  torch's non-reentrant checkpoint: the checkpointed layer's hidden_states (the one input
  `_NoopSaveInputs` saves under the outer saved_tensors_hooks) is copied to a pinned host
  tensor of its own, and backward copies it back into one GPU buffer kept for good; the last
  layer's input stays on the GPU. Installed on each decoder layer's
  `_gradient_checkpointing_func` (transformers 5 GradientCheckpointingLayer).
- `offload_context` ("all"): TRL's `get_act_offloading_ctx_manager` (torchtune's
  OffloadActivations with streams, NoOpManager on the lm_head) where trl is installed, else
  `SavedTensorOffload`, the same rules without streams: every saved tensor of at least
  1 KiB that is no parameter to pinned host memory, the last 5 kept on the GPU until later
  ones replace them or backward begins, a tensor still kept not offloaded twice, the
  lm_head's saved tensors left alone.

Each records the host bytes it holds at most (`host_peak`), reported as the measurement's
`offload.host_peak_bytes` (TRL's: torch's host allocator statistics where torch has them).
"""

from __future__ import annotations

import contextlib
from typing import Any

from vramcalc.plans import TrainPlan

MIN_OFFLOAD_BYTES = 1024  # OffloadActivations min_offload_size
STASH = 5  # OffloadActivations max_fwd_stash_size


def layout_rows(plan: TrainPlan, vocab: int, rows: int) -> list[dict[str, Any]]:
    """`rows` training examples as the collator would hand them to the model, for the
    Trainer's default collator (which stacks them): padded: full rows of seq_len; packed:
    rows of seq_len holding two sequences (position_ids restarting halfway, axolotl
    multipack); padding-free: one row of the step's tokens per step (per-device batch 1),
    sequences of seq_len with their own position_ids (TRL DataCollatorForLanguageModeling
    padding_free: `position_ids` restart, no attention_mask)."""
    import torch

    if plan.layout == "padded":
        ids = torch.randint(0, vocab, (rows, plan.seq_len))
        return [{"input_ids": r, "labels": r} for r in ids]
    _, length = plan.rows
    piece = plan.seq_len if plan.layout == "padding-free" else max(plan.seq_len // 2, 1)
    positions = torch.cat([torch.arange(min(piece, length - k))
                           for k in range(0, length, piece)])
    ids = torch.randint(0, vocab, (rows, length))
    return [{"input_ids": r, "labels": r, "position_ids": positions.clone()} for r in ids]


def per_device_batch(plan: TrainPlan) -> int:
    """Rows per step: padding-free steps are one row."""
    return plan.rows[0]


class CheckpointOffload:
    """Unsloth-style offloaded checkpoints (module docstring)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.index = 0
        self.buffer: Any = None
        self.host = 0
        self.host_peak = 0

    def install(self, model: Any) -> int:
        """Put `checkpoint` in every checkpointed layer; how many."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        n = 0
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module._gradient_checkpointing_func = self.checkpoint
                n += 1
        return n

    def checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils.checkpoint import checkpoint

        index, self.index = self.index, (self.index + 1) % self.layers
        hidden = args[0] if args else None
        if (index == self.layers - 1 or not isinstance(hidden, torch.Tensor)
                or not hidden.requires_grad):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)
        # The layer input is recognised by its address and shape, not held: autograd keeps
        # the pack hook (and what its closure holds) with every tensor it saved until
        # backward, so a closure over the input kept its GPU copy alive beside the host one
        # (run 31, k010/k021: host bytes as planned, device peak unchanged).
        target_ptr, target_shape = hidden.data_ptr(), hidden.shape
        del hidden

        def pack(t: Any) -> Any:
            if not (t.data_ptr() == target_ptr and t.shape == target_shape):
                return ("gpu", t)
            if self.buffer is None or self.buffer.numel() < t.numel():
                self.buffer = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
            cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            cpu.copy_(t, non_blocking=True)
            nbytes = t.numel() * t.element_size()
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)
            return ("cpu", cpu, nbytes)

        def unpack(packed: Any) -> Any:
            if packed[0] == "gpu":
                return packed[1]
            _, cpu, nbytes = packed
            self.host -= nbytes
            buf = self.buffer[:cpu.numel()].view(cpu.shape)
            buf.copy_(cpu, non_blocking=True)
            return buf

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)


class SavedTensorOffload:
    """OffloadActivations without streams (module docstring); a context manager."""

    def __init__(self, model: Any) -> None:
        import torch

        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.stash: list[Any] = []
        self.noop = False
        self.host = 0
        self.host_peak = 0
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            head.register_forward_pre_hook(lambda *a: setattr(self, "noop", True))
            head.register_forward_hook(lambda *a: setattr(self, "noop", False),
                                       always_call=True)

        def pack(t: Any) -> Any:
            nbytes = t.numel() * t.element_size()
            if (self.noop or not t.is_cuda or nbytes < MIN_OFFLOAD_BYTES
                    or isinstance(t, torch.nn.Parameter)
                    or t.untyped_storage().data_ptr() in self.params
                    or any(s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                           for s in self.stash)):
                return ("gpu", t)
            src = t if t.is_contiguous() and t.storage_offset() == 0 else t.contiguous()
            cpu = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            cpu.copy_(src)
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)
            self.stash.append(t)
            if len(self.stash) > STASH:
                self.stash.pop(0)
            return ("cpu", cpu, nbytes)

        def unpack(packed: Any) -> Any:
            self.stash.clear()  # backward began
            if packed[0] == "gpu":
                return packed[1]
            _, cpu, nbytes = packed
            self.host -= nbytes
            return cpu.to("cuda", non_blocking=True)

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def __enter__(self) -> SavedTensorOffload:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)


def offload_context(model: Any) -> tuple[Any, str]:
    """The "all" context for training steps, and which implementation it is."""
    try:
        from trl.models.activation_offloading import (  # type: ignore[import-not-found,unused-ignore]
            get_act_offloading_ctx_manager,
        )
    except ImportError:
        return SavedTensorOffload(model), "builtin"
    return get_act_offloading_ctx_manager(model=model), "trl"


def host_allocator_peak() -> int | None:
    """torch's pinned host allocator peak, where this torch reports it."""
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    with contextlib.suppress(Exception):
        value = stats().get("allocated_bytes.current.peak") or stats().get(
            "allocated_bytes.peak")
        return None if value is None else int(value)
    return None
