"""What to change when a plan does not fit: each suggestion is computed by the estimator.

Pure functions over (spec, plan, memory, margin): every candidate change is applied to the
plan and estimated again (the required free memory of the full estimate, as `plan` shows
it), and only the ones that `plan` would call "fits" on a card offering `memory_bytes` with
`margin_bytes` to spare (verdict.fits_certainly; "fits, tight" does not count) are offered.
A suggestion shows only that number (and the host memory of offloading), so where the
estimate is the raw one (no corrections) it is read without the allocator's replay
(search.required_device: estimate.required_bytes, the same bytes; the memory the host
holds does not depend on the replay either). Nothing here imports rich, typer, pynvml or
torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from vramcalc.corrections.planning import EstimateFn, memoized
from vramcalc.errors import VramcalcError
from vramcalc.memory.estimate import check_loss_kernel, estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan
from vramcalc.sizing.search import largest_fitting, raw_probes, required_device
from vramcalc.sizing.verdict import fits_certainly

if TYPE_CHECKING:
    from vramcalc.hardware.catalog import GpuModel

# Smaller LoRA ranks tried, largest first (the ranks QLoRA recipes use).
SMALLER_RANKS = (64, 32, 16, 8, 4)
# Roles of the attention projections (vramcalc.models.spec.LinearShape.role).
ATTENTION_ROLES = frozenset({"q", "k", "v", "qkv", "o"})
MEMORY_SAVING_OPTIMIZER = "paged_adamw_8bit"

# What each kind of change costs besides memory, and its rank (0 first): an order from the
# mechanism, not a measurement. The allocator setting and sdpa cost nothing; the fused loss
# kernels compute the same loss with other kernels (their authors report equal or higher
# throughput: liger-kernel README, cut-cross-entropy paper; not measured here; a package
# to install); the paged 8-bit optimizer keeps its states in managed memory that can page
# to host RAM, and quantized states; checkpointing recomputes every layer's forward in
# backward (about one forward more per step); a smaller batch with accumulation runs
# smaller matmuls, more steps; a smaller rank or fewer targets change what trains; shorter
# sequences change the data.
COSTS: dict[str, tuple[int, str]] = {
    "allocator": (0, "none (an environment variable)"),
    "attn": (0, "none (sdpa is the faster kernel)"),
    "loss_kernel": (1, "a package; the same loss, other kernels"),
    "layout": (1, "the collator: TRL padding_free=True (or packing=True, its bfd strategy); "
               "sequences flattened into one row, which needs flash-attention's varlen "
               "kernels (--attn flash_attention_2) to keep them apart"),
    "optimizer": (2, "host RAM for paged states; 8-bit quantized states"),
    "gradient_checkpointing": (3, "throughput: one more forward per step"),
    "batch": (3, "throughput: smaller matmuls, more steps (accumulation keeps the batch)"),
    "combined": (3, "the costs of each change it makes"),
    "rank": (4, "the adapter: fewer trainable parameters"),
    "targets": (4, "the adapter: fewer modules trained"),
    "seq_len": (5, "the data: sequences cut shorter"),
}
# The loss kernels check offers (TrainPlan.loss_kernel), in that order, with how a user
# turns each on
LOSS_KERNEL_OFFERS: dict[str, tuple[str, str]] = {
    "liger": ("Liger fused linear cross-entropy", "use_liger_kernel=True"),
    "cce": ("cut cross-entropy", "cut_cross_entropy.transformers.cce_patch(model)"),
    "chunked": ("chunked cross-entropy (8 chunks, torchtune-style)",
                "CEWithChunkedOutputLoss"),
    "trl-chunked": ("TRL chunked NLL (256-token checkpointed chunks)",
                    'SFTTrainer with loss_type="chunked_nll", its default in TRL 1.4-1.14'),
    "trl-fused": ("TRL fused LM head (4096 x 32768 logit tiles)",
                  "SFTTrainer of TRL >= 1.15 (add_fused_lm_head, always on)"),
}


class Suggestion(BaseModel):
    """One change to a plan and its estimated effect.

    `changes` holds TrainPlan fields and their new values (`plan.model_copy(update=changes)`
    is the suggested plan); `gradient_accumulation_steps` is set where the change keeps the
    effective batch through accumulation (a trainer setting, no memory effect).
    """

    # built on first use: compare and fit import this module and never make one
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    kind: str  # COSTS keys: allocator, attn, loss_kernel, optimizer, gradient_checkpointing,
    # batch, seq_len, rank, targets, combined
    description: str
    flags: str  # the vramcalc options that express the change
    changes: dict[str, Any]
    gradient_accumulation_steps: int | None = None
    required_device_bytes: int  # free memory the changed plan needs (Estimate field)
    fits: bool  # what `plan` calls "fits" (not tight) for the changed plan
    cost_rank: int = 0  # COSTS: 0 costs nothing besides memory, higher costs more
    cost: str = ""  # what the change costs besides memory (COSTS)

    def apply(self, plan: TrainPlan) -> TrainPlan:
        return plan.model_copy(update=self.changes)

    @property
    def command_flags(self) -> str:
        """The options, plus the trainer's accumulation where the change keeps the batch."""
        acc = self.gradient_accumulation_steps
        return self.flags + (f", gradient accumulation {acc}" if acc else "")


