"""The typed result every estimate returns: bytes by component, by phase, and the totals.

One result for every task (a training step today; inference, merging and several GPUs
build on it): components are named fields, a component a task does not have is 0, and the
render layer (`render.py`) shows the non-zero ones with labels for the plan they belong to.
Integer bytes throughout; GiB only at the edges.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, computed_field


class Components(BaseModel):
    """Bytes of each component at the peak moment. They add up to peak device bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_weights: int = 0  # model weights in their storage dtype (4-bit packed, int8, 16/32-bit)
    quant_constants: int = 0  # absmax, nested absmax, code tables (4-bit); row scales (int8)
    unquantized_params: int = 0  # embeddings, lm_head, norms, biases (never quantized)
    expert_weights: int = 0  # MoE experts stored as 3-D tensors that bitsandbytes leaves alone
    adapter_weights: int = 0  # LoRA A/B, DoRA magnitudes
    gradients: int = 0  # of the trainable parameters
    optimizer_states: int = 0  # allocated through torch
    optimizer_paged: int = 0  # bitsandbytes paged states (cudaMallocManaged), resident
    activations: int = 0  # saved for backward (or the forward's live tensors)
    kv_cache: int = 0  # inference: keys and values of every layer
    logits_loss: int = 0  # logits, their fp32 copies, log-softmax, loss gradients
    transient: int = 0  # dequantized weights, autocast copies, gradient transients
    cublas_workspace: int = 0
    comm_buffers: int = 0  # collective-communication buckets (several GPUs)
    allocator_slack: int = 0  # reserved - allocated at the peak
    cuda_context: int = 0  # CUDA context and lazily loaded kernels (outside torch)

    def __getitem__(self, name: str) -> int:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return int(getattr(self, name))

    def get(self, name: str, default: int = 0) -> int:
        return int(getattr(self, name, default))

    def items(self) -> Iterator[tuple[str, int]]:
        for name in type(self).model_fields:
            yield name, int(getattr(self, name))

    def total(self) -> int:
        return sum(v for _, v in self.items())

    def replace(self, **changes: int) -> Components:
        return self.model_copy(update=changes)


COMPONENTS: tuple[str, ...] = tuple(Components.model_fields)


class Estimate(BaseModel):
    """A frozen, typed breakdown in integer bytes (components sum to peak_device_bytes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    task: str = "train"
    params: int
    trainable_params: int
    components: Components
    phases: dict[str, int]  # peak allocated bytes of each phase
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_device_bytes: int
    # What must be free for the step to run: allocated + unreleasable slack + context +
    # paged state. Decides "fits"; peak_device_bytes is what NVML shows with room to spare.
    required_device_bytes: int
    paged_bytes: int
    notes: tuple[str, ...] = ()  # what the estimate assumed that the user may not expect
    # Below this much free memory the step cannot run whatever the allocator's history (the
    # fragmentation of a first step); between it and required_device_bytes it depends on
    # how the cached segments were reused (allocator.required_slack). None: the same.
    required_device_low_bytes: int | None = None
    # Plan settings the stack really runs where they differ from the request (a "QLoRA" base
    # bitsandbytes leaves unquantized, falcon's sdpa running as math attention; see
    # effective.py and the notes): {"method": "lora", "weights_dtype": "fp32", ...}.
    planned_as: dict[str, str] = {}
    # Each phase's components at that phase's own peak (the peak phase's are `components`),
    # for what rearranges them per phase (multi_gpu: a sharded optimizer step, units
    # gathered only while forward and backward run). Left out of model_dump / JSON: derived
    # from the same attribution as `components`; empty where no one filled it in.
    phase_components: dict[str, dict[str, int]] = Field(default_factory=dict, exclude=True)
    # Host memory the offloaded activations take (TrainPlan.offload_activations; pinned):
    # program.step.offload_host_bytes. Left out of the
    # dump when 0, so the estimates of plans without offloading dump as before.
    host_bytes: int = Field(default=0, exclude_if=lambda v: v == 0)

    @property
    def required_low(self) -> int:
        """required_device_low_bytes, or required_device_bytes where there is no band."""
        from vramcalc.sizing.verdict import least_required

        return least_required(self.required_device_bytes, self.required_device_low_bytes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.components.total()