def _flag(field: str, value: Any) -> str:
    if field == "gradient_checkpointing":
        return "--gradient-checkpointing" if value else "--no-gradient-checkpointing"
    if field == "expandable_segments":
        return "--expandable-segments" if value else "--no-expandable-segments"
    if field == "loss_kernel":
        return f"--loss-kernel {value}"
    if field == "layout":
        return f"--batch-layout {value}"
    name = {"batch_size": "batch", "seq_len": "seq-len"}.get(field, field.replace("_", "-"))
    return f"--{name} {value}"


def _suggestion(
    spec: ModelSpec,
    plan: TrainPlan,
    memory_bytes: int,
    margin_bytes: int,
    kind: str,
    description: str,
    changes: dict[str, Any],
    accumulation: int | None = None,
    estimate_fn: EstimateFn = estimate,
) -> Suggestion:
    changes = with_real_tokens(plan, changes)
    new_plan = TrainPlan.model_validate({**plan.model_dump(), **changes})
    peak = required_device(estimate_fn)(spec, new_plan)
    rank, cost = COSTS.get(kind, (0, ""))
    return Suggestion(
        cost_rank=rank,
        cost=cost,
        kind=kind,
        description=description,
        flags=" ".join(_flag(f, v) for f, v in changes.items()),
        changes=changes,
        gradient_accumulation_steps=accumulation,
        required_device_bytes=peak,
        fits=fits_certainly(memory_bytes, peak, margin_bytes),
    )


def with_real_tokens(plan: TrainPlan, changes: dict[str, Any]) -> dict[str, Any]:
    """A smaller batch or shorter rows of a padding-free plan whose --tokens-per-step they
    cannot hold: the tokens too (TrainPlan.tokens: at most batch x seq_len), so that the
    flags run as given."""
    if plan.tokens_per_step is None or not {"batch_size", "seq_len"} & set(changes):
        return changes
    rows = plan.model_copy(update=changes)
    if rows.tokens < plan.tokens_per_step:
        return {**changes, "tokens_per_step": rows.tokens}
    return changes


def allocator_suggestion(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    estimate_fn: EstimateFn = estimate,
) -> Suggestion | None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, with the required free memory it
    saves (the fragmentation an out-of-memory retry could not give back,
    allocator.required_slack); None when the plan already has it or it saves nothing."""
    if plan.expandable_segments:
        return None
    switched = _suggestion(spec, plan, memory_bytes, margin_bytes, "allocator", "",
                           {"expandable_segments": True}, None, estimate_fn)
    saved = required_device(estimate_fn)(spec, plan) - switched.required_device_bytes
    if saved <= 0:
        return None
    return switched.model_copy(update={"description": (
        f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ({saved / 2**30:.2f} GiB less "
        "required: the retry after a failed request can unmap free pages)")})


def loss_kernel_suggestions(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    estimate_fn: EstimateFn = estimate,
) -> list[Suggestion]:
    """Each loss kernel the plan could use instead of transformers' lm_head +
    cross-entropy (LOSS_KERNEL_OFFERS), estimated; those the model or the plan cannot
    run (estimate.check_loss_kernel) are left out, and so are those that save nothing."""
    if plan.loss_kernel != "torch":
        return []
    base = required_device(estimate_fn)(spec, plan)
    out = []
    for kernel, (name, how) in LOSS_KERNEL_OFFERS.items():
        changed = plan.model_copy(update={"loss_kernel": kernel})
        try:
            check_loss_kernel(spec, changed)
        except VramcalcError:
            continue
        s = _suggestion(spec, plan, memory_bytes, margin_bytes, "loss_kernel", "",
                        {"loss_kernel": kernel}, None, estimate_fn)
        if s.required_device_bytes >= base:
            continue
        out.append(s.model_copy(update={"description": f"{name} (`{how}`)"}))
    return out


def padding_free_step(lengths: Sequence[int], batch: int, max_len: int) -> tuple[int, int]:
    """(seq_len, tokens_per_step) of the padding-free step that needs the most memory on
    these sequence lengths, each cut to `max_len`: the `batch` longest together (what
    `plan --lengths F --batch-layout padding-free` plans: commands/options.py worst_step)."""
    cut = sorted((min(n, max_len) for n in lengths), reverse=True)
    return max_len, sum(cut[:batch])


def layout_suggestion(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    step: tuple[int, int] | None, estimate_fn: EstimateFn = estimate,
) -> Suggestion | None:
    """Padding-free batches where a padded plan's worst step (`--lengths`) pads: `step` is
    the padding-free worst step of the same lengths (padding_free_step); None where the
    plan is not padded, there is no padding to drop (the batch's longest rows all reach
    the longest), or it saves nothing. Packed rows are not offered: they are filled to
    --seq-len, never less than the padded worst step's rows."""
    if step is None or plan.layout != "padded":
        return None
    seq_len, tokens = step
    if tokens >= plan.batch_size * plan.seq_len:
        return None
    s = _suggestion(spec, plan, memory_bytes, margin_bytes, "layout", "",
                    {"layout": "padding-free", "seq_len": seq_len, "tokens_per_step": tokens},
                    None, estimate_fn)
    if s.required_device_bytes >= required_device(estimate_fn)(spec, plan):
        return None
    waste = 1 - tokens / (plan.batch_size * plan.seq_len)
    return s.model_copy(update={"description": (
        f"padding-free batches (TRL `padding_free=True`): the worst step's {tokens} real "
        f"tokens instead of {plan.batch_size} x {plan.seq_len} padded ({waste:.0%} padding)")})


def attention_targets(spec: ModelSpec) -> list[str]:
    """The module names of the attention projections (q, k, v or fused qkv, o)."""
    return [lin.name for lin in spec.block_linears() if lin.role in ATTENTION_ROLES]


def _batch_change(plan: TrainPlan, batch: int) -> tuple[str, dict[str, Any], int | None]:
    """Batch `batch` or less with accumulation that keeps the effective batch exactly: the
    largest divisor of the asked batch that is at most `batch` (8 -> 4 x 2; 7 -> 1 x 7)."""
    asked = plan.batch_size
    size = max(d for d in range(1, min(batch, asked) + 1) if asked % d == 0)
    steps = asked // size
    text = f"batch {size}"
    if steps > 1:
        text += f" x gradient accumulation {steps} (effective batch {asked}, as asked)"
    return text, {"batch_size": size}, steps if steps > 1 else None


def candidates(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    estimate_fn: EstimateFn = estimate, padding_free: tuple[int, int] | None = None,
) -> list[Suggestion]:
    """Every single change that saves memory on `plan`, estimated; fitting or not.
    `padding_free`: the padding-free worst step of the lengths the plan was made from
    (padding_free_step), where there were some.

    Changes that do not apply (checkpointing already on, rank already 4, ...) are left out.
    """
    out: list[Suggestion] = []
    need = required_device(estimate_fn)
    probes = raw_probes(estimate_fn)
    layout = layout_suggestion(spec, plan, memory_bytes, margin_bytes, padding_free,
                               estimate_fn)
    if layout is not None:
        out.append(layout)

    def add(kind: str, description: str, changes: dict[str, Any], acc: int | None = None) -> None:
        out.append(
            _suggestion(spec, plan, memory_bytes, margin_bytes, kind, description, changes,
                        acc, estimate_fn)
        )

    allocator = allocator_suggestion(spec, plan, memory_bytes, margin_bytes, estimate_fn)
    if allocator is not None:
        out.append(allocator)
    if not plan.gradient_checkpointing:
        add("gradient_checkpointing", "enable gradient checkpointing",
            {"gradient_checkpointing": True})
    if plan.optimizer != MEMORY_SAVING_OPTIMIZER:
        add("optimizer", f"use the {MEMORY_SAVING_OPTIMIZER} optimizer (was {plan.optimizer})",
            {"optimizer": MEMORY_SAVING_OPTIMIZER})
    if plan.attn == "eager":
        add("attn", "use sdpa attention instead of eager", {"attn": "sdpa"})
    out.extend(loss_kernel_suggestions(spec, plan, memory_bytes, margin_bytes, estimate_fn))
    if plan.batch_size > 1:
        batch = largest_fitting(spec, plan, "batch", memory_bytes, margin_bytes,
                                estimate_fn=estimate_fn)
        if 0 < batch < plan.batch_size:
            text, changes, acc = _batch_change(plan, batch)
            add("batch", text, changes, acc)
    if plan.seq_len > 1:
        seq = largest_fitting(spec, plan, "seq-len", memory_bytes, margin_bytes,
                              estimate_fn=estimate_fn)
        if 0 < seq < plan.seq_len:
            add("seq_len", f"sequences of at most {seq} tokens (was {plan.seq_len})",
                {"seq_len": seq})
    smaller = [r for r in SMALLER_RANKS if r < plan.rank]
    for rank in smaller:  # largest first: the first that fits, else the smallest tried
        peak = need(spec, plan.model_copy(update={"rank": rank}))
        if fits_certainly(memory_bytes, peak, margin_bytes) or rank == smaller[-1]:
            add("rank", f"LoRA rank {rank} (was {plan.rank})", {"rank": rank})
            break
    for mode in offload_modes(plan):
        changes = {"offload_activations": mode}
        # the formula's host bytes where the estimate is raw: the replay does not set them
        # (estimate.estimate: offload_host_bytes)
        host = (estimate_fn if probes is None else probes.guess)(spec, TrainPlan.model_validate(
            {**plan.model_dump(), **changes})).host_bytes
        out.append(_suggestion(spec, plan, memory_bytes, margin_bytes, "offload_activations",
                               OFFLOAD_TEXT[mode], changes, None, estimate_fn)
                   .model_copy(update={"cost": offload_cost(host)}))
    attention = attention_targets(spec)
    current = {lin.name for lin in spec.block_linears()} if plan.targets == "all-linear" else set(
        plan.target_list()
    )
    if attention and not current <= set(attention):
        add("targets", f"LoRA on the attention projections only ({', '.join(attention)})",
            {"targets": ",".join(attention)})
    return out


# --offload-activations, as check offers it (commands/options.py OffloadActivationsOpt)
OFFLOAD_TEXT = {
    "checkpoints": "offload the checkpointed layer inputs to host memory (Unsloth "
                   "use_gradient_checkpointing=\"unsloth\")",
    "all": "offload the saved activations to host memory (TRL / axolotl "
           "activation_offloading=True, torchtune OffloadActivations)",
}


def offload_modes(plan: TrainPlan) -> list[str]:
    """The activation offloading to try on `plan`: the checkpoint inputs under checkpointing
    (the cheaper: one copy of each layer input each way), every saved activation without."""
    if plan.offload_activations != "none":
        return []
    return ["checkpoints"] if plan.gradient_checkpointing else ["all"]


def offload_cost(host_bytes: int) -> str:
    return (f"{host_bytes / 2**30:.2f} GiB of pinned host memory, and throughput: each "
            "offloaded tensor is copied to the host and back every step (overlapped on a "
            "side stream where the PCIe bandwidth allows)")


def combined(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    estimate_fn: EstimateFn = estimate,
) -> Suggestion | None:
    """Every memory-saving switch at once (checkpointing, paged 8-bit optimizer, sdpa), with
    the largest batch that then fits (accumulation keeps the effective batch); None when
    there is no switch to make or not even batch 1 fits."""
    switches: dict[str, Any] = {}
    if not plan.gradient_checkpointing:
        switches["gradient_checkpointing"] = True
    if plan.optimizer != MEMORY_SAVING_OPTIMIZER:
        switches["optimizer"] = MEMORY_SAVING_OPTIMIZER
    if plan.attn == "eager":
        switches["attn"] = "sdpa"
    switched = plan.model_copy(update=switches)
    batch = min(
        largest_fitting(spec, switched, "batch", memory_bytes, margin_bytes,
                        estimate_fn=estimate_fn),
        plan.batch_size,
    )
    if batch == 0 or (not switches and batch == plan.batch_size):
        return None
    changes = dict(switches)
    parts = [_flag(f, v).lstrip("-") for f, v in switches.items()]
    acc = None
    if batch < plan.batch_size:
        text, batch_changes, acc = _batch_change(plan, batch)
        changes.update(batch_changes)
        parts.append(text)
    return _suggestion(spec, plan, memory_bytes, margin_bytes, "combined",
                       "together: " + ", ".join(parts), changes, acc, estimate_fn)


def suggest(
    spec: ModelSpec, plan: TrainPlan, memory_bytes: int, margin_bytes: int,
    estimate_fn: EstimateFn = estimate, padding_free: tuple[int, int] | None = None,
) -> list[Suggestion]:
    """The changes that make `plan` fit `memory_bytes` with `margin_bytes` to spare (as
    `plan` calls "fits"), each estimated: single changes first, cheapest first (COSTS),
    then all switches together with the largest batch that fits, when no single change is
    enough or it keeps a larger batch than a smaller batch alone. Empty when nothing fits,
    not even batch 1."""
    if estimate_fn is estimate:  # one memo for the candidates and the searches
        estimate_fn = memoized(estimate)
    fitting = [s for s in candidates(spec, plan, memory_bytes, margin_bytes, estimate_fn,
                                     padding_free) if s.fits]
    # the cheapest first (COSTS), then the one that needs the least memory
    fitting.sort(key=lambda s: (s.cost_rank, s.required_device_bytes))
    both = combined(spec, plan, memory_bytes, margin_bytes, estimate_fn)
    if both is not None and both.fits:
        batch_alone = max((s.changes["batch_size"] for s in fitting if s.kind == "batch"),
                          default=0)
        if not fitting or both.changes.get("batch_size", plan.batch_size) > batch_alone:
            fitting.append(both)
    return fitting


def for_gpu(plan: TrainPlan, bf16_supported: bool) -> TrainPlan:
    """The plan as it runs on a GPU: bf16 compute becomes fp16 without bf16 support."""
    if plan.compute_dtype == "bf16" and not bf16_supported:
        return plan.model_copy(update={"compute_dtype": "fp16"})
    return plan


class GpuAnswer(NamedTuple):
    """The smallest catalog GPU a plan fits, and the change it needs there (None: as is)."""

    gpu: GpuModel
    suggestion: Suggestion | None


def smallest_fitting_gpu(
    spec: ModelSpec,
    plan: TrainPlan,
    margin_bytes: int,
    gpus: Iterable[GpuModel],
    estimate_for: Callable[[GpuModel], EstimateFn] | None = None,
) -> GpuAnswer | None:
    """The catalog GPU with the least usable memory (total less the driver's reservation)
    on which `plan` (fp16 where bf16 is missing) fits an empty card with `margin_bytes` to
    spare ("fits", not tight, as `plan --gpu` would call it), as is or else with the first
    of `suggest`'s changes. None if no GPU fits even with a change. `estimate_for` gives
    each GPU its estimate function (its family's corrections; memoize it: the GPUs' plans
    repeat; None: the raw estimate, memoized)."""
    raw = memoized(estimate)
    for gpu in sorted(gpus, key=lambda g: g.usable_bytes):
        fn = raw if estimate_for is None else estimate_for(gpu)
        p = for_gpu(plan, gpu.bf16_supported)
        if fits_certainly(gpu.usable_bytes, required_device(fn)(spec, p), margin_bytes):
            return GpuAnswer(gpu, None)
        found = suggest(spec, p, gpu.usable_bytes, margin_bytes, fn)
        if found:
            return GpuAnswer(gpu, found[0])
    return None
