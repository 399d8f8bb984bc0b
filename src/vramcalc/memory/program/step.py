"""The allocation requests of training steps, generated from the plan: what the caching
allocator sees (sizes and order of every tensor of at least a few KiB), so that
`allocator.replay` can give the reserved bytes they leave.

A small autograd: every forward op allocates its temporaries and its output, and keeps
the tensors its backward needs (saved tensors); backward runs the ops in reverse, each
allocating the gradients of its inputs, then freeing its output's gradient and its saved
tensors (torch/csrc/autograd: a node's SavedVariables are released after it runs). An
add or a clone hands its output's gradient on to its inputs as the same tensor; a
gradient that reaches a tensor twice is summed (input_buffer.cpp accumulate). Python
references drop where the modeling code's locals go out of scope. Non-reentrant gradient
checkpointing (torch/utils/checkpoint.py, use_reentrant=False) runs each layer's forward
keeping only its input, and recomputes the layer right before its backward.

The op programs follow the requests recorded on the H200 (calibration/h200/run14-traces,
read with `calibration/trace_programs.py`): transformers 5 Llama-style decoder layers
(RMSNorm in fp32, rotary by `rotate_half`, sdpa or eager attention, gated or plain MLP),
peft 0.21 LoRA (input cast to the fp32 adapters, dropout mask, compute-dtype copy for
lora_A), bitsandbytes 4-bit (dequantized weight per matmul), the fp32 upcast and
log-softmax of the loss (transformers loss_utils.ForCausalLMLoss), accelerate's fp32 cast
of the output under Trainer, the cuBLAS workspaces of the forward and backward threads, and
the optimizer's state tensors, made at the first step. Sizes below 64 KiB are left out:
they sit in the small pool's 2 MiB segments and move reserved memory by a few MiB.

MoE layers (run17-traces t17-y013 / t17-x013 mixtral, t17-x014 / t17-q014 qwen3-moe): the
top-k router, transformers 5 `grouped_mm_experts_forward` over the fused 3-D stacks in their
own dtype (all tokens x top-k rows, gathered by expert: an even split or not, the grouped
tensors are the same size), Qwen2-MoE's shared expert, and peft ParamWrapper's folded
stacks where LoRA targets the experts.

int8 bases (bnb Linear8bitLt) run their own program (run17-traces t17-w029, t17-y012).
Not traced, so approximate: a frozen fp32 base under autocast (falcon "QLoRA", LoRA on
fp32 weights) runs the 16-bit one; experts that a stack quantizes into per-expert Linears
(`moe_experts="quantized"`) run every routed row through one gated MLP. Non-reentrant
checkpointing: the backward nodes that run before the recompute is triggered (those
without saved tensors) run after it here (they hand their gradient on without a copy, so
no request moves).
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter

from vramcalc.errors import VramcalcError
from vramcalc.memory.allocator.replay import (
    COMPILED,
    Engine,
    replay_program,
    requested_run,
    round_size,
)
from vramcalc.memory.program.activations import (
    OUTLIER_ROLES,
    expert_dtype_bytes,
    int8_outlier_fraction,
    masked_layers,
    residual_bytes,
    sdpa_masks,
)
from vramcalc.memory.program.load import MIN_REQUEST, load_requests
from vramcalc.memory.program.optimizer import (
    OptimizerBytes,
    optimizer_bytes,
    optimizer_state_groups,
)
from vramcalc.memory.program.symbolic import StepCache, Sym, unread_by
from vramcalc.memory.program.templates import (
    TEMPLATE_LAYERS,
    StepProgram,
    template_program,
    template_runs,
)
from vramcalc.memory.program.trainable import lora_on_experts, lora_targets
from vramcalc.memory.program.weights import (
    DTYPE_BYTES,
    NF4_BLOCKSIZE,
    ceil_div,
    fused_experts,
    gemm_4bit_dequantizes,
)
from vramcalc.models.spec import (
    SCALED_EMBEDDING_FAMILIES,
    LinearShape,
    ModelSpec,
    depth_cut,
    layer_windows,
    sliding_past_window,
)
from vramcalc.plans import CHUNKED_LOSS_CHUNKS, TrainPlan
from vramcalc.records import Frozen, Record, Value

# torch CublasHandlePool.cpp: the cuBLAS workspace of a handle (32 MiB on Hopper) comes from
# the caching allocator at the handle's first matmul and is kept for good. Forward runs on
# the main thread, backward (and checkpoint recomputation) on autograd's device thread: two
# handles, two workspaces (recorded: one after the first forward matmul's output, one after
# the first backward matmul's, never freed).
CUBLAS_WORKSPACE = 32 * 1024 * 1024


class Buf(Record):
    __slots__ = _fields = ("size", "id", "refs", "layer")
    size: int
    id: int
    refs: int
    layer: int  # the layer whose requests allocated it (Graph.layer), -1 none

    def __init__(self, size: int, id: int, refs: int = 1, layer: int = -1) -> None:  # noqa: A002
        self.size = size
        self.id = id
        self.refs = refs
        self.layer = layer


class Var(Record):
    """A tensor in the forward: its buffer and whether a gradient flows to it."""

    __slots__ = _fields = ("buf", "size", "grad_bytes", "requires_grad", "param",
                           "sum_out_of_place", "grad", "has_grad")
    buf: Buf | None  # None: too small to track
    size: int
    grad_bytes: int  # bytes of its gradient
    requires_grad: bool
    param: bool  # a leaf parameter: its gradient stays until zero_grad
    # a second gradient is summed into a new tensor (tied embeddings of 16-bit weights; see
    # Graph._grad_into); otherwise it is added into the first in place
    sum_out_of_place: bool
    grad: Buf | None  # None also when the gradient is too small to track
    has_grad: bool  # a gradient has reached it (tracked or not)

    def __init__(self, buf: Buf | None, size: int, grad_bytes: int, requires_grad: bool,
                 param: bool = False, sum_out_of_place: bool = False,
                 grad: Buf | None = None, has_grad: bool = False) -> None:
        self.buf = buf
        self.size = size
        self.grad_bytes = grad_bytes
        self.requires_grad = requires_grad
        self.param = param
        self.sum_out_of_place = sum_out_of_place
        self.grad = grad
        self.has_grad = has_grad


class Node(Record):
    __slots__ = _fields = ("out", "inputs", "saved", "bwd_temps", "mm", "passthrough",
                           "layer", "offloaded", "grads", "views", "bwd_first")
    out: Var
    inputs: list[Var]
    saved: list[Buf]
    bwd_temps: Sequence[int]
    mm: bool  # a cuBLAS matmul: its backward may make the backward thread's workspace
    passthrough: bool  # add / clone: its inputs get its own gradient tensor
    layer: int  # the layer whose forward made it (Graph.layer)
    # the sizes of the saved tensors offloaded to host memory (Graph.offload "all"): their
    # backward brings each back as a new tensor first
    offloaded: Sequence[int]
    # the gradients of `inputs` its forward already made and keeps (fused kernels that
    # compute them in forward, or write them into their saved inputs in backward): backward
    # hands them on as they are
    grads: list[Buf | None] | None
    # its backward hands each input a view of its incoming gradient, whatever the sizes
    # (CatBackward0: narrow views, no new tensor)
    views: bool
    # a temporary its backward makes before `bwd_temps` and frees once they are made
    # (bitsandbytes' nested absmax, dequantized before the weight: `_linear`)
    bwd_first: int

    def __init__(self, out: Var, inputs: list[Var], saved: list[Buf],
                 bwd_temps: Sequence[int] = (), mm: bool = False, passthrough: bool = False,
                 layer: int = -1, offloaded: Sequence[int] = (),
                 grads: list[Buf | None] | None = None, views: bool = False,
                 bwd_first: int = 0) -> None:
        self.out = out
        self.inputs = inputs
        self.saved = saved
        self.bwd_temps = bwd_temps
        self.mm = mm
        self.passthrough = passthrough
        self.layer = layer
        self.offloaded = offloaded
        self.grads = grads
        self.views = views
        self.bwd_first = bwd_first


class ChunkNode(Record):
    """`chunk` of a tensor into views (views share its buffer): backward puts the views'
    gradients together into one gradient of the whole (aten `cat`), then frees them."""

    __slots__ = _fields = ("outs", "inp", "layer")
    outs: list[Var]
    inp: Var
    layer: int

    def __init__(self, outs: list[Var], inp: Var, layer: int = -1) -> None:
        self.outs = outs
        self.inp = inp
        self.layer = layer


class CheckpointNode(Record):
    """A checkpointed layer: its input is kept; backward recomputes it first."""

    __slots__ = _fields = ("out", "inp", "fn", "layer", "offloaded")
    out: Var
    inp: Var
    fn: Callable[[Graph, Var], Var]
    layer: int
    offloaded: bool  # the input went to host memory (Graph.offload)

    def __init__(self, out: Var, inp: Var, fn: Callable[[Graph, Var], Var], layer: int = -1,
                 offloaded: bool = False) -> None:
        self.out = out
        self.inp = inp
        self.fn = fn
        self.layer = layer
        self.offloaded = offloaded


class Graph:
    def __init__(self) -> None:
        self.requests: list[tuple[int, int]] = []  # (buffer id, size) / (id, 0) = free
        self.nodes: list[Node | ChunkNode | CheckpointNode] = []
        self.grad_mode = True
        self.recomputing = False
        self.cache: list[Var] = []
        # tensors kept as autograd ctx attributes (bnb MatMul8bitLt `ctx.tensors`): not
        # saved tensors, so released only when the graph is, after backward
        self.graph_held: list[Buf] = []
        # leaves outside the parameters that require grad (the embedding output under
        # enable_input_require_grads): their `.grad` goes with the leaf, which the graph's
        # AccumulateGrad node keeps until the graph is freed after backward
        self.leaves: list[Var] = []
        self.gone: set[int] = set()  # freed (or never made) outside unref: no request
        self.for_good: set[int] = set()  # cuBLAS workspaces: never freed
        self._next = 0
        self.in_backward = False
        self._workspaces: set[bool] = set()  # threads whose cuBLAS workspace exists
        # the decoder layer whose work makes the requests (-1: the rest), and where each
        # run of one layer's (or the rest's) requests starts: (layer, index of its first
        # request); memory/program/templates.py repeats a middle layer's runs
        self.layer = -1
        self.runs: list[tuple[int, int]] = [(-1, 0)]
        # activation offloading (TrainPlan.offload_activations), see `_offload`
        self.offload = "none"
        self.noop = False  # inside the lm_head: TRL's NoOpManager keeps its saved tensors
        self.stash: list[Buf] = []  # offloaded tensors still kept on the GPU
        self.host = 0  # bytes of offloaded tensors in host memory now
        self.host_peak = 0
        self.offload_buffer: Buf | None = None  # Unsloth's GPU_BUFFERS (checkpoints)
        self.checkpoints = 0  # checkpointed layers so far in this forward
        self.last_checkpoint = -1  # the index of the last one (Unsloth keeps its input)
        # cos and sin of the step's forward (`_rope_tables`): apply_rotary_pos_emb's
        # products save them for backward (`_rotary`); None outside a step
        self.rope: tuple[Var, Var] | None = None

    def set_layer(self, layer: int, new_run: bool = False) -> None:
        """The requests from here on are `layer`'s (-1: no layer's); `new_run` starts a
        new run even for the same layer (a phase of the step begins). Every loop over the
        layers marks each layer's requests so, and the rest with -1 before and after:
        program.templates repeats the middle layer's runs, and requests made layer by layer
        under -1 would be repeated as often as the cut has layers
        (tests/memory/program/test_step_templates.py compares with the full
        generation)."""
        if layer != self.layer or new_run:
            self.layer = layer
            self.runs.append((layer, len(self.requests)))

    # -- buffers ----------------------------------------------------------------------
    def alloc(self, size: int) -> Buf | None:
        if size < MIN_REQUEST:
            return None
        tid = self._next = self._next + 1
        self.requests.append((tid, size))
        return Buf(size, tid, 1, self.layer)

    def ref(self, b: Buf | None) -> Buf | None:
        if b is not None:
            b.refs += 1
        return b

    def unref(self, b: Buf | None) -> None:
        if b is None:
            return
        b.refs -= 1
        if b.refs == 0 and b.id not in self.gone:
            self.requests.append((b.id, 0))

    def temp(self, size: int) -> None:
        """A temporary, made and freed."""
        self.unref(self.alloc(size))

    def temp_pair(self, first: int, second: int) -> None:
        """Two temporaries alive together, freed second first."""
        a = self.alloc(first)
        self.unref(self.alloc(second))
        self.unref(a)

    def _release(self, bufs: Sequence[Buf | None]) -> None:
        """unref each of `bufs`, in order (inline: the backward's most frequent call)."""
        requests, gone = self.requests, self.gone
        for b in bufs:
            if b is not None:
                b.refs -= 1
                if b.refs == 0 and b.id not in gone:
                    requests.append((b.id, 0))

    def drop(self, *vs: Var) -> None:
        for v in vs:
            b = v.buf  # unref(v.buf), inline: the generator's most frequent call
            if b is not None:
                b.refs -= 1
                if b.refs == 0 and b.id not in self.gone:
                    self.requests.append((b.id, 0))

    def workspace(self) -> None:
        """A cuBLAS matmul ran on this thread: its handle's workspace, made once, kept."""
        if self.in_backward not in self._workspaces:
            self._workspaces.add(self.in_backward)
            b = self.alloc(CUBLAS_WORKSPACE)
            if b is not None:
                self.for_good.add(b.id)

    # -- ops --------------------------------------------------------------------------
    def op(self, size: int, inputs: list[Var], save: tuple[Var, ...] = (),
           bwd_temps: tuple[int, ...] = (), save_out: bool = False, mm: bool = False,
           passthrough: bool = False, grads: tuple[Buf | None, ...] | None = None,
           bwd_first: int = 0) -> Var:
        """A forward op: its output (of `size` bytes, its gradient the same); keeps `save`
        (and its output with `save_out`) for backward when a gradient flows through it,
        and makes `bwd_temps` while its backward runs. `mm`: a cuBLAS matmul (its inputs
        listed weight first: the backward computes the weight's gradient first).
        `passthrough`: an add or a clone, whose backward hands its output's gradient on to
        the inputs as it is. `grads`: one per input, the gradients its backward returns,
        made (or kept) already: referenced by the node, handed on as they are."""
        # (a loop, not a comprehension: CPython 3.11 calls one as a function, and most ops
        # have one or two inputs)
        grad_inputs = []
        for v in inputs:
            if v.requires_grad:
                grad_inputs.append(v)
        # alloc(size), inline: op is the generator's most frequent call after alloc
        if size < MIN_REQUEST:
            buf = None
        else:
            tid = self._next = self._next + 1
            buf = Buf(size, tid, 1, self.layer)
            self.requests.append((tid, size))
        # (a conditional, not bool(): no call)
        out = Var(buf, size, size, True if grad_inputs else False)
        if mm and self.in_backward not in self._workspaces:
            self.workspace()
        if grad_inputs and self.grad_mode:
            saved = []
            offloaded: list[int] = []
            if self.offload == "all" and not self.noop and not self.recomputing:
                for v in (*save, out) if save_out else save:
                    b = v.buf
                    if b is not None:
                        if b not in self.stash:
                            offloaded.append(self._offload(b))
                            continue
                        b.refs += 1
                        saved.append(b)
            else:  # (the same loop without offloading: most ops)
                for v in (*save, out) if save_out else save:
                    b = v.buf
                    if b is not None:
                        b.refs += 1
                        saved.append(b)
            kept: list[Buf | None] | None = None
            if grads is not None:
                kept = [b for v, b in zip(inputs, grads, strict=True) if v.requires_grad]
            self.nodes.append(Node(out, grad_inputs, saved, bwd_temps, mm, passthrough,
                                   self.layer, offloaded or (), kept, bwd_first=bwd_first))
        elif grads is not None:
            for b in grads:
                self.unref(b)
        return out

    def in_place(self, x: Var) -> Var:
        """An op that writes its result into its input and, in backward, its input's
        gradient into its output's (liger-kernel's RoPE: ops/rope.py LigerRopeFunction):
        the same buffer, the gradient handed on as it is."""
        out = Var(self.ref(x.buf), x.size, x.grad_bytes, x.requires_grad)
        if self.grad_mode and x.requires_grad:
            self.nodes.append(Node(out, [x], [], [], False, True, self.layer))
        return out

    # -- activation offloading ----------------------------------------------------------
    # torchtune / TRL `OffloadActivations` (trl/models/activation_offloading.py, TRL 1.x;
    # torchtune/training/_activation_offloading.py): a saved_tensors_hooks pack copies each
    # saved tensor of at least 1 KiB that is no parameter into pinned host memory
    # (`torch.empty_like(..., pin_memory=True)`, on a side stream) and the node keeps only
    # an id; the GPU tensor stays in `fwd_stash` until `max_fwd_stash_size` (5) later
    # tensors are offloaded, or backward begins. A tensor whose storage is still in the
    # stash is not offloaded again: the node keeps it on the GPU. Unpack, when the node's
    # backward runs, copies it back into a new GPU tensor, freed after the node (with
    # streams: once the next node runs, not modelled). The lm_head runs under NoOpManager
    # (get_act_offloading_ctx_manager). Inside a checkpointed layer the checkpoint's own
    # hooks take over: only its inputs are packed (torch/utils/checkpoint.py
    # `_NoopSaveInputs` saves them under the outer hooks).
    STASH = 5

    def _offload(self, b: Buf) -> int:
        """`b` is saved for backward and goes to host memory; its size to bring back."""
        self.host += b.size
        self.host_peak = max(self.host_peak, self.host)
        b.refs += 1
        self.stash.append(b)
        if len(self.stash) > self.STASH:
            self.unref(self.stash.pop(0))
        return b.size

    def release_stash(self) -> None:
        """Backward begins: the stash's GPU tensors go (OffloadActivations' first unpack
        hook: "if there are still things in the fwd_stash, get rid of them")."""
        stash, self.stash = self.stash, []
        for b in stash:
            self.unref(b)

    def cast_cached(self, w: Var, size: int) -> Var:
        """Autocast's cast of an fp32 leaf that requires grad: cached until the autocast
        region ends (torch autocast `cached_cast`), so alive through the forward."""
        wc = self.op(size, [w])
        self.cache.append(wc)
        return wc

    def clear_cache(self) -> None:
        for v in self.cache:
            if v.buf is not None:
                self.set_layer(v.buf.layer)
            self.unref(v.buf)
        self.cache = []

    def release(self, bufs: list[Buf]) -> None:
        """Let go of `bufs` in order, each among its own layer's requests."""
        for b in bufs:
            self.set_layer(b.layer)
            self.unref(b)

    def chunk(self, x: Var, n: int) -> list[Var]:
        """`x.chunk(n, dim=-1)`: n views of x, no new memory; each view keeps x alive."""
        outs = [Var(self.ref(x.buf), x.size // n, x.grad_bytes // n, x.requires_grad)
                for _ in range(n)]
        if self.grad_mode and x.requires_grad:
            self.nodes.append(ChunkNode(outs, x, self.layer))
        return outs

    def view(self, x: Var, size: int) -> Var:
        """A view of `x` of `size` bytes, no new memory (it keeps x's buffer), whose
        backward makes a new gradient of x's size: a slice (`x[..., :half]`,
        SliceBackward0: zeros with the slice's gradient copied in), or `.view(...)
        .transpose(1, 2)` (the gradient comes back transposed, and ViewBackward0's
        reshape copies it)."""
        out = Var(self.ref(x.buf), size, size, x.requires_grad)
        if self.grad_mode and x.requires_grad:
            self.nodes.append(Node(out, [x], [], (), False, False, self.layer))
        return out

    def cat(self, size: int, inputs: list[Var]) -> Var:
        """torch.cat of `inputs` into a new tensor of `size` bytes; its backward hands
        each input a view of its gradient (CatBackward0), no new tensor."""
        out = self.op(size, inputs)
        node = self.nodes[-1] if self.nodes else None
        if isinstance(node, Node) and node.out is out:
            node.views = True
        return out

    def leaf(self, size: int, requires_grad: bool, param: bool = False) -> Var:
        return Var(None, size, size, requires_grad, param=param)

    # -- backward ---------------------------------------------------------------------
    def _grad_into(self, v: Var, given: Buf | None = None, passed: bool = False) -> None:
        """A gradient for `v` arrives: a new tensor, or (`passed`) the tensor `given`
        handed on by an add or a clone. The first is kept; a later one is added into it in
        place (torch/csrc/autograd/input_buffer.cpp `accumulate`: into the buffer's tensor
        where the buffer holds its last reference, else into the incoming one where that is
        new), else the sum is a new tensor that replaces both: where both are shared, and
        where `sum_out_of_place` (tied 16-bit embeddings: the embedding's gradient meets the
        lm_head's, a transposed mm output the buffer cannot add into). Under autocast the
        lm_head's fp32 gradient is a fresh contiguous cast (ToCopyBackward), which the
        embedding's is added into in place."""
        if not v.has_grad:
            if passed:
                if given is not None:
                    given.refs += 1
                v.grad = given
            else:
                v.grad = self.alloc(v.grad_bytes)
            v.has_grad = True
            return
        self._add_into(v, self.ref(given) if passed else self.alloc(v.grad_bytes), passed)

    def _add_into(self, v: Var, incoming: Buf | None, passed: bool) -> None:
        """Add `incoming` (new, or handed on as it is where `passed`) into the gradient
        `v` already has (`_grad_into`)."""
        old_shared = v.grad is not None and v.grad.refs > 1
        new_shared = passed and incoming is not None and incoming.refs > 1
        if v.sum_out_of_place or (old_shared and new_shared):
            total = self.alloc(v.grad_bytes)
            self.unref(v.grad)
            v.grad = total
        elif old_shared:  # var.add_(old_var): the incoming tensor becomes the buffer's
            self.unref(v.grad)
            v.grad, incoming = incoming, None
        self.unref(incoming)

    def _run_chunk(self, n: ChunkNode) -> None:
        if any(v.has_grad for v in n.outs):
            self._grad_into(n.inp)
        for v in n.outs:
            self.unref(v.grad)
            v.grad, v.has_grad = None, False

    def _run(self, n: Node) -> None:
        if n.grads is not None:
            if n.out.has_grad:
                for v, b in zip(n.inputs, n.grads, strict=True):
                    self._grad_into(v, b, passed=True)
            for b in n.grads:
                self.unref(b)
            n.grads = None
            self.unref(n.out.grad)
            n.out.grad, n.out.has_grad = None, False
            for b in n.saved:
                self.unref(b)
            return
        out = n.out
        if not out.has_grad:
            self._release(n.saved)
            if n.offloaded:
                self.host -= sum(n.offloaded)
            return
        # the offloaded saved tensors come back first (OffloadActivations' unpack)
        # (map, not a comprehension: CPython 3.11 calls a comprehension as a function)
        back = list(map(self.alloc, n.offloaded)) if n.offloaded else ()
        if n.offloaded:
            self.host -= sum(n.offloaded)
        # the node's temporaries live while it computes its input gradients
        first = self.alloc(n.bwd_first) if n.bwd_first else None
        held = list(map(self.alloc, n.bwd_temps)) if n.bwd_temps else ()
        if first is not None:
            self.unref(first)
        grad = out.grad
        passthrough = n.passthrough
        # gradients for inputs that have one already: added into it once the node is done
        # (torch/csrc/autograd/engine.cpp evaluate_function: call_function runs the node,
        # casts its outputs (validate_outputs) and lets go of its incoming gradient; then
        # release_variables frees what it saved; only then does InputBuffer::add add each
        # output into the next node's buffer). Recorded, run 34 tr-k022-gemma-2-2b: the
        # fp32 gradient of a QLoRA projection's input (ToCopyBackward of its cast to the
        # compute dtype) is made, the incoming compute-dtype one freed, then it is added
        # into the input's gradient and freed: `+72 -36 -72` MiB at each down projection.
        later: list[tuple[Var, Buf | None, bool]] = []
        views = n.views
        for i, v in enumerate(n.inputs):
            # an add hands its gradient on as it is (AddBackward0, CloneBackward0); the
            # engine casts it where the input's dtype differs (validate_outputs)
            passed = (passthrough and v.grad_bytes == out.grad_bytes) or views
            if v.has_grad:
                later.append((v, self.ref(grad) if passed else self.alloc(v.grad_bytes),
                              passed))
            elif passed:  # its first gradient (_grad_into, inline: the most frequent case)
                if grad is not None:
                    grad.refs += 1
                v.grad, v.has_grad = grad, True
            else:
                v.grad, v.has_grad = self.alloc(v.grad_bytes), True
            if i == 0 and n.mm and self.in_backward not in self._workspaces:
                self.workspace()
        if held:
            self._release(held)
        if grad is not None:  # unref(grad), inline
            grad.refs -= 1
            if grad.refs == 0 and grad.id not in self.gone:
                self.requests.append((grad.id, 0))
        out.grad, out.has_grad = None, False
        self._release(n.saved)
        for v, incoming, passed in later:
            self._add_into(v, incoming, passed)
        if back:
            self._release(back)

    def backward(self, loss: Var, keep_graph: bool = False) -> list[Buf]:
        """Backward from a scalar loss (on autograd's device thread). What the graph's
        nodes hold as ctx attributes (`graph_held`) and the gradients of its leaves go when
        the graph is freed: at the end of backward, or, when the loop still holds a loss or
        an output whose grad_fn reaches the graph (`keep_graph`), when that goes; those
        buffers are returned."""
        self.in_backward = True
        self.release_stash()
        loss.grad, loss.has_grad = self.alloc(loss.grad_bytes), True
        nodes, self.nodes = self.nodes, []
        self._backward(nodes)
        self.set_layer(-1)
        self.in_backward = False
        kept = self.graph_held if keep_graph else []
        if not keep_graph:
            self.release(self.graph_held)
            self.set_layer(-1)
        self.graph_held = []
        for v in self.leaves:
            if keep_graph:  # the leaf's AccumulateGrad node keeps its `.grad` too
                kept += [v.grad] if v.grad is not None else []
            else:
                self.unref(v.grad)
            v.grad, v.has_grad = None, False
        self.leaves = []
        return kept

    def _backward(self, nodes: list[Node | ChunkNode | CheckpointNode]) -> None:
        run = self._run
        for n in reversed(nodes):
            if n.layer != self.layer:
                self.set_layer(n.layer)
            kind = type(n)  # (the classes are final: a type test, most often Node)
            if kind is Node:
                run(n)  # type: ignore[arg-type]
            elif kind is CheckpointNode:
                self._recompute(n)  # type: ignore[arg-type]
            else:
                self._run_chunk(n)  # type: ignore[arg-type]

    def _recompute(self, c: CheckpointNode) -> None:
        """The layer's backward under non-reentrant checkpointing (torch/utils/checkpoint.py,
        early stop on by default): the recompute stops (_StopRecomputationError) as soon as
        the last saved tensor is packed again, so the ops after it are not rerun, and what
        the interrupted forward held is freed as the exception unwinds it (innermost first;
        recorded in run 14: the recompute ends at the last LoRA's lora_A). The layer's
        trailing nodes that keep nothing (residual and LoRA sums) run before the recompute
        there; here they run after it, which moves no request: they hand their gradient
        on without a copy (Node.passthrough)."""
        outer = self.nodes
        self.nodes = []
        if c.offloaded:
            # the offloaded input comes back: into Unsloth's one GPU buffer, kept for good
            # (unsloth_zoo UnslothCheckpointFunction.backward: `buffer.copy_(x)`), or as a
            # new tensor (OffloadActivations' unpack), freed after the layer's backward
            self.host -= c.inp.size
            if self.offload == "checkpoints":
                c.inp.buf = self.offload_buffer
            else:
                c.inp.buf = self.alloc(c.inp.size)
        inp = Var(c.inp.buf, c.inp.size, c.inp.grad_bytes, c.inp.requires_grad)
        self.recomputing = True
        start = len(self.requests)
        out = c.fn(self, inp)
        self.recomputing = False
        self.clear_cache()
        inner, self.nodes = self.nodes, outer
        assert self.runs[-1][1] <= start  # the rewrite below keeps the runs' starts
        rerun = self.requests[start:]
        saved = {b.id for n in inner if isinstance(n, Node) for b in n.saved}
        last = len(rerun) - 1  # the last request that packs a saved tensor, else the end
        for k in range(len(rerun) - 1, -1, -1):
            bid, size = rerun[k]
            if size and bid in saved:
                last = k
                break
        kept = rerun[:last + 1]
        live: dict[int, None] = {}
        for bid, size in kept:
            if size:
                live[bid] = None
            else:
                live.pop(bid, None)
        # (a cuBLAS workspace made by the recompute is the thread's, kept)
        unwound = [bid for bid in reversed(live)
                   if bid not in saved and bid not in self.for_good
                   and (inp.buf is None or bid != inp.buf.id)]
        # buffers the stopped forward never made, or let go as it unwound: no later free
        self.gone.update(bid for bid, size in rerun[last + 1:] if size)
        self.gone.update(unwound)
        self.requests[start:] = kept + [(bid, 0) for bid in unwound]
        out.grad, out.has_grad = c.out.grad, c.out.has_grad
        c.out.grad, c.out.has_grad = None, False
        self.drop(out)
        self._backward(inner)
        c.inp.grad, c.inp.has_grad = inp.grad, inp.has_grad
        if c.offloaded and self.offload == "checkpoints":
            return  # the GPU buffer stays
        self.unref(c.inp.buf)  # the checkpoint's saved input

    def checkpoint(self, layer: Callable[[Graph, Var], Var], x: Var) -> Var:
        self.grad_mode = False
        out = layer(self, x)
        self.grad_mode = True
        out.requires_grad = True
        index, self.checkpoints = self.checkpoints, self.checkpoints + 1
        offloaded = False
        if self.offload == "all" and x.buf is not None and x.buf not in self.stash:
            offloaded = True
            self._offload(x.buf)
        elif self.offload == "checkpoints" and x.requires_grad and index != self.last_checkpoint:
            # unsloth_zoo gradient_checkpointing.py UnslothCheckpointFunction.forward: each
            # checkpointed layer's hidden_states is copied into a pinned host buffer of its
            # own (CPU_BUFFERS, kept for good), and brought back in backward into one GPU
            # buffer (GPU_BUFFERS, grown to the largest input, kept); the last layer's input
            # stays on the GPU (LAST_GC_INDEX); inputs under 1 Mi elements stay too
            # (MINIMUM_SIZE, not modelled)
            offloaded = True
            self.host += x.size
            self.host_peak = max(self.host_peak, self.host)
            if self.offload_buffer is None and x.buf is not None:
                self.offload_buffer = self.alloc(x.size)
                if self.offload_buffer is not None:
                    self.for_good.add(self.offload_buffer.id)
        else:
            self.ref(x.buf)
        self.nodes.append(CheckpointNode(out, x, layer, self.layer, offloaded))
        return out


# ---- the model's programs -------------------------------------------------------------


class _Shapes(Frozen):
    _fields = ("tokens", "c", "act", "targets", "rank", "dropout", "method", "autocast_weights",
               "autocast", "expert_bytes", "expert_fold", "int8", "outlier_fraction",
               "kv_cache", "fp32_norm_scale", "liger", "liger_norm_in_place", "adapter",
               "nested_absmax")
    tokens: int
    c: int  # compute dtype bytes
    act: int  # residual stream bytes
    targets: frozenset[str]
    rank: int
    dropout: bool
    method: str
    autocast_weights: bool  # 16-bit full fine-tuning with fp32 master weights
    autocast: bool
    expert_bytes: int  # the fused experts' dtype (activations.expert_dtype_bytes)
    expert_fold: bool  # LoRA on the expert stacks (peft ParamWrapper)
    int8: bool  # bnb Linear8bitLt bases (qlora with quant int8)
    # the share of the down projection input's columns int8 keeps as subA (every token)
    outlier_fraction: float
    kv_cache: bool  # the forward fills a DynamicCache (TrainPlan.kv_cache)
    fp32_norm_scale: bool  # ModelSpec.norm_scales_in_fp32
    # liger-kernel's RMSNorm, SwiGLU / GEGLU and RoPE replace the modeling code's
    # (TrainPlan.loss_kernel "liger"); its RMSNorm writes dX into dY except for the Gemma
    # families (monkey_patch.py apply_liger_kernel_to_gemma2: in_place=False)
    liger: bool
    liger_norm_in_place: bool
    adapter: int  # the LoRA adapters' bytes per element (TrainPlan.adapter_dtype)
    # 4-bit bases double-quantized (TrainPlan.double_quant): their fp32 absmax is
    # dequantized before each weight (`_linear`)
    nested_absmax: bool

    def __init__(self, tokens: int, c: int, act: int, targets: frozenset[str], rank: int,
                 dropout: bool, method: str, autocast_weights: bool, autocast: bool,
                 expert_bytes: int, expert_fold: bool, int8: bool = False,
                 outlier_fraction: float = 1.0, kv_cache: bool = False,
                 fp32_norm_scale: bool = False, liger: bool = False,
                 liger_norm_in_place: bool = True, adapter: int = 4,
                 nested_absmax: bool = False) -> None:
        self.__dict__.update(
            tokens=tokens, c=c, act=act, targets=targets, rank=rank, dropout=dropout,
            method=method, autocast_weights=autocast_weights, autocast=autocast,
            expert_bytes=expert_bytes, expert_fold=expert_fold, int8=int8,
            outlier_fraction=outlier_fraction, kv_cache=kv_cache,
            fp32_norm_scale=fp32_norm_scale, liger=liger,
            liger_norm_in_place=liger_norm_in_place, adapter=adapter,
            nested_absmax=nested_absmax)




def _int8_matmul(g: Graph, x: Var, t: int, i: int, o: int, in_bytes: int,
                 outliers: float, c: int) -> Var:
    """bitsandbytes 0.50.2 MatMul8bitLt on a frozen int8 weight (autograd/_functions.py):
    the weight needs no gradient, so the forward takes int8_vectorwise_quant (no CAt):
    A.to(float16), the int8 rows CA, `A.abs() >= threshold` and its bool, then
    int8_scaled_mm: the int32 product, its fp16 dequant (`int8_mm_dequant`) and the cast
    to A's dtype, the output (backends/cuda/ops.py). It keeps `ctx.tensors = (CAt, subA,
    A)` as ctx attributes, which stay until the graph is freed after backward (also under
    checkpointing; a recomputed layer's go with its backward), subA = A[:, outlier_cols]
    (backends/default/ops.py int8_mixed_scaled_mm), `outliers` of the columns
    (activations.int8_outlier_fraction).
    Backward: `state.CB.to(A.dtype, copy=True)`, the dequantized weight in A's dtype,
    then grad_A. Recorded order: H200 run 17 traces t17-y012, t17-w029."""
    a16 = g.alloc(t * i * 2)
    ca = g.alloc(t * i)
    absa = g.alloc(t * i * 2)  # A.abs()
    over = g.alloc(t * i)  # its >= threshold bool
    g.unref(absa)
    g.unref(over)
    g.unref(a16)
    cols = int(outliers * i)
    sub = Var(g.alloc(t * cols * in_bytes) if cols else None, 0, 0, False)
    # subB: the weight's outlier columns dequantized, `int8_vectorwise_dequant(
    # CB[:, outlier_cols].contiguous(), SCB)` (int8 o x n, then `A * stats * scale`: two
    # fp32 products) and `.to(A.dtype)` (H200 run 23 trace t23-j002: +o n, +4 o n, +4 o n)
    subb = None
    if cols:
        cb_cols = g.alloc(o * cols)
        first = g.alloc(o * cols * 4)
        subb = g.alloc(o * cols * 4)
        g.unref(first)
        g.unref(cb_cols)
        if in_bytes != 4:
            cast = g.alloc(o * cols * in_bytes)
            g.unref(subb)
            subb = cast
    prod32 = g.alloc(t * o * 4)
    f16 = g.alloc(t * o * 2)
    # a recomputed layer's ctx tensors go with its nodes; the first forward's stay
    kept = (x, sub) if g.recomputing else ()
    if not cols:
        y = g.op(t * o * in_bytes, [x], save=kept, bwd_temps=(o * i * in_bytes,))
        g.unref(f16)
        g.unref(prod32)
    else:
        # `output.addmm(subA, subB)` inside the Function's forward: addmm is on autocast's
        # lower-precision list, so subB, subA and the A-dtype output are cast to the
        # compute dtype and the Function's output comes out in it (t23-j002: +2 o n,
        # +2 t n, +2 t o, +2 t o; then the copies, the A-dtype output and subB go)
        y_a = g.alloc(t * o * in_bytes)
        g.unref(f16)
        g.unref(prod32)
        sizes = (o * cols * c, t * cols * c, t * o * c) if in_bytes != c else ()
        copies = [g.alloc(size) for size in sizes]
        y = g.op(t * o * c, [x], save=kept, bwd_temps=(o * i * in_bytes,))
        for b in reversed(copies):
            g.unref(b)
        g.unref(y_a)
        g.unref(subb)
    g.unref(ca)
    if x.requires_grad and not g.recomputing:
        g.graph_held.extend(b for b in (g.ref(x.buf), g.ref(sub.buf)) if b is not None)
    g.drop(sub)
    return y


def _linear(g: Graph, s: _Shapes, x: Var, lin: LinearShape, rows: int | None = None,
            weights: dict[str, Var] | None = None) -> Var:
    t = s.tokens if rows is None else rows
    i, o = lin.in_features, lin.out_features
    in_bytes = x.size // max(t * i, 1)
    if s.int8:
        y = _int8_matmul(g, x, t, i, o, in_bytes,
                         s.outlier_fraction if lin.role in OUTLIER_ROLES else 0.0, s.c)
    elif s.method == "qlora":
        # bnb Linear4bit: x to the compute dtype, the weight dequantized for the matmul,
        # the output cast back to the input's dtype (nn/modules.py forward)
        x16 = g.op(t * i * s.c, [x]) if in_bytes != s.c else x
        # bitsandbytes 0.50.2 MatMul4Bit.forward -> gemm_4bit: past the rows where its
        # fused kernel wins (weights.gemm_4bit_dequantizes) _dequant_linear_fallback
        # (backends/cuda/ops.py) dequantizes the double-quantized fp32 absmax
        # (`absmax_dq`) and offsets it (`absmax_dq + absmax_offset`, a second one), then
        # the weight (`B_dq`), then F.linear; the three freed, absmax last made first, when
        # it returns (recorded, run 36 tr-p009-gemma-2-9b-2L events 2610-2619: `+3.06
        # +3.06 +98 +56 -3.06 -3.06 -98` MiB at each MLP projection, as program.infer)
        absmax = 4 * ceil_div(i * o, NF4_BLOCKSIZE) if s.nested_absmax else 0
        dequantizes = gemm_4bit_dequantizes(t, o, i)
        tmp = [g.alloc(absmax), g.alloc(absmax)] if absmax and dequantizes else []
        deq = g.alloc(o * i * s.c) if dequantizes else None
        # backward dequantizes the weight again for grad_input (bitsandbytes
        # autograd/_functions.py MatMul4Bit.backward, F.dequantize_4bit): the nested
        # absmax first, freed once the weight is made (events 3590-3596: `+3.06 +98 -3.06
        # +56 -98` MiB)
        y = g.op(t * o * s.c, [x16], bwd_temps=(o * i * s.c,), mm=True, bwd_first=absmax)
        for held in reversed(tmp):
            g.unref(held)
        g.unref(deq)
        if in_bytes != s.c:
            y2 = g.op(t * o * in_bytes, [y])
            g.drop(y)
            y = y2
        if x16 is not x:
            g.drop(x16)
    elif s.method == "full":
        w = (weights or {}).get(lin.name) or g.leaf(o * i * s.c, True, param=True)
        if s.autocast_weights:
            wc = g.cast_cached(w, o * i * s.c)
            xc = g.op(t * i * s.c, [x]) if in_bytes != s.c else x
            y = g.op(t * o * s.c, [wc, xc], save=(xc, wc), mm=True)
            if xc is not x:
                g.drop(xc)
        else:
            y = g.op(t * o * s.c, [w, x], save=(x,), mm=True)
    else:
        y = g.op(t * o * s.c, [x], mm=True)
    if lin.name not in s.targets:
        return y
    # peft LoRA: result.clone() under bnb, x cast to the fp32 adapters, dropout, a
    # compute-dtype copy for lora_A (autocast), lora_B, scaling, sum
    if s.method == "qlora" and not s.int8:
        y2 = g.op(y.size, [y], passthrough=True)
        g.drop(y)
        y = y2
    # peft tuners/lora/bnb.py Linear4bit/Linear8bitLt.forward cast x to the adapters' fp32
    # only where autocast is off (`requires_conversion = not torch.is_autocast_enabled()`),
    # and every LoRA / QLoRA step here runs under autocast (TrainPlan.autocast): x goes to
    # the dropout in its own dtype, lora_A's autocast copy only when that is not the
    # compute dtype, and `result + output` promotes to the result's dtype (run 14 y028,
    # t17-y012). peft 0.21 Linear8bitLt makes no result.clone(). tuners/lora/layer.py
    # Linear.forward (16-bit bases) casts x always (_cast_input_dtype).
    xb = in_bytes if s.method == "qlora" else s.adapter
    xv = g.op(t * i * xb, [x]) if xb != in_bytes else x
    if s.dropout:
        mask = g.op(t * i, [])
        xd = g.op(t * i * xb, [xv], save=(mask,))
        g.drop(mask)
    else:
        xd = xv
    a_w = (weights or {}).get(lin.name + ".A") or g.leaf(i * s.rank * s.adapter, True,
                                                         param=True)
    # autocast's copy for lora_A (none where x already is in the compute dtype)
    xa = g.op(t * i * s.c, [xd]) if xb != s.c else xd
    if s.int8:
        if xd is not x and xd is not xa:
            g.drop(xd)
        if xv is not x and xv is not xd:
            g.drop(xv)
        a = g.op(t * s.rank * s.c, [a_w, xa], save=(xa,), mm=True)
        if xa is not x:
            g.drop(xa)
    else:
        a = g.op(t * s.rank * s.c, [a_w, xa], save=(xa,), mm=True)
        # the cast inside F.linear goes first, then the dropout output, an argument of
        # lora_A(...) (recorded: autocast copy, then dropout output freed, no grad)
        if xa is not xd:
            g.drop(xa)
        if xd is not x and xd is not xv:
            g.drop(xd)
        if xv is not x:
            g.drop(xv)
    b_w = (weights or {}).get(lin.name + ".B") or g.leaf(s.rank * o * s.adapter, True,
                                                         param=True)
    b = g.op(t * o * s.c, [b_w, a], save=(a,), mm=True)
    g.drop(a)
    sc = g.op(t * o * s.c, [b])
    g.drop(b)
    # `result + output`: type promotion makes the sum in the result's dtype (fp32 under
    # QLoRA) without a cast of `output` first; its gradient is cast back to the compute
    # dtype by the engine (recorded: one fp32 request at peft tuners/lora/bnb.py:552)
    out = g.op(y.size, [y, sc], passthrough=True)
    g.drop(y, sc)
    return out


def _norm(g: Graph, s: _Shapes, x: Var, width: int, rows: int | None = None) -> Var:
    """RMSNorm in fp32 (modeling_llama LlamaRMSNorm: x.float(), pow, mean, x * rsqrt,
    weight * x.to(dtype)): keeps the fp32 input; the cast back is kept only where the
    norm's weight trains (full fine-tuning). Out in the input's dtype (fp32 under QLoRA,
    whose norms prepare_model_for_kbit_training made fp32)."""
    t = s.tokens if rows is None else rows
    n = t * width
    in_bytes = x.size // max(n, 1)
    if s.liger:
        return _liger_norm(g, s, x, t, width, in_bytes)
    xf = g.op(n * 4, [x]) if in_bytes != 4 else x
    g.temp(n * 4)  # pow, reduced by mean to the per-row inverse rms
    # rsqrt(pow(2).mean(-1) + eps): its backward (mean's expand / n, pow's self.pow(1) and
    # * 2, then grad * that, added into xf's gradient) makes input-sized fp32 tensors
    # (recorded, run 14: four at the final norm, the sum among them)
    r = g.op(t * 4, [xf], save=(xf,), bwd_temps=(n * 4, n * 4, n * 4))
    # xf * r: grad * r for xf (xf's first gradient) and grad * xf, summed to r's shape
    y = g.op(n * 4, [xf, r], save=(xf,), bwd_temps=(n * 4,))
    g.drop(r)
    trains = s.method == "full"
    if in_bytes != 4 and s.fp32_norm_scale:
        # (normed * weight) in fp32, then the cast: the product keeps the fp32 normalized
        # tensor where the weight trains (models.spec.FP32_SCALED_NORM_FAMILIES; recorded, run 28
        # trace g031-gemma-2-2b: one more input-sized fp32 tensor per norm and step)
        # Its backward, where the weight trains, makes the weight's `grad * normed` (fp32,
        # input-sized, before its sum over tokens) and, while it lives, one transient of
        # twice that (recorded, run 28 g031: `+9 +9 +18 -18 -9` MiB in each norm's backward;
        # which kernel asks for the second is not identified)
        z = g.op(n * 4, [y], save=(y,) if trains else (),
                 bwd_temps=(n * 4, 2 * n * 4) if trains else ())
        g.drop(y)
        out = g.op(n * in_bytes, [z])
        g.drop(z)
    elif in_bytes != 4:
        yc = g.op(n * in_bytes, [y])
        g.drop(y)
        out = g.op(n * in_bytes, [yc], save=(yc,) if trains else ())
        g.drop(yc)
    else:
        out = g.op(n * 4, [y], save=(y,) if trains else ())
        g.drop(y)
    if xf is not x:
        g.drop(xf)
    return out


# torch.cuda.get_device_properties(...).multi_processor_count of the H100 / H200 (SXM): the
# rows of liger's RMSNorm backward partial weight gradients
SM_COUNT = 132


def _liger_norm(g: Graph, s: _Shapes, x: Var, t: int, width: int, in_bytes: int) -> Var:
    """liger-kernel 0.8.5 LigerRMSNormFunction (ops/rms_norm.py rms_norm_forward): Y in the
    input's dtype and the fp32 per-row RSTD; keeps X and RSTD. Backward (rms_norm_backward):
    the fp32 partial weight gradients `_dW` (sm_count x width) where the weight trains, and
    dX written into dY (`in_place=True`; the Gemma patches pass False:
    `torch.zeros_like(dY)`)."""
    rstd = g.alloc(t * 4)
    inplace = s.liger_norm_in_place
    temps = (SM_COUNT * width * 4,) if s.method == "full" else ()
    out = g.op(t * width * in_bytes, [x], save=(x,), bwd_temps=temps, passthrough=inplace)
    if out.requires_grad and g.grad_mode and rstd is not None:
        node = g.nodes[-1]
        assert isinstance(node, Node)
        node.saved.append(rstd)
    else:
        g.unref(rstd)
    return out


def _softcap(g: Graph, x: Var) -> Var:
    """Gemma-2's soft capping, cap * tanh(x / cap): tanh keeps its output for backward
    (modeling_gemma2: attention scores and final logits)."""
    d = g.op(x.size, [x])
    g.drop(x)
    th = g.op(x.size, [d], save_out=True)
    g.drop(d)
    out = g.op(x.size, [th])
    g.drop(th)
    return out


def _rope_tables(g: Graph, spec: ModelSpec, plan: TrainPlan, s: _Shapes) -> tuple[Var, Var]:
    """cos and sin of the model's rotary embedding, once per forward, before the first layer
    (transformers 5.17 modeling_gemma2 Gemma2RotaryEmbedding.forward, the same in
    modeling_llama and its copies): `inv_freq_expanded @ position_ids_expanded` in fp32 --
    the forward's first cuBLAS matmul, so the main thread's workspace is made there --
    `emb = torch.cat((freqs, freqs))`, `emb.cos() * self.attention_scaling` and the same
    for sin (each a new tensor), `.to(dtype=x.dtype)` (the embeddings' dtype); the fp32
    tensors are freed when it returns (recorded, run 36 tr-p009-gemma-2-9b-2L events
    609-625, fp32 embeddings: `+1 +32 +2 +2 +2 -2 +2 +2 -2 -1 -2` MiB at
    modeling_gemma2.py:131-134). Without position_ids the model makes
    `arange(S).unsqueeze(0)`: one row, broadcast over the batch; packed and padding-free
    rows pass theirs (program.infer._rope: generate() passes a row per sequence)."""
    rows, seq = plan.rows
    pos = seq * (1 if plan.layout == "padded" else rows)
    d = spec.head_size
    freqs = g.alloc(pos * (d // 2) * 4)
    g.workspace()
    emb = g.alloc(pos * d * 4)
    fp32: list[Buf | None] = []
    for _ in range(2):  # cos, sin
        raw = g.alloc(pos * d * 4)
        fp32.append(g.alloc(pos * d * 4))  # * attention_scaling
        g.unref(raw)
    size = pos * d * s.act
    if s.act == 4:
        tables = fp32
    else:
        tables = [g.alloc(size) for _ in range(2)]
    for b in (freqs, emb, *(fp32 if tables is not fp32 else ())):
        g.unref(b)
    return Var(tables[0], size, size, False), Var(tables[1], size, size, False)


def _eager_mask(g: Graph, plan: TrainPlan, s: _Shapes, sliding: bool) -> Buf | None:
    """One additive attention mask of an eager forward (transformers 5.17 masking_utils
    eager_mask -> sdpa_mask, non-vmap path, no 2-D attention_mask): the mask function on
    broadcast indices, a (S x S) bool per function, each `&`-ed into a running result
    (and_masks: `result = result & mask(...)`, the function's output freed, then the
    previous result); `torch.where(mask, 0, min)` makes it additive in the embeddings'
    dtype over the batch (`.expand(batch_size, ...)` is a view), the bool freed. The
    causal mask is causal_mask_function, the sliding one and_masks(sliding_window_overlay,
    causal); packed and padding-free rows add and_masks(..., packed_sequence_mask_function)
    (a (B, 1, S, S) equality). Recorded, run 36 tr-p009-gemma-2-9b-2L (fp32 embeddings,
    1 x 2048): `+4 +16 -4` MiB at modeling_gemma2.py:439, `+4 +4 -4 +4 +4 -4 -4 +16 -4` at
    :440 (events 520-607)."""
    rows, seq = plan.rows
    base = seq * seq
    if sliding:
        overlay = g.alloc(base)
        r1 = g.alloc(base)
        g.unref(overlay)
        causal = g.alloc(base)
        result = g.alloc(base)
        g.unref(causal)
        g.unref(r1)
    else:
        result = g.alloc(base)
    if plan.layout != "padded":
        r0 = g.alloc(base)  # the outer and_masks: ones() & the causal part
        g.unref(result)
        eq = g.alloc(rows * base)
        result = g.alloc(rows * base)
        g.unref(eq)
        g.unref(r0)
    additive = g.alloc(rows * base * s.act)
    g.unref(result)
    return additive


def _rotary(g: Graph, q: Var, liger: bool = False) -> Var:
    if liger:
        # liger-kernel 0.8.5 LigerRopeFunction (ops/rope.py): rotates q and k in place
        # (the projections' outputs are contiguous in the kernel's layout) and keeps only
        # cos and sin; backward rotates dq, dk in place
        return g.in_place(q)
    # transformers apply_rotary_pos_emb: `(q * cos) + (rotate_half(q) * sin)`, rotate_half
    # `torch.cat((-x2, x1), dim=-1)` of the halves x1, x2 (slices, views of q). Backward
    # (recorded, run 34 tr-k022-gemma-2-2b, per key: `+8 +4 +8 -4 +8 -8 -8` MiB): the
    # gradient of the cat's output is handed to -x2 and x1 as views; -x2's backward makes a
    # half-sized one, and each slice's (SliceBackward0) a new q-sized one, the second added
    # into the first.
    # `q * cos` saves cos for q's gradient, `rotate_half(q) * sin` saves sin (MulBackward0
    # keeps the other factor): the rotary tables live until the first layer's rotary
    # backward (recorded, run 36 tr-p009-gemma-2-9b-2L: cos and sin, 2 MiB each, freed at
    # events 2062 and 2048, in layer 0's backward)
    cos, sin = g.rope if g.rope is not None and g.offload != "all" else (None, None)
    n = q.size
    a = g.op(n, [q], save=(cos,) if cos is not None else ())
    x1, x2 = g.view(q, n // 2), g.view(q, n // 2)
    neg = g.op(n // 2, [x2])
    cat = g.cat(n, [neg, x1])
    g.drop(neg, x1, x2)
    b = g.op(n, [cat], save=(sin,) if sin is not None else ())
    g.drop(cat)
    out = g.op(n, [a, b], passthrough=True)
    g.drop(a, b)
    return out


def _attention(g: Graph, spec: ModelSpec, plan: TrainPlan, s: _Shapes, q: Var, k: Var,
               v: Var, window: bool = False) -> tuple[Var, Var | None]:
    """The attention output, and eager attention's probabilities (`attn_weights`, which
    the attention module returns and the decoder layer holds as `_` until it returns)."""
    t = s.tokens
    probs: Var | None = None
    qb = q.size // max(t * spec.q_size, 1)
    if plan.attn == "eager":
        # transformers eager_attention_forward under autocast: q @ k^T in the compute
        # dtype (fp32 q and k cast first), + mask, softmax(dtype=float32) (an fp32 copy of
        # its input, then its output, kept), .to(q.dtype), dropout, probabilities @ v
        b, seq = plan.rows  # padding-free: one row of the step's tokens
        scores = b * spec.num_attention_heads * seq * seq
        rep = spec.num_attention_heads != spec.kv_heads
        kr = g.op(t * spec.q_size * qb, [k]) if rep else k  # repeat_kv
        vr = g.op(t * spec.q_size * qb, [v]) if rep else v
        qm, km = q, kr
        kt = None
        if qb != s.c:
            # autocast casts q and `key_states.transpose(2, 3)`; three compute-dtype
            # key-sized requests at the matmul, the second freed once the product is made,
            # the first and the third kept for backward (recorded, run 34
            # tr-k022-gemma-2-2b: `+8 +8 +8 +32 -8` MiB at eager_attention_forward's
            # matmul, transformers 5.17; which kernel asks for the third is not identified)
            qm = g.op(t * spec.q_size * s.c, [q])
            kt = g.alloc(t * spec.q_size * s.c)
            km = g.op(t * spec.q_size * s.c, [kr])
        mm = g.op(scores * s.c, [qm, km], save=(qm, km), mm=True)
        g.unref(kt)
        if qm is not q:
            g.drop(qm, km)
        sc = g.op(scores * s.c, [mm])  # matmul(q, k^T) * scaling: a new tensor
        g.drop(mm)
        if spec.attn_logit_softcapping:
            sc = _softcap(g, sc)
        # + the causal mask, made in the embeddings' dtype: fp32 under QLoRA (its embeddings
        # are fp32 after prepare_model_for_kbit_training), so the sum is fp32 there
        masked = g.op(scores * max(s.c, s.act), [sc])
        g.drop(sc)
        up = g.op(scores * 4, [masked]) if s.act != 4 else masked  # softmax's fp32 copy
        # softmax backward: grad * output, a score-sized fp32 temporary (run 12 traces:
        # four fp32 score blocks live at eager attention's backward peak)
        p32 = g.op(scores * 4, [up], save_out=True, bwd_temps=(scores * 4,))
        if up is not masked:
            g.drop(up)
        p = g.op(scores * qb, [p32]) if qb != 4 else p32
        if p is not p32:
            g.drop(p32)  # softmax's output: a temporary of `.to(q.dtype)` (unless saved)
        g.drop(masked)  # `attn_weights` is rebound after softmax(...).to(...)
        if spec.attention_dropout > 0:
            mask = g.op(scores, [])
            pd = g.op(scores * qb, [p], save=(mask,))
            g.drop(mask)
            g.drop(p)
            p = pd
        pm, vm = p, vr
        if qb != s.c:
            vm, pm = g.op(t * spec.q_size * s.c, [vr]), g.op(scores * s.c, [p])
        # backward makes the values' gradient before the probabilities' and lets the
        # values go first (recorded, run 34 tr-k022-gemma-2-2b: `+8 +32`, then `-8 -32` MiB
        # of the saved casts)
        o = g.op(t * spec.q_size * s.c, [vm, pm], save=(vm, pm), mm=True)
        for tmp in {id(x): x for x in (pm, vm)}.values():
            if tmp is not vr and tmp is not p:
                g.drop(tmp)
        probs = p
        # `transpose(1, 2).contiguous()`; the repeated keys and values are locals of
        # eager_attention_forward, freed when it returns, after it (recorded, run 34
        # tr-k022-gemma-2-2b: `+8 -8 -16 -16` MiB)
        out = g.op(o.size, [o])
        g.drop(o)
        if rep:
            g.drop(kr, vr)
        return out, probs
    else:
        # scaled_dot_product_attention is on autocast's lower-precision list: fp32 q, k, v
        # (QLoRA: fp32 norms, so fp32 projections and rotary) are cast to the compute dtype
        # first, and the casts are what the kernel saves (recorded, run 14: three
        # compute-dtype copies at transformers integrations/sdpa_attention.py
        # sdpa_attention_forward, an output in the compute dtype). The fused kernels write
        # their output in (batch, seq, heads, dim) order, so the `transpose(1, 2)
        # .contiguous()` after it copies nothing (no request recorded there).
        qc, kc, vc = q, k, v
        if qb != s.c:
            qc = g.op(t * spec.q_size * s.c, [q])
            kc = g.op(k.size // qb * s.c, [k])
            vc = g.op(v.size // qb * s.c, [v])
        # the fused backward's one workspace: fp32 accumulators of dq and the softmax's
        # per-row stats, batch x heads x seq in fp32 (recorded, run 14: t * q_size * 4 * k
        # + that, one request per layer, k = 2 on most points, 1 on the long-sequence
        # QLoRA ones, which is not modeled)
        rows, seq = plan.rows
        stats = rows * spec.num_attention_heads * seq * 4
        # a sliding layer past its window gets the step's bool mask, which aten
        # scaled_dot_product_attention turns into an additive one in the query dtype
        # (`convert_boolean_attn_mask`); the memory-efficient kernel keeps it as attn_bias
        # for backward (activations.window_mask_bytes; H200 run 1 d034)
        bias = (g.op(rows * seq * seq * s.c, [])
                if window else None)
        # ... and with a mask, transformers repeats the grouped keys and values to every
        # head before the call, since the CUDA kernels take GQA only without one
        # (integrations/sdpa_attention.py use_gqa_in_sdpa, sdpa_attention_forward:
        # repeat_kv, a copy; 5.17 and 5.25); the kernel saves the copies (recorded, run 28
        # trace g004-gemma-2-2b: two 16 MiB requests in each sliding layer)
        kr, vr = kc, vc
        if bias is not None and spec.kv_heads != spec.num_attention_heads:
            kr = g.op(t * spec.q_size * s.c, [kc])
            vr = g.op(t * spec.q_size * s.c, [vc])
        # With that mask sdpa runs the memory-efficient kernel, whose backward asks for one
        # fp32 dq-sized workspace instead of two (recorded, run 28 trace g004-gemma-2-2b:
        # 32.1 MiB in each of the 13 sliding layers, 64.1 MiB in the 13 full ones)
        k_ws = 1 if bias is not None else 2
        out = g.op(t * spec.q_size * s.c, [qc, kr, vr],
                   save=(qc, kr, vr) if bias is None else (qc, kr, vr, bias), save_out=True,
                   bwd_temps=(k_ws * t * spec.q_size * 4 + stats,))
        if bias is not None:
            g.drop(bias)
        if kr is not kc:
            g.drop(kr, vr)
        if qc is not q:
            g.drop(qc, kc, vc)
        return out, None


def _mlp(g: Graph, spec: ModelSpec, s: _Shapes, x: Var, lins: dict[str, LinearShape],
         rows: int | None = None, weights: dict[str, Var] | None = None) -> Var:
    if "gate_up" in lins or "gate" in lins:
        if "gate_up" in lins:
            # `gate, up_states = up_states.chunk(2, dim=-1)` (modeling_phi3 Phi3MLP): two
            # views of the fused output; backward joins their gradients (SplitBackward0)
            gu = _linear(g, s, x, lins["gate_up"], rows, weights)
            gate, up = g.chunk(gu, 2)
            keep: list[Var] = [gu]
        else:
            gate = _linear(g, s, x, lins["gate"], rows, weights)
            keep = []
            if s.liger and not spec.is_moe:
                # liger-kernel 0.8.5 LigerSwiGLUMLP / LigerGEGLUMLP: LigerSiLUMulFunction
                # (ops/swiglu.py; GELU alike, ops/geglu.py) keeps a and b and, in backward,
                # writes their gradients into them (`return a, b`): one product, no
                # activation output
                up = _linear(g, s, x, lins["up"], rows, weights)
                prod = g.op(gate.size, [gate, up], save=(gate, up),
                            grads=(g.ref(gate.buf), g.ref(up.buf)))
                g.drop(gate, up)
                out = _linear(g, s, prod, lins["down"], rows, weights)
                g.drop(prod)
                return out
        act = g.op(gate.size, [gate], save=(gate,))
        g.drop(gate)
        if "gate_up" not in lins:
            up = _linear(g, s, x, lins["up"], rows, weights)
        prod = g.op(act.size, [act, up], save=(act, up))
        g.drop(act, up, *keep)
        out = _linear(g, s, prod, lins["down"], rows, weights)
        g.drop(prod)
        return out
    f1 = _linear(g, s, x, lins["fc1"], rows, weights)
    act = g.op(f1.size, [f1], save=(f1,))
    g.drop(f1)
    out = _linear(g, s, act, lins["fc2"], rows, weights)
    g.drop(act)
    return out


def _expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """The fused expert stacks (modeling_mixtral MixtralExperts, qwen3_moe / qwen2_moe
    alike): gate_up_proj (E, 2I, h) and down_proj (E, h, I), as (dim 1, dim 2)."""
    inter = spec.expert_intermediate_size
    h = spec.hidden_size
    return {"gate_up": (2 * inter, h), "down": (h, inter)}


def expert_weights(spec: ModelSpec, plan: TrainPlan) -> dict[str, Var]:
    """One layer's trainable expert tensors: the stacks themselves (full fine-tuning) or
    the ParamWrapper factors of their LoRA (rank 2r on the fused gate_up, r on down:
    trainable.lora_tensor_numels), as (E, dim 1, rank) and (E, rank, dim 2) fp32 leaves."""
    e = spec.num_local_experts
    w: dict[str, Var] = {}
    if not fused_experts(spec, plan):
        return w
    for name, (d1, d2) in _expert_shapes(spec).items():
        if plan.method == "full":
            n = e * d1 * d2 * DTYPE_BYTES[plan.load_dtype]
            w["experts." + name] = Var(None, n, n, True, param=True)
        elif lora_on_experts(spec, plan):
            r = plan.rank * (2 if name == "gate_up" else 1)
            a = DTYPE_BYTES[plan.adapter_dtype]
            w["experts." + name + ".lhs"] = Var(None, 0, e * d1 * r * a, True, param=True)
            w["experts." + name + ".rhs"] = Var(None, 0, e * r * d2 * a, True, param=True)
    return w


def _router(g: Graph, spec: ModelSpec, s: _Shapes, x: Var, trains: bool) -> Var:
    """The top-k router (modeling_mixtral MixtralTopKRouter, Qwen3MoeTopKRouter):
    F.linear under autocast (an fp32 input is cast to the compute dtype, kept for the
    weight's gradient where the router trains: full fine-tuning, or peft's ParamWrapper on
    `gate.weight`), softmax in fp32 (kept), topk. Returns the top-k weights: fp32 for
    Mixtral, cast back to the logits' dtype for Qwen (`router_top_value.to(...)`)."""
    t, h, e, k = s.tokens, spec.hidden_size, spec.num_local_experts, spec.num_experts_per_tok
    in_bytes = x.size // max(t * h, 1)
    xc = g.op(t * h * s.c, [x]) if in_bytes != s.c else x
    logits = g.op(t * e * s.c, [xc], save=(xc,) if trains else ())
    if xc is not x:
        g.drop(xc)
    probs = g.op(t * e * 4, [logits], save_out=True)  # softmax(..., dtype=float32)
    g.drop(logits)
    top = g.op(t * k * 4, [probs])
    g.drop(probs)
    if spec.model_type != "mixtral" and s.c != 4:
        top2 = g.op(t * k * s.c, [top])
        g.drop(top)
        top = top2
    return top


def _fold(g: Graph, spec: ModelSpec, s: _Shapes, name: str, factors: tuple[Var, Var],
          check: bool) -> Var:
    """peft ParamWrapper's expert stack W + scaling * lhs @ rhs (tuners/lora/layer.py
    `_LoraFactorsProxy.forward`: torch.baddbmm in the stack's dtype, with a temporary of
    lhs's size). `register_parametrization` evaluates the parametrization once to check it
    (torch/nn/utils/parametrize.py), a full stack made and freed; the fold used by the
    experts is then cached (`parametrize.cached()`) until the experts' forward returns and
    kept by `_grouped_mm` for backward. H200 traces t17-y013, t17-x014."""
    e = spec.num_local_experts
    d1, d2 = _expert_shapes(spec)[name]
    eb = s.expert_bytes
    lhs, rhs = factors
    r = lhs.grad_bytes // max(e * d1 * 4, 1)
    if check:
        g.temp_pair(e * d1 * d2 * eb, e * d1 * r * eb)
        return lhs
    w = g.op(e * d1 * d2 * eb, [lhs, rhs], save=(lhs, rhs))
    g.temp(e * d1 * r * eb)
    return w


def _experts(g: Graph, spec: ModelSpec, s: _Shapes, x: Var, top: Var,
             weights: dict[str, Var]) -> Var:
    """transformers 5 `grouped_mm_experts_forward` (integrations/moe.py): the routed rows
    gathered by expert (`hidden_states[perm // k]`), `_grouped_mm` with the gate_up stack,
    `masked_fill` (a new tensor), the gate (`act(gate) * up` on chunks of it), `_grouped_mm`
    with the down stack, `masked_fill`, the routing-weight product, the rows put back in
    token order (`weighted_out[inv_perm]`) and summed over top-k (`sum` runs in fp32 under
    autocast: `fp32_set_opt_dtype`), cast back to the input's dtype. `_grouped_mm` is on
    no autocast list: the stacks compute in their own dtype (QLoRA: fp32 after
    prepare_model_for_kbit_training; `input.to(weight.dtype)` first). Tokens per expert are
    not needed: the grouped tensors hold all tokens x top-k rows."""
    t, h, k = s.tokens, spec.hidden_size, spec.num_experts_per_tok
    inter = spec.expert_intermediate_size
    rows = t * k
    eb = s.expert_bytes
    in_bytes = x.size // max(t * h, 1)
    top_bytes = top.size // max(t * k, 1)
    fold = s.expert_fold
    stacks: dict[str, Var] = {}
    factors: dict[str, tuple[Var, Var]] = {}
    casts: list[Var] = []
    for name in ("down", "gate_up"):
        if fold:
            lhs, rhs = weights["experts." + name + ".lhs"], weights["experts." + name + ".rhs"]
            if eb != 4:  # get_delta_factors: lhs.to(param.dtype), rhs.to(param.dtype)
                lhs = g.op(lhs.grad_bytes // 4 * eb, [lhs])
                rhs = g.op(rhs.grad_bytes // 4 * eb, [rhs])
                casts += [lhs, rhs]
            factors[name] = (lhs, rhs)
            _fold(g, spec, s, name, factors[name], check=True)
        else:
            stacks[name] = weights.get("experts." + name) or g.leaf(0, False)
    idx = g.alloc(rows * 8)  # perm // k, kept by the gather for backward
    sel = g.op(rows * h * in_bytes, [x])
    if in_bytes != eb:
        sel2 = g.op(rows * h * eb, [sel])
        g.drop(sel)
        sel = sel2

    def grouped(inp: Var, name: str, out_size: int) -> Var:
        w = _fold(g, spec, s, name, factors[name], check=False) if fold else stacks[name]
        save = tuple(v for v, other in ((inp, w), (w, inp)) if other.requires_grad)
        y = g.op(out_size, [w, inp], save=save)
        if fold:
            g.drop(w)
        return y

    gu = grouped(sel, "gate_up", rows * 2 * inter * eb)
    g.drop(sel)
    m = g.op(gu.size, [gu])  # masked_fill: a new tensor
    g.drop(gu)
    gate, up = g.chunk(m, 2)
    g.drop(m)
    act = g.op(gate.size, [gate], save=(gate,))
    g.drop(gate)
    prod = g.op(act.size, [act, up], save=(act, up))
    g.drop(act, up)
    dn = grouped(prod, "down", rows * h * eb)
    g.drop(prod)
    m2 = g.op(dn.size, [dn])
    g.drop(dn)
    wb = max(eb, top_bytes)
    # proj_out * sample_weights: backward also makes the product with the saved rows
    # before reducing it to the weights' gradient
    wo = g.op(rows * h * wb, [m2, top], save=(m2,), bwd_temps=(rows * h * wb,))
    g.drop(m2)
    inv = g.alloc(rows * 8)
    wi = g.op(wo.size, [wo])  # weighted_out[inv_perm]
    g.drop(wo)
    sb = 4 if s.autocast else wb
    out = g.op(t * h * sb, [wi])  # .view(t, k, h).sum(dim=1)
    g.drop(wi)
    if sb != in_bytes:
        o2 = g.op(t * h * in_bytes, [out])
        g.drop(out)
        out = o2
    g.unref(idx)
    g.unref(inv)
    g.drop(*casts)  # the proxies' factors, released with the parametrization
    return out


def _moe(g: Graph, spec: ModelSpec, plan: TrainPlan, s: _Shapes, x: Var,
         lins: dict[str, LinearShape], weights: dict[str, Var]) -> Var:
    """The sparse MoE block: router and fused experts (Mixtral, Qwen3-MoE), plus Qwen2-MoE's
    shared expert (an MLP of Linears, run first) and its sigmoid gate
    (modeling_qwen2_moe Qwen2MoeSparseMoeBlock.forward)."""
    t, h = s.tokens, spec.hidden_size
    shared: Var | None = None
    if spec.shared_expert_intermediate_size:
        shared = _mlp(g, spec, s, x, lins, weights=weights)
    trains = plan.method == "full" or s.expert_fold
    top = _router(g, spec, s, x, trains)
    if fused_experts(spec, plan):
        out = _experts(g, spec, s, x, top, weights)
    else:
        # per-expert Linears (experts quantized by the stack): every routed row through
        # one gated MLP
        rows = t * max(spec.num_experts_per_tok, 1)
        inter = spec.expert_intermediate_size
        moe = {"gate": LinearShape("experts.gate", "gate", h, inter, False),
               "up": LinearShape("experts.up", "up", h, inter, False),
               "down": LinearShape("experts.down", "down", inter, h, False)}
        per = x.size // max(t, 1)
        routed = g.op(rows * per, [x])
        m0 = _mlp(g, spec, s, routed, moe, rows)
        g.drop(routed)
        out = g.op(x.size, [m0, top])
        g.drop(m0)
    g.drop(top)
    if shared is not None:
        # sigmoid(shared_expert_gate(x)) * shared, + the experts' output
        gated = g.op(shared.size, [shared], save=(shared,))
        g.drop(shared)
        total = g.op(out.size, [out, gated])
        g.drop(out, gated)
        out = total
    return out


def _cache_update(g: Graph, kv: list[Buf], k: Var, v: Var) -> tuple[Var, Var]:
    """transformers cache_utils.py `DynamicLayer.update` on an empty layer: `self.keys =
    torch.cat([self.keys, key_states], dim=-2)` (and the values): a copy of the key (after
    rotary) and of the value, which the cache keeps and the attention then uses as its key
    and value; the layer's own `key_states` / `value_states` are rebound to them
    (modeling_llama LlamaAttention.forward). CatBackward hands its gradient on as a view."""
    kc = g.op(k.size, [k], passthrough=True)
    g.drop(k)
    vc = g.op(v.size, [v], passthrough=True)
    g.drop(v)
    kv.extend(b for b in (g.ref(kc.buf), g.ref(vc.buf)) if b is not None)
    return kc, vc


def _layer_fn(spec: ModelSpec, plan: TrainPlan, s: _Shapes,
              weights: dict[str, Var], window: bool = False,
              kv: list[Buf] | None = None) -> Callable[[Graph, Var], Var]:
    """One decoder layer's program; `kv`: the DynamicCache's tensors, where the forward
    fills one (TrainPlan.kv_cache)."""
    lins = {lin.role: lin for lin in spec.block_linears()}
    h = spec.hidden_size

    def heads(g: Graph, x: Var) -> Var:
        """`self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)` (and k, v;
        modeling_llama LlamaAttention.forward and its copies): a view, whose backward
        copies the transposed gradient back (recorded, run 34 tr-k022-gemma-2-2b, eager:
        `+16 -16` MiB before q_proj's backward, `+8 -8` before k_proj's and v_proj's)."""
        out = g.view(x, x.size)
        g.drop(x)
        return out

    def attn_block(g: Graph, n1: Var, held: list[Var]) -> Var:
        if "qkv" in lins:
            qkv = _linear(g, s, n1, lins["qkv"], weights=weights)
            per = qkv.size // max(spec.q_size + 2 * spec.kv_size, 1)
            q = g.op(per * spec.q_size, [qkv])
            k = g.op(per * spec.kv_size, [qkv])
            v = g.op(per * spec.kv_size, [qkv])
            g.drop(qkv)
        else:
            q = heads(g, _linear(g, s, n1, lins["q"], weights=weights))
            k = heads(g, _linear(g, s, n1, lins["k"], weights=weights))
            v = heads(g, _linear(g, s, n1, lins["v"], weights=weights))
        if spec.qk_norm:
            wq = spec.head_size if spec.qk_norm_width == "head" else spec.q_size
            wk = spec.head_size if spec.qk_norm_width == "head" else spec.kv_size
            rq = s.tokens * spec.q_size // wq
            rk = s.tokens * spec.kv_size // wk
            q2, k2 = _norm(g, s, q, wq, rq), _norm(g, s, k, wk, rk)
            g.drop(q, k)
            q, k = q2, k2
        qe, ke = _rotary(g, q, s.liger), _rotary(g, k, s.liger)
        g.drop(q, k)
        if kv is not None:
            ke, v = _cache_update(g, kv, ke, v)
        a, probs = _attention(g, spec, plan, s, qe, ke, v, window)
        if probs is not None:
            held.append(probs)
        o = _linear(g, s, a, lins["o"], weights=weights)
        # `attn_output = self.o_proj(attn_output)` lets the attention output go; the
        # query/key/value states are locals of the attention's forward, freed when it
        # returns (transformers modeling_llama LlamaAttention.forward; recorded in run 14)
        g.drop(a)
        g.drop(qe, ke, v)
        return o

    def post_norm(g: Graph, v: Var) -> Var:
        """Gemma-2/3's norm after attention and after the MLP (four norms a layer)."""
        if spec.norms_per_layer != 4:
            return v
        out = _norm(g, s, v, h)
        g.drop(v)
        return out

    def layer(g: Graph, x: Var) -> Var:
        # eager attention's probabilities, held by the layer's `_` until it returns
        # (`hidden_states, _ = self.self_attn(...)`)
        held: list[Var] = []
        if spec.norms_per_layer == 1:  # parallel attention and MLP (phi-2, falcon)
            n1 = _norm(g, s, x, h)
            o = attn_block(g, n1, held)
            m = _mlp(g, spec, s, n1, lins, weights=weights)
            g.drop(n1)
            r1 = g.op(x.size, [x, o], passthrough=True)
            g.drop(o)
            out = g.op(x.size, [r1, m], passthrough=True)
            g.drop(r1, m, *held)
            return out
        n1 = _norm(g, s, x, h)
        o = attn_block(g, n1, held)
        g.drop(n1)
        o = post_norm(g, o)
        r1 = g.op(x.size, [x, o], passthrough=True)
        g.drop(o)
        n2 = _norm(g, s, r1, h)
        if spec.is_moe:
            m = _moe(g, spec, plan, s, n2, lins, weights)
        else:
            m = _mlp(g, spec, s, n2, lins, weights=weights)
        g.drop(n2)
        m = post_norm(g, m)
        out = g.op(x.size, [r1, m], passthrough=True)
        g.drop(r1, m, *held)
        return out

    return layer


def _shapes(spec: ModelSpec, plan: TrainPlan) -> _Shapes:
    targets = {lin.name for lin in lora_targets(spec, plan)}
    return _Shapes(
        tokens=plan.tokens,
        c=DTYPE_BYTES[plan.compute_dtype],
        act=residual_bytes(plan),
        targets=frozenset(targets),
        rank=plan.rank,
        dropout=plan.lora_dropout > 0,
        method=plan.method,
        autocast_weights=plan.method == "full" and DTYPE_BYTES[plan.load_dtype] == 4,
        autocast=plan.autocast,
        expert_bytes=expert_dtype_bytes(plan),
        expert_fold=lora_on_experts(spec, plan),
        int8=plan.method == "qlora" and plan.quant == "int8",
        # (read by the int8 matmul only: not computed for the other methods, whose traced
        # sizes (program.symbolic) it would stop, a float of the tokens)
        outlier_fraction=(int8_outlier_fraction(spec, plan.tokens)
                          if plan.method == "qlora" and plan.quant == "int8" else 1.0),
        kv_cache=plan.kv_cache,
        fp32_norm_scale=spec.norm_scales_in_fp32,
        liger=plan.loss_kernel == "liger",
        liger_norm_in_place=not spec.model_type.startswith("gemma"),
        adapter=DTYPE_BYTES[plan.adapter_dtype],
        nested_absmax=(plan.method == "qlora" and plan.quant in ("nf4", "fp4")
                       and plan.double_quant),
    )


class StepRequests(Value):
    _fields = ("requests", "steps", "phases", "runs", "host_peak")
    requests: list[tuple[int, int]]
    steps: int
    # (phase, index of its first request) of every step, in order: "forward" (with the
    # loss), "backward", "optimizer" (with zero_grad)
    phases: list[tuple[str, int]]
    # (layer, index of its first request) of each run of one layer's requests (-1: the
    # rest), Graph.runs
    runs: list[tuple[int, int]]
    # the most bytes of offloaded activations in host memory at once (Graph.host_peak)
    host_peak: int

    def __init__(self, requests: list[tuple[int, int]], steps: int,
                 phases: list[tuple[str, int]] | None = None,
                 runs: list[tuple[int, int]] | None = None, host_peak: int = 0) -> None:
        self.requests = requests
        self.steps = steps
        self.phases = [] if phases is None else phases
        self.runs = [] if runs is None else runs
        self.host_peak = host_peak

    @property
    def starts(self) -> list[int]:
        """Index of each step's first request."""
        return [k for name, k in self.phases if name == "forward"]


def step_requests(spec: ModelSpec, plan: TrainPlan, steps: int = 3) -> StepRequests:
    """The requests of `steps` training steps (forward, loss, backward, optimizer step,
    zero_grad(set_to_none=True)), after the weights are loaded."""
    s = _shapes(spec, plan)
    g = Graph()
    layers = spec.num_hidden_layers
    g.offload = plan.offload_activations
    g.last_checkpoint = layers - 1
    t, h, vocab = s.tokens, spec.hidden_size, spec.vocab_size
    full = plan.method == "full"
    wbytes = DTYPE_BYTES[plan.load_dtype]
    per_layer_weights: list[dict[str, Var]] = []
    linears = spec.block_linears()
    for _ in range(layers):
        w: dict[str, Var] = {}
        for lin in linears:
            if full:
                w[lin.name] = Var(None, lin.weight_numel * s.c, lin.weight_numel * wbytes,
                                  True, param=True)
            elif lin.name in s.targets:
                w[lin.name + ".A"] = Var(None, 0, lin.in_features * s.rank * s.adapter,
                                         True, param=True)
                w[lin.name + ".B"] = Var(None, 0, s.rank * lin.out_features * s.adapter,
                                         True, param=True)
        w.update(expert_weights(spec, plan))
        per_layer_weights.append(w)
    # sdpa layers that slide past their window
    # (and every layer of packed or padding-free rows: activations.masked_layers)
    windows = masked_layers(spec, plan)
    rows, seq = plan.rows
    # the DynamicCache's keys and values of the current forward (TrainPlan.kv_cache)
    kv: list[Buf] = []
    fns = [_layer_fn(spec, plan, s, w, win, kv if s.kv_cache else None)
           for w, win in zip(per_layer_weights, windows, strict=True)]
    # tied 16-bit embeddings: the lm_head's gradient arrives first as a transposed mm
    # output, so the embedding's is summed into a new tensor (Graph._grad_into)
    embed_w = Var(None, vocab * h * wbytes, vocab * h * wbytes, full, param=True,
                  sum_out_of_place=not s.autocast_weights)
    head_w = embed_w if spec.tie_word_embeddings else Var(
        None, vocab * h * wbytes, vocab * h * wbytes, full, param=True)
    params = [(-1, embed_w), (-1, head_w)] + [(i, v) for i, w in enumerate(per_layer_weights)
                                               for v in w.values()]
    opt = optimizer_bytes(spec, plan)
    # a group per copy of the trainable tensors: group k among layer k % layers' requests
    state_groups = optimizer_state_groups(spec, plan)
    ck = plan.gradient_checkpointing
    held: Var | None = None
    held_graph: list[Buf] = []  # what the previous step's surviving loss or output keeps
    phases: list[tuple[str, int]] = []
    last: _Boundary | None = None  # the state where the last step began
    for step in range(steps):
        if step >= 1:
            # the loop's state where this step begins: where it equals the one the last
            # step began in, every step left repeats the last one (`_Boundary`)
            here = _Boundary.of(g, (held, held_graph, kv, params), len(phases))
            if last is not None and here is not None and last.repeats(here, g, phases,
                                                                        steps - step):
                break
            last = here
        g.set_layer(-1, new_run=True)
        phases.append(("forward", len(g.requests)))
        g.checkpoints = 0
        x = g.op(t * h * s.act, [embed_w])
        if spec.model_type in SCALED_EMBEDDING_FAMILIES:
            # `super().forward(input_ids) * self.embed_scale`: the lookup freed once scaled
            # (transformers 5.17 Gemma2TextScaledWordEmbedding.forward; recorded, run 36
            # tr-p009-gemma-2-9b-2L: `+28 +28 -28` MiB at modeling_gemma2.py:349)
            scaled = g.op(t * h * s.act, [x], passthrough=True)
            g.drop(x)
            x = scaled
        # `inputs_embeds` (and the mask arguments' reference to it) lives until the model's
        # forward returns (recorded, run 36 tr-p009: freed at event 1232, after the final
        # norm and the masks)
        embeds = g.ref(x.buf)
        # the (batch, 1, S, S) bool sliding-window mask, built once per forward
        # (masking_utils create_sliding_window_causal_mask) and held by the layers'
        # arguments through backward (checkpointing recomputes the layers with it)
        # (packed rows: a block-causal one too, activations.sdpa_masks)
        masks = [g.alloc(rows * seq * seq) for _ in range(sdpa_masks(spec, plan))]
        # eager attention: one additive mask per kind of layer, full attention first
        # (modeling_gemma2 Gemma2Model.forward causal_mask_mapping; a model with one kind
        # builds one), freed when the forward returns -- `attn_weights + attention_mask`
        # saves neither -- or, checkpointed, held by the layers' arguments through backward
        eager = ([_eager_mask(g, plan, s, sliding)
                  for sliding in sorted({w is not None for w in layer_windows(spec)})]
                 if plan.attn == "eager" else [])
        if ck:
            masks += eager
            eager = []
        # cos and sin: the products of every layer's rotary save them where a gradient
        # flows (`_rotary`); checkpointed layers are recomputed with them in backward
        g.rope = _rope_tables(g, spec, plan, s)
        tables = [v.buf for v in g.rope]
        # freed with the masks once backward ends: checkpointed layers are recomputed with
        # them; under offload "all" `_rotary` saves no reference and they are held here
        if ck or g.offload == "all":
            masks += tables
            tables = []
        leaf_ref: Buf | None = None
        if ck and not full:
            x.requires_grad = True  # enable_input_require_grads
            g.leaves.append(x)
            # the leaf's AccumulateGrad node holds it (and its .grad) while the graph
            # lives: through backward, and past it where the loss or the output survives
            # the step. The checkpoint holds it too, so this shows only where the first
            # layer's checkpointed input is offloaded: the host copy frees no GPU bytes
            # (calibration/h100/run32/tr-k015-mistral-7b-ckoff.json.gz: the embedding
            # output, 4 x 4096 x 4096 fp32, live at the backward peak)
            leaf_ref = g.ref(x.buf)
        for i, fn in enumerate(fns):
            g.set_layer(i)
            nx = g.checkpoint(fn, x) if ck else fn(g, x)
            g.drop(x)
            x = nx
        g.set_layer(-1)
        n = _norm(g, s, x, h)
        g.drop(x)
        # the model's forward returns: the mask mapping, inputs_embeds and (where nothing
        # saved them, or the layers are recomputed in backward: after it) cos and sin go
        for b in (*eager, embeds, *tables):
            g.unref(b)
        logits: Var | None = None
        if plan.loss_kernel != "torch":
            # the output keeps no logits (liger's lce_forward `skip_logits` in training,
            # cce's patch: `logits=None`): its cache and the graph its loss reaches
            loss = _fused_head(g, spec, plan, s, n, head_w)
            held, held_graph = _rebind(g, held, held_graph)
        else:
            head_copy: Var | None = None
            if plan.kbit_upcast or s.autocast_weights:
                # the fp32 lm_head weight cast for the matmul (kept for backward); a trained
                # one gets its compute-dtype gradient first, then the fp32 cast of it
                # (ToCopyBackward)
                head_copy = g.op(vocab * h * s.c, [head_w])
            # autocast casts an fp32 final hidden state (QLoRA's fp32 norm) for the matmul
            # too; kept only where the head trains (recorded: a compute-dtype copy made and
            # freed around the logits at modeling_llama LlamaForCausalLM.forward)
            nc = g.op(t * h * s.c, [n]) if n.size != t * h * s.c else n
            g.noop = True  # the lm_head's saved tensors stay (OffloadActivations' NoOpManager)
            logits = g.op(t * vocab * s.c, [head_copy or head_w, nc], mm=True,
                          save=tuple(v for v in ((nc if full else None), head_copy)
                                     if v is not None))
            g.noop = False
            if nc is not n:
                g.drop(nc)
            if spec.final_logit_softcapping:
                logits = _softcap(g, logits)
            if head_copy is not None:
                g.drop(head_copy)
            up = g.op(t * vocab * 4, [logits])
            logp = g.op(t * vocab * 4, [up], save_out=True)  # log_softmax keeps its output
            g.drop(up)
            # `out` is rebound once the forward (with its loss) returns, and the old
            # output's graph goes with it (bitsandbytes int8's ctx.tensors: H200 run 13
            # z004: step 2 starts 4.16 GB above step 1, logits 1.24 GB)
            held, held_graph = _rebind(g, held, held_graph)
            loss = g.op(4, [logp])
            g.drop(logp)
        # the final hidden state is a local of the CausalLM forward: freed when it returns,
        # after its loss (recorded in every run 14 trace)
        g.drop(n)
        g.clear_cache()  # autocast's region ends with the forward and loss
        # the output's DynamicCache goes with the output (TrainPlan.kv_cache)
        cache, kv[:] = list(kv), []
        leaf_refs = [leaf_ref] if leaf_ref is not None else []
        g.set_layer(-1, new_run=True)
        phases.append(("backward", len(g.requests)))
        if plan.holds_output:
            held = logits if logits is not None else Var(None, 0, 0, False)
            held_graph = g.backward(loss, keep_graph=True) + cache + leaf_refs
            if not plan.holds_output_past_step:  # `del out` after backward
                held, held_graph = _rebind(g, held, held_graph)
        else:
            if logits is None:
                pass
            elif plan.loop == "trainer" and logits.size != t * vocab * 4:
                # accelerate's convert_outputs_to_fp32 (utils/operations.py) replaces the
                # output's logits by an fp32 copy, which Trainer.compute_loss drops with the
                # output, keeping only the loss: both go before backward begins (recorded)
                conv = g.alloc(t * vocab * 4)
                g.drop(logits)
                g.unref(conv)
            else:
                g.drop(logits)
            for buf in cache:  # the output goes with its cache
                g.unref(buf)
            if plan.survives == "loss":
                # `loss = model(...).loss` rebinds `loss` once the output is dropped: the
                # previous loss goes, and the graph its grad_fn reached with it
                for kept in held_graph:
                    g.unref(kept)
                held_graph = g.backward(loss, keep_graph=True) + leaf_refs
            else:
                g.backward(loss)
                for kept in leaf_refs:  # the graph goes with the loss after backward
                    g.unref(kept)
        for mask in masks:
            g.unref(mask)
        g.rope = None
        _optimizer_phase(g, opt, state_groups, params, layers, step, phases)
    return StepRequests(g.requests, steps, phases, g.runs, g.host_peak)


class _Unfollowed(Exception):
    """State `_Boundary` does not read: the steps are generated one by one."""


_SCALARS = frozenset({bool, int, float, str, Sym})  # Sym: a traced size (program.symbolic)
_HELD = frozenset({Buf, Var, Node, ChunkNode, CheckpointNode})  # (records with slots)
# each one's field values, in its slots' order (attrgetter of two or more names: a tuple)
_FIELDS_OF = {kind: attrgetter(*getattr(kind, "__slots__")) for kind in _HELD}  # noqa: B009
# Graph attributes that are no state a step reads: what it writes (the requests, the
# runs, the host peak, which only grows), the id counter, and the id sets, read for the
# state's own buffers (`_Boundary`)
_OUTPUTS = frozenset({"requests", "runs", "host_peak", "_next", "gone", "for_good"})


class _Boundary(Value):
    """The state of the step loop where a step begins, up to the tensor ids: every
    object the loop and the Graph hold (`step_requests`' loop carries the held output,
    its graph, the cache list and the parameters; every Graph attribute but _OUTPUTS),
    written out with each buffer and var by the order it is first reached in, and the id
    of each buffer reached (`ids`, by that order).

    The loop's body reads nothing else but the step's index, and that only at the first
    step (`_optimizer_phase`: the states): a step that begins in a state equal to the one
    the last step began in makes the last step's requests, with the ids of the buffers
    reached renamed by their order and those the last step made shifted by the count it
    made (`Graph.alloc` numbers them on), and ends in a state equal again. `repeats`
    writes the steps left so: generating one step of llama-3.1-8b's 6-layer cut takes
    2.6 ms (2026-12-07, this 2-core machine); `tests/memory/program/test_step_requests.py`
    compares with the steps generated one by one."""

    _fields = ("form", "ids", "next_id", "start", "run", "phase")
    form: tuple[object, ...]
    ids: list[int]  # the buffers' ids, by the order they are reached in
    next_id: int  # Graph._next: the last id given
    start: int  # the step's first request
    run: int  # its first run (Graph.runs)
    phase: int  # its first phase

    def __init__(self, form: tuple[object, ...], ids: list[int], next_id: int, start: int,
                 run: int, phase: int) -> None:
        self.form = form
        self.ids = ids
        self.next_id = next_id
        self.start = start
        self.run = run
        self.phase = phase

    @classmethod
    def of(cls, g: Graph, carried: tuple[object, ...], phase: int) -> _Boundary | None:
        """The state of `g` and of the loop's `carried` objects; None where it holds an
        object of a kind not read here."""
        seen: dict[int, int] = {}  # id(object) -> the order it was first reached in
        ids: list[int] = []
        gone, for_good = g.gone, g.for_good

        def of(x: object) -> object:
            kind = type(x)
            if x is None or kind in _SCALARS:
                return x
            if kind in _HELD:
                k = seen.get(id(x))
                if k is not None:
                    return ("seen", k)
                seen[id(x)] = len(seen)
                if kind is Buf:
                    b: Buf = x  # type: ignore[assignment]
                    ids.append(b.id)
                    return ("buf", b.size, b.refs, b.layer, b.id in gone, b.id in for_good)
                return (kind.__name__, *[v if v is None or type(v) in _SCALARS else of(v)
                                         for v in _FIELDS_OF[kind](x)])
            if kind is list or kind is tuple:
                return (kind.__name__, *map(of, x))  # type: ignore[call-overload]
            if kind is set or kind is frozenset:
                if all(type(v) in _SCALARS for v in x):  # type: ignore[attr-defined]
                    return ("set", *sorted(x, key=repr))  # type: ignore[call-overload]
                raise _Unfollowed
            if callable(x):  # a layer's program (CheckpointNode.fn): the same each step
                return ("fn", id(x))
            raise _Unfollowed

        try:
            state = tuple(of(v) for k, v in sorted(vars(g).items()) if k not in _OUTPUTS)
            form = (state, of(carried))
        except _Unfollowed:
            return None
        finally:
            # `of` is recursive: its closure holds itself. Unbound here, it is freed by
            # reference counting, not left for the cyclic collector (cli.main collects
            # rarely: tests/test_light_imports.py test_an_estimate_leaves_no_garbage_cycle)
            of = None  # type: ignore[assignment]
        if len(set(ids)) != len(ids):
            return None
        return cls(form, ids, g._next, len(g.requests), len(g.runs), phase)

    def repeats(self, here: _Boundary, g: Graph, phases: list[tuple[str, int]],
                count: int) -> bool:
        """Where the step from this boundary to `here` began in the state it ended in,
        append `count` copies of it to `g`'s requests and runs and to `phases`; False
        (nothing written) where it did not, or where it reached a buffer the state does
        not hold (no copy can follow it)."""
        if self.form != here.form:
            return False
        step = g.requests[self.start:here.start]
        # ids at or below `last` are the state's buffers, renamed by the order they are
        # reached in (`frame`); those above, the step's own, shift by the count it made
        last, shift = self.next_id, here.next_id - self.next_id
        frame = dict(zip(self.ids, here.ids, strict=True))
        if any(tid <= last and tid not in frame for tid in here.ids):
            return False
        runs = g.runs[self.run:here.run]
        own = phases[self.phase:here.phase]
        for _ in range(count):
            try:
                step = [(frame[tid] if tid <= last else tid + shift, size)
                        for tid, size in step]
            except KeyError:  # a buffer the state does not hold: only the first copy can
                return False  # meet one (a later one's are the last copy's, in `frame`)
            base = len(g.requests) - self.start
            g.requests.extend(step)
            g.runs.extend((layer, k + base) for layer, k in runs)
            phases.extend((name, k + base) for name, k in own)
            base_ids = frame.values()
            frame = {tid: frame[tid] if tid <= last else tid + shift for tid in base_ids}
            last += shift
        return True



def _rebind(g: Graph, held: Var | None, held_graph: list[Buf]
            ) -> tuple[None, list[Buf]]:
    """The previous step's surviving output goes (its name rebound, or `del out`), and
    the graph it kept with it; returns the cleared (held, held_graph)."""
    if held is not None:
        g.drop(held)
        g.release(held_graph)
        g.set_layer(-1)
        held_graph = []
    return None, held_graph


def liger_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """liger-kernel 0.8.5 fused_linear_cross_entropy_forward's chunk of rows:
    inc_factor = cdiv(V, H), chunk_size = next_power_of_2(cdiv(BT, inc_factor))."""
    inc = -(-vocab // hidden)
    rows = -(-tokens // inc)
    return 1 << max(rows - 1, 0).bit_length()


def _fused_head(g: Graph, spec: ModelSpec, plan: TrainPlan, s: _Shapes, n: Var,
                head_w: Var) -> Var:
    """The loss of a step whose head is not transformers' lm_head + ForCausalLMLoss
    (TrainPlan.loss_kernel), from the final norm's output `n`: the scalar loss."""
    t, h, vocab = s.tokens, spec.hidden_size, spec.vocab_size
    in_b = n.size // max(t * h, 1)
    # the lm_head weight's dtype (TrainPlan.param_dtype): fp32 under QLoRA (kbit prep casts
    # the non-quantized parameters up) and with fp32 master weights
    w_b = DTYPE_BYTES[plan.param_dtype]
    trains = plan.method == "full"
    # autocast's cast of the weight for a matmul: cached for a leaf that requires grad
    # (torch autocast `cached_cast`), made per matmul for a frozen one
    w_cast = s.autocast and w_b != s.c
    x_cast = s.autocast and in_b != s.c
    out_b = s.c if s.autocast else in_b
    cached: Var | None = None
    if w_cast and trains:
        cached = g.cast_cached(head_w, vocab * h * s.c)

    def weight_cast() -> Buf | None:
        return g.alloc(vocab * h * s.c) if w_cast and cached is None else None

    if plan.loss_kernel == "liger":
        # liger-kernel 0.8.5 ops/fused_linear_cross_entropy.py
        # fused_linear_cross_entropy_forward (as lce_forward calls it in training,
        # `skip_logits`): grad_input = zeros_like(_input), grad_weight = zeros_like(weight)
        # where it trains, loss_1d (fp32, per row), the target mask; per chunk of rows the
        # logits, the cross-entropy kernel writing their gradient into them, grad_input's
        # rows (`grad_logits_chunk @ weight`) and grad_weight's sum (`mm(...).float()`; the
        # addmm(out_dtype=fp32) path for an fp32 grad_weight). Where input and weight are
        # already in the matmul's dtype (`_can_use_mm_out`: no autocast cast to make) the
        # chunks' logits are one buffer made once and grad_input's rows are written in
        # place (`torch.mm(..., out=)`); else (torch.amp.custom_fwd leaves autocast on:
        # QLoRA's fp32 head and norm) each chunk's logits are new, the previous chunk's
        # going when `logits_chunk` is rebound, and `@ weight` makes rows copied into
        # grad_input. It keeps grad_input and grad_weight, which backward hands on
        # (grad_output != 1 is multiplied in place).
        grad_in = g.alloc(t * h * in_b)
        grad_w = g.alloc(vocab * h * w_b) if trains else None
        loss_1d = g.alloc(t * 4)
        target_mask = g.alloc(t)
        rows_per = min(liger_chunk_rows(t, vocab, h), t)
        mm_out = in_b == w_b and (not s.autocast or in_b == s.c)
        storage = g.alloc(rows_per * vocab * in_b) if mm_out else None
        prev: Buf | None = None
        g.workspace()
        for start in range(0, t, rows_per):
            rows = min(rows_per, t - start)
            if storage is None:
                wc = weight_cast()
                xc = g.alloc(rows * h * s.c) if x_cast else None
                logits = g.alloc(rows * vocab * out_b)
                g.unref(xc)
                g.unref(wc)
                g.unref(prev)
                prev = logits
                wc = weight_cast()
                gi = g.alloc(rows * h * out_b)  # `@ weight`, copied into grad_input's rows
                g.unref(wc)
                g.unref(gi)
            if trains:
                xc = g.alloc(rows * h * s.c) if in_b != s.c else None
                if w_b == 4:  # torch.addmm(grad_weight, ..., out_dtype=float32, out=...)
                    g.unref(xc)
                else:
                    mm = g.alloc(vocab * h * out_b)
                    up = g.alloc(vocab * h * 4)  # .float()
                    g.unref(up)
                    g.unref(mm)
                    g.unref(xc)
        g.unref(prev)
        g.unref(storage)
        g.unref(target_mask)
        loss = g.op(4, [n, head_w], grads=(grad_in, grad_w))
        g.unref(loss_1d)
        return loss
    if plan.loss_kernel == "cce":
        # cut-cross-entropy 25.1.1 cce.py (cce_linear_cross_entropy, LinearCrossEntropy
        # Function), called as its transformers patch calls it in training
        # (`linear_cross_entropy(hidden_states, lm_head.weight, labels, shift=True)`), with
        # the hidden states and the classifier in the autocast dtype (upstream's
        # LinearCrossEntropyFunction casts both under autocast; 25.1.1's backward refuses
        # fp32 embeddings): utils._build_flat_valids (the rows whose label is not ignored:
        # nonzero, int32, summed to int64 offsets), cce_lse_forward_kernel's fp32 lse per
        # row and logit_avg per class (filter_eps set), indexed_neg_dot_forward_kernel's
        # target logits (added into in place, averaged to the loss). Keeps e, c, lse,
        # targets, valids, logit_avg. Backward (cce_backward.py cce_backward_kernel): the
        # class order (argsort of logit_avg, int32), de = zeros_like(e), dc =
        # zeros_like(c, dtype=e.dtype) where c trains; the casts' backward cast them back.
        e = g.op(t * h * s.c, [n]) if in_b != s.c else n
        c = g.op(vocab * h * s.c, [head_w]) if w_b != s.c else head_w
        not_ignored = g.alloc(t)
        nz = g.alloc(t * 16)
        nz32 = g.alloc(t * 8)
        g.unref(nz)
        valids = g.alloc(t * 8)
        g.unref(nz32)
        g.unref(not_ignored)
        lse = g.alloc(t * 4)
        logit_avg = g.alloc(vocab * 4)
        neg_dot = g.alloc(t * 4)
        loss = g.op(4, [e, c], save=(e, c), bwd_temps=(vocab * 8, vocab * 4))
        if loss.requires_grad and g.grad_mode:
            node = g.nodes[-1]
            assert isinstance(node, Node)
            node.saved.extend(b for b in (lse, valids, logit_avg) if b is not None)
        else:
            for b in (lse, valids, logit_avg):
                g.unref(b)
        g.unref(neg_dot)
        if c is not head_w:
            g.drop(c)
        if e is not n:
            g.drop(e)
        return loss
    if plan.loss_kernel == "trl-chunked":
        return _trl_chunked_head(g, spec, plan, s, n, head_w, w_b, in_b, trains)
    if plan.loss_kernel == "trl-fused":
        return _trl_fused_head(g, plan, s, n, head_w, vocab, w_b, in_b, trains)
    # chunked: torchtune CEWithChunkedOutputLoss (modules/loss/ce_chunked_output_loss.py,
    # num_output_chunks 8): the decoder's output projection per chunk of the sequence
    # (`[self.output(chunk) for chunk in h.chunk(num_output_chunks, dim=1)]`), then per
    # chunk `F.cross_entropy(logits.float(), labels, reduction="sum")`: each chunk's fp32
    # copy lives only for its log_softmax, whose output is kept; the logits list is
    # dropped after the loss. A chunk of the sequence is not contiguous where batch > 1:
    # the matmul's reshape copies it (autocast's cast is that copy where there is one).
    k = CHUNKED_LOSS_CHUNKS
    views = g.chunk(n, k)
    logits_list: list[Var] = []
    for v in views:
        rows_b = v.size  # bytes of the chunk
        copy = None
        if x_cast:
            copy = g.op(rows_b // in_b * s.c, [v])
        elif plan.batch_size > 1:
            copy = g.op(rows_b, [v])
        xin = copy or v
        if w_cast and cached is None:
            # autocast casts the frozen fp32 weight for each chunk's matmul, and each
            # matmul keeps its cast for grad_input: one copy per chunk until backward
            wcv = g.op(vocab * h * s.c, [head_w])
            lg = g.op(rows_b // in_b * vocab // h * out_b, [wcv, xin], mm=True,
                      save=(wcv, xin) if trains else (wcv,))
            g.drop(wcv)
        else:
            lg = g.op(rows_b // in_b * vocab // h * out_b, [cached or head_w, xin], mm=True,
                      save=(xin,) if trains else ())
        if copy is not None:
            g.drop(copy)
        logits_list.append(lg)
    for v in views:
        g.drop(v)
    if spec.final_logit_softcapping:
        # the model's capping, a second list over the chunks' logits once every chunk's
        # matmul ran (calibrate/run.py _head_loss_forward: `[torch.tanh(lg / cap) * cap for lg in
        # logits]`): the uncapped list lives until the capped one replaces it (run 32
        # trace tr-k-g-chunked-gemma-2-2b: eight matmuls, then eight cappings, then eight
        # frees; capping each chunk after its matmul left 6.5 GiB less cache)
        capped = []
        for lg in logits_list:
            d = g.op(lg.size, [lg])
            th = g.op(lg.size, [d], save_out=True)
            g.drop(d)
            capped.append(g.op(lg.size, [th]))
            g.drop(th)
        for lg in logits_list:
            g.drop(lg)
        logits_list = capped
    parts: list[Var] = []
    for lg in logits_list:
        rows = lg.size // (vocab * out_b)
        up32 = g.op(rows * vocab * 4, [lg]) if out_b != 4 else lg
        logp = g.op(rows * vocab * 4, [up32], save_out=True)
        if up32 is not lg:
            g.drop(up32)
        parts.append(g.op(4, [logp]))
        g.drop(logp)
    loss = g.op(4, parts)
    for lg in logits_list:
        g.drop(lg)
    return loss


# TRL's chunk of valid tokens (trl 1.4-1.14 trl/trainer/sft_trainer.py
# _CHUNKED_LM_HEAD_CHUNK_SIZE)
TRL_CHUNK_TOKENS = 256


def _trl_chunked_head(g: Graph, spec: ModelSpec, plan: TrainPlan, s: _Shapes, n: Var,
                      head_w: Var, w_b: int, in_b: int, trains: bool) -> Var:
    """TRL SFTTrainer's default loss of trl 1.4-1.14 (`loss_type="chunked_nll"`; modelled
    as trl 1.14.0 trl/trainer/sft_trainer.py `_patch_chunked_ce_lm_head` /
    `_chunked_cross_entropy_loss` / `_chunk` do it): the decoder's last hidden state
    without the lm_head, `hidden[..., :-1, :].reshape(-1, h)` (a copy where batch > 1: the
    slice is not contiguous), the labelled rows packed to the front (`valid.argsort()`'s
    int64 order; `hidden[order]`, a copy kept: its chunks are the checkpoints' inputs;
    IndexBackward keeps only the order), then per chunk of 256 rows `_chunk` under
    `torch.utils.checkpoint` (non-reentrant): nothing of a chunk outlives it in forward.
    `_chunk` (1.14.0): `(h @ w.to(h.dtype).t()).float()`: the weight converted to the rows'
    dtype (a copy only where they differ), autocast's casts of both to the compute dtype
    (only where the rows are not in it: QLoRA's fp32 norm output and head), the logits in
    the matmul's dtype, their fp32 copy (the matmul's output freed), the capping in fp32,
    log_softmax, nll_loss, argmax, and the entropy `-(log_p.exp() * log_p).sum(-1)`
    (exp and the product alive together), all freed when the chunk returns.
    (trl 1.4-1.12 computed `h.float() @ w.float().t()`: an fp32 copy of the weight per
    chunk and then autocast's casts; not modelled.)
    Backward reruns each chunk with its graph (what the loss's nodes save: the matmul's
    inputs, log_p; the entropy's are not kept: the trainer drops the outputs that hold
    them before backward), then its gradients: log_p's and the logits' (fp32), the cast
    back to the matmul's dtype, `@ w` back to the rows (and cast to their dtype), the
    weight's gradient where the head trains, and SliceBackward's zeros of the whole
    gathered tensor (added into the first). Every row is planned labelled (n_valid = rows)."""
    t, h, vocab = s.tokens, spec.hidden_size, spec.vocab_size
    src = g.op(t * h * in_b, [n]) if plan.batch_size > 1 else n
    order = g.alloc(t * 8)
    gathered = g.op(t * h * in_b, [src])
    if src is not n:
        g.drop(src)
    rows = min(TRL_CHUNK_TOKENS, t)
    cast = s.autocast and in_b != s.c  # autocast casts the rows and the weight
    mm_b = s.c if s.autocast else in_b  # the matmul's output dtype
    w_conv = vocab * h * in_b if w_b != in_b else 0  # `w.to(h.dtype)`
    cap = bool(spec.final_logit_softcapping)
    # Every full chunk makes and frees the same requests (the allocator hands the same
    # blocks back): the first and the last, partial one are replayed.
    for r in [rows] + ([t % rows] if t % rows else []):
        wv = g.alloc(w_conv) if w_conv else None
        hc = g.alloc(r * h * s.c) if cast else None
        wc = g.alloc(vocab * h * s.c) if cast else None
        mm = g.alloc(r * vocab * mm_b)
        g.workspace()
        for b in (wc, hc, wv):
            g.unref(b)
        logits = mm
        if mm_b != 4:  # `.float()`
            logits = g.alloc(r * vocab * 4)
            g.unref(mm)
        if cap:  # `softcap * torch.tanh(logits / softcap)`, fp32
            g.temp_pair(r * vocab * 4, r * vocab * 4)
            capped = g.alloc(r * vocab * 4)
            g.unref(logits)
            logits = capped
        logp = g.alloc(r * vocab * 4)
        ex = g.alloc(r * vocab * 4)  # `-(log_p.exp() * log_p).sum(dim=-1)`
        prod = g.alloc(r * vocab * 4)
        g.unref(ex)
        g.unref(prod)
        g.unref(logp)
        g.unref(logits)
    # backward, per chunk, held together: the weight's conversion and autocast's casts
    # (the matmul's saved inputs), the rerun forward's peak (the fp32 logits, log_p, exp
    # and the product; the capping's saved tanh: four or five fp32 [rows, vocab]; the
    # gradients that follow, log_p's and the logits' (fp32) and their cast to the
    # matmul's dtype, beside the saved log_p, need no more), the rows' gradient (and its
    # cast to their dtype), and SliceBackward's zeros of the whole gathered tensor; the
    # weight's gradient (fp32) where the head trains
    temps = [w_conv, vocab * h * s.c if cast else 0, rows * h * s.c if cast else 0,
             *[rows * vocab * 4] * (5 if cap else 4), rows * h * mm_b,
             rows * h * in_b if in_b != mm_b else 0, t * h * in_b]
    if trains:
        temps.append(vocab * h * 4)
    temps = [x for x in temps if x]
    inputs = [gathered, head_w] if trains else [gathered]
    loss = g.op(4, inputs, save=(gathered,), bwd_temps=tuple(temps), mm=True)
    if loss.requires_grad and g.grad_mode:
        node = g.nodes[-1]
        assert isinstance(node, Node)
        if order is not None:
            node.saved.append(order)
    else:
        g.unref(order)
    g.drop(gathered)
    return loss


# trl 1.16.0 trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE (rows of a projection tile)
# and trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE (its vocabulary columns)
TRL_FUSED_TOKENS = 4096
TRL_FUSED_COLUMNS = 32768


def trl_fused_rows(plan: TrainPlan) -> tuple[int, int]:
    """(positions, scored rows) of TRL's fused LM head: the label mask's positions after
    the shift (`last_hidden_state[:, :-1]`, one fewer per sequence row) and the rows it
    scores, every shifted position labelled (on a Triton device only the labelled rows
    are scored: `compact`)."""
    batch, seq = plan.rows
    m = batch * (seq - 1)
    return m, m


def _trl_fused_head(g: Graph, plan: TrainPlan, s: _Shapes, n: Var, head_w: Var,
                    vocab: int, w_b: int, in_b: int, trains: bool) -> Var:
    """TRL SFTTrainer's LM head and loss from trl 1.15 on (trl 1.16.0: SFTTrainer.__init__
    always calls trl/trainer/utils.py `add_fused_lm_head(model, outputs=("log_probs",
    "entropy", "is_top1"))`; compute_loss calls `model(**inputs, fused_lm_head=True)` and
    takes `-outputs.log_probs` summed over the labelled tokens), on a CUDA device with
    Triton (`compact`: only the labelled positions are scored).

    Forward (utils.py `_fused_forward`): `mask = labels[:, 1:] != -100` (bool);
    `hidden_states[mask]` (nonzero's int64 [N, 2] indices for the index, freed; the N
    rows; IndexBackward keeps the mask); `labels[mask]` (its own nonzero, freed; the
    int64 targets, saved); then kernels/chunked_logprob.py
    `ChunkedLogProbFunction.forward`: seven fp32 [N] accumulators, `mm_buf` [min(N,
    4096), 32768] in the compute dtype, per tile of 4096 rows
    `hidden[...].to(compute_dtype)` (a copy where the rows are not in it; rebound per
    tile) and per 32768 vocabulary columns `weight[start:end].to(compute_dtype)` (a
    copy where the weight is not in it, freed after the mm); then log_z, logprobs,
    entropy (fp32 [N], `x_sum_exp / sum_exp` a temporary) and is_top1 (two bool
    comparisons and their `&`); it saves hidden, targets, log_z, entropy and frees the
    rest on return. Each output is scattered back (`x.new_zeros(mask.shape)
    .masked_scatter(mask, x)`: the zeros, their clone, the int64 prefix sum of
    masked_scatter_, the zeros freed). SFTTrainer.compute_loss: `per_token_loss =
    -outputs.log_probs` (sum, divide: scalars; the metrics' sums and `.item()`), the
    outputs go when it returns; MaskedScatterBackward keeps the mask.
    Backward: NegBackward's gradient of log_probs (the sum's is an expanded scalar);
    MaskedScatterBackward `grad.masked_select(mask)` (nonzero's indices, freed, and the N
    fp32 rows); ChunkedLogProbFunction.backward: `grad_hidden` (fp32 zeros, N x h),
    `grad_weight` (fp32 zeros, V x h) where the head trains, `mm_buf`, per tile the rows'
    and the weight columns' casts (a column cast rebound: the next one is made before the
    last goes), the gradients cast back to their dtypes (`.to(hidden.dtype)`, a no-op for
    fp32); IndexBackward's zeros of the [B, S-1, h] slice (index_put_'s nonzero and sort
    indices with them), then SliceBackward's of the whole hidden state (n's gradient).
    Entropy gets no gradient (only `.detach()` is read).
    The loop's requests are held together in backward at their peak (two column casts
    and one row cast with grad_hidden and mm_buf), not replayed one by one; an fp32
    grad_hidden (QLoRA's fp32 rows: it is the gradient) is made after them, where the
    source makes it first (a node makes its inputs' gradients after its temporaries)."""
    m, nv = trl_fused_rows(plan)
    h = n.size // max(s.tokens * in_b, 1)
    c = s.c if s.autocast else in_b  # compute_dtype: autocast's, else the hidden states'
    cols = min(TRL_FUSED_COLUMNS, vocab)
    tile_rows = min(nv, TRL_FUSED_TOKENS)
    mask = g.alloc(m)
    # hidden_states[mask]: the bool mask made indices (nonzero, int64 [N, 2]) for the
    # index, freed after it; IndexBackward keeps the mask. Its backward: new_zeros of the
    # [B, S-1, h] slice, index_put_(accumulate=True)'s nonzero and its sort's three int64
    # [N] (linear, sorted, original indices), then SliceBackward's zeros (n's gradient)
    idx = g.alloc(nv * 16)
    hidden = g.op(nv * h * in_b, [n],
                  bwd_temps=(m * h * in_b, nv * 16, nv * 8, nv * 8, nv * 8))
    g.unref(idx)
    if hidden.requires_grad and g.grad_mode and mask is not None:
        node = g.nodes[-1]
        assert isinstance(node, Node)
        mask.refs += 1
        node.saved.append(mask)
    nz = g.alloc(nv * 16)  # labels[mask]
    targets = g.alloc(nv * 8)
    g.unref(nz)
    accs = [g.alloc(nv * 4) for _ in range(7)]
    mm_buf = g.alloc(tile_rows * TRL_FUSED_COLUMNS * c)
    hc: Buf | None = None
    for start in range(0, nv, TRL_FUSED_TOKENS):
        rows = min(TRL_FUSED_TOKENS, nv - start)
        new = g.alloc(rows * h * c) if in_b != c else None
        g.unref(hc)
        hc = new
        for col in range(0, vocab, TRL_FUSED_COLUMNS):
            wc = g.alloc(min(cols, vocab - col) * h * c) if w_b != c else None
            g.workspace()
            g.unref(wc)
    g.temp(nv * 4)  # torch.log(sum_exp)
    log_z = g.alloc(nv * 4)
    trains_head = [head_w] if trains else []
    temps = [nv * h * 4 if in_b != 4 else 0, vocab * h * 4 if trains and w_b != 4 else 0,
             tile_rows * TRL_FUSED_COLUMNS * c, tile_rows * h * c if in_b != c else 0,
             cols * h * c if w_b != c else 0, cols * h * c if w_b != c else 0]
    logprobs = g.op(nv * 4, [hidden, *trains_head], save=(hidden,),
                    bwd_temps=tuple(x for x in temps if x), mm=True)
    g.temp(nv * 4)  # x_sum_exp / sum_exp
    entropy = g.alloc(nv * 4)
    ge = g.alloc(nv)
    gt = g.alloc(nv)
    top1 = g.alloc(nv)
    g.unref(gt)
    g.unref(ge)
    if logprobs.requires_grad and g.grad_mode:
        node = g.nodes[-1]
        assert isinstance(node, Node)
        for b in (targets, log_z, entropy):
            if b is not None:
                b.refs += 1
                node.saved.append(b)
    g.drop(hidden)
    for b in (*accs, mm_buf, hc, targets, log_z):
        g.unref(b)
    # the outputs scattered back to [B, S-1]: log_probs (kept by the graph's chain),
    # entropy (fp32), is_top1 (bool)
    zeros = g.alloc(m * 4)
    full = g.op(m * 4, [logprobs], bwd_temps=(nv * 16,))
    if full.requires_grad and g.grad_mode:
        node = g.nodes[-1]
        assert isinstance(node, Node)
        if mask is not None:
            mask.refs += 1
            node.saved.append(mask)
    g.temp(m * 8)
    g.unref(zeros)
    outs: list[Buf | None] = []
    for size in (4, 1):
        zeros = g.alloc(m * size)
        outs.append(g.alloc(m * size))
        g.temp(m * 8)
        g.unref(zeros)
    g.drop(logprobs)
    g.unref(entropy)
    g.unref(top1)
    # SFTTrainer.compute_loss: `-outputs.log_probs`, summed (the loss: its backward makes
    # NegBackward's gradient of log_probs); the outputs go when it returns
    per_token = g.alloc(m * 4)
    loss = g.op(4, [full])
    g.unref(per_token)
    g.drop(full)
    for b in (*outs, mask):
        g.unref(b)
    return loss


def _optimizer_phase(g: Graph, opt: OptimizerBytes, state_groups: list[list[int]],
                     params: list[tuple[int, Var]], layers: int, step: int,
                     phases: list[tuple[str, int]]) -> None:
    """The optimizer step: its states at the first step, foreach temporaries, then
    zero_grad(set_to_none=True) frees every gradient."""
    g.set_layer(-1, new_run=True)
    phases.append(("optimizer", len(g.requests)))
    # optimizer: states at the first step, then zero_grad frees every gradient
    if step == 0:  # kept for good: never freed
        for k, group in enumerate(state_groups):
            _group_layer(g, k, layers)
            for sz in group:
                g.alloc(sz)
        g.set_layer(-1)
    if opt.step_transient:
        # foreach AdamW: torch._foreach_sqrt(exp_avg_sqs), one new tensor per state
        # (torch/optim/adamw.py _multi_tensor_adamw), all alive until the step ends
        # (each group holds whole parameters, two states each: [1::2] per group is
        # [1::2] of them all)
        sqrt: list[list[Buf | None]] = []
        for k, group in enumerate(state_groups):
            _group_layer(g, k, layers)
            sqrt.append([g.alloc(sz) for sz in group[1::2]])
        for k, bufs in enumerate(sqrt):
            _group_layer(g, k, layers)
            for b in bufs:
                g.unref(b)
        g.set_layer(-1)
    for i, v in params:
        g.set_layer(i)
        g.unref(v.grad)
        v.grad, v.has_grad = None, False
    g.set_layer(-1)


def _group_layer(g: Graph, k: int, layers: int) -> None:
    """The requests of optimizer state group `k` (optimizer_state_groups) are layer
    k % layers'; each pass over the layers is a run of its own."""
    if k % layers == 0:
        g.set_layer(-1)
    g.set_layer(k % layers)


class ProgramPeaks(Frozen):
    """The load and step programs replayed on the caching allocator: the peak allocated
    of each phase (what `torch.cuda.max_memory_allocated` would read over it) and the
    peaks over the steps, as `calibrate` measures them (peaks reset after loading)."""

    _fields = ("phases", "peak_allocated", "peak_reserved", "load_reserved", "requested")
    phases: dict[str, int]  # "load", "forward", "backward", "optimizer"
    peak_allocated: int  # over the steps
    peak_reserved: int  # over the steps
    load_reserved: int  # the peak reserved of loading and preparing the model
    # the peak of the requested bytes alive (each rounded to 512 B, c10 round_size), per
    # phase: what the allocator's allocated peak is before a block's unsplit rest, and,
    # unlike it, independent of where the requests land (`requested_peaks`)
    requested: dict[str, int]

    def __init__(self, phases: dict[str, int], peak_allocated: int, peak_reserved: int,
                 load_reserved: int, requested: dict[str, int] | None = None) -> None:
        self.__dict__.update(phases=phases, peak_allocated=peak_allocated,
                             peak_reserved=peak_reserved, load_reserved=load_reserved,
                             requested={} if requested is None else requested)


def requested_peaks(load: list[tuple[int, int]], requests: list[tuple[int, int]],
                    phases: list[tuple[str, int]]) -> dict[str, int]:
    """The peak of the rounded requested bytes alive in loading and in each step phase.
    The allocator's allocated bytes count a whole block where the rest is too small to
    split off (c10 `should_split`), so they depend on which free block a request lands in,
    and can fall when a tensor grows; these cannot: the requests are the same program
    whatever the sizes, and every size grows with batch, sequence length and rank."""
    sizes: dict[int, int] = {}
    total, peak = requested_run(sizes, 0, load)
    out = {"load": peak, "forward": 0, "backward": 0, "optimizer": 0}
    bounds = [*phases, ("", len(requests))]
    for (name, lo), (_, hi) in itertools.pairwise(bounds):
        total, peak = requested_run(sizes, total, requests[lo:hi])
        out[name] = max(out[name], peak)
    return out


def step_program(spec: ModelSpec, plan: TrainPlan, steps: int = 3) -> StepProgram:
    """The requests of `program.step` as a StepProgram: repeated from a cut of the model
    to program.templates.TEMPLATE_LAYERS layers where its layers are alike (the same
    sequence, tensor ids renumbered: program.templates.canonical), else generated whole."""
    layers = spec.num_hidden_layers
    cut = _template_cut(spec, plan, steps)
    if cut is not None:
        program = template_program(cut.requests, cut.phases, cut.runs, layers)
        if program is not None:
            return program
    gen = _cached_requests(spec, plan, steps, layers)
    return StepProgram.plain(gen.requests, gen.phases)


def _template_cut(spec: ModelSpec, plan: TrainPlan, steps: int) -> StepRequests | None:
    """The requests of the TEMPLATE_LAYERS-layer cut that `step_program` repeats, where
    the model's layers may be alike (None: the model is generated whole)."""
    # (OffloadActivations' stash frees a tensor of an earlier layer among a later one's
    # requests: generated whole)
    alike = (len(set(sliding_past_window(spec, plan.rows[1]))) == 1
             and len(set(masked_layers(spec, plan))) == 1
             and plan.offload_activations != "all")
    if spec.num_hidden_layers <= TEMPLATE_LAYERS or not alike:
        return None
    try:
        return _cached_requests(spec, plan, steps, TEMPLATE_LAYERS)
    except (VramcalcError, ValueError):
        return None  # a spec the cut does not validate for (a config from the hub)


def requested_peak(spec: ModelSpec, plan: TrainPlan, steps: int = 3) -> int:
    """The peak of the rounded requested bytes alive (`allocator.replay.requested_run`)
    over loading and the steps of `program_peaks`: its largest `requested` value, byte
    for byte, without the allocator.

    These depend on each request's size and on which tensor each free gives back, not on
    where a request lands, so the program's sequence is not built: where `step_program`
    repeats a cut (`templates.template_runs`: the same validity), each request of the cut
    adds its rounded size or takes off its tensor's, and a span the program runs `count`
    times in a row (the middle layer's copies) adds the same sequence each time: the
    copies' requests are the middle layer's with advanced ids, and every tensor they free
    is of a layer between the second and the second to last, which allocate the same
    sizes in the same order (`templates._alike`). A span whose bytes change by `d` over
    one run peaks at its first run's peak + max(0, (count - 1) * d).
    tests/memory/program/test_requested_peak.py compares with the replay on the catalog."""
    with _collector_paused():
        total, peak = _load_requested(spec, plan)
        cut = _template_cut(spec, plan, steps)
        order = (None if cut is None else
                 template_runs(cut.requests, cut.phases, cut.runs, spec.num_hidden_layers))
        if cut is None or order is None:
            requests = _cached_requests(spec, plan, steps, spec.num_hidden_layers).requests
            total, steps_peak = requested_run({}, total, requests)
            return max(peak, steps_peak)
        spans = sorted({(lo, hi) for lo, hi, _ in order})
        changes = dict(zip(spans, _span_changes(cut.requests, spans), strict=True))
        for lo, hi, count in order:
            change, top = changes[(lo, hi)]
            peak = max(peak, total + top + max(0, (count - 1) * change))
            total += count * change
        return peak


_SPAN_CHANGES = getattr(COMPILED, "span_changes", None)


def _span_changes(requests: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
                  ) -> list[tuple[int, int]]:
    """For each span (lo, hi) of `requests`: the change of the rounded requested bytes
    alive over it and the largest running sum inside it (0, 0 for an empty span), each
    request counted as `allocator.replay.requested_run` counts it (the steps free none of
    the load's tensors: its ids are negative, program.load _Requests; Graph numbers each
    tensor once). The compiled replay's `span_changes` where it is built (llama-3.1-8b's
    cut, ~11,000 requests); the same numbers (tests/memory/test_required_bytes.py)."""
    found = None if _SPAN_CHANGES is None else _SPAN_CHANGES(requests, spans)
    if found is not None:
        return found  # type: ignore[no-any-return]
    rounded = {tid: round_size(size) for tid, size in requests if size > 0}
    deltas = [rounded[tid] if size > 0 else -rounded[tid] if size == 0 else 0
              for tid, size in requests]
    out = []
    for lo, hi in spans:
        run = list(itertools.accumulate(deltas[lo:hi]))
        out.append((run[-1], max(run)) if run else (0, 0))
    return out


# The step requests of the plans estimated last, traced once a plan comes back at another
# batch size or sequence length (a search, a sweep), and read from the trace after
# (program.symbolic): the same requests as step_requests, generated once.
STEP_CACHE = StepCache()


# the plan's fields that name a dtype (every other field is read as it is)
_DTYPE_FIELDS = ("compute_dtype", "weights_dtype", "adapter_dtype")
# what the generator and the load do not read: the replay's allocator setting
# (program_peaks reads it off the caller's plan) and LoRA's alpha (a scale, no tensor)
_UNREAD = {"expandable_segments": False, "alpha": TrainPlan.model_fields["alpha"].default}


def as_generated(plan: TrainPlan) -> TrainPlan:
    """The plan whose requests are `plan`'s, as the caches of the generation key it: the
    fields the generator and the load do not read at their defaults, and fp16 read as
    bf16 where no dtype field is bf16. They read a 16-bit dtype only through its size
    (weights.DTYPE_BYTES) and through comparisons between the plan's dtype fields, or with
    "fp32", which the renaming keeps (load.py reads `in ("bf16", "fp16")`); so a GPU
    without bf16 (compare's smallest GPU) and `check`'s expandable-segments suggestion
    reuse a generation. tests/memory/program/test_step_dtypes.py generates both sides
    over the catalog."""
    update: dict[str, object] = {name: value for name, value in _UNREAD.items()
                                 if getattr(plan, name) != value}
    values = [getattr(plan, name) for name in _DTYPE_FIELDS]
    if "fp16" in values and "bf16" not in values:
        update.update({name: "bf16" for name, value in zip(_DTYPE_FIELDS, values, strict=True)
                       if value == "fp16"})
    return plan.model_copy(update=update) if update else plan


def _cached_requests(spec: ModelSpec, plan: TrainPlan, steps: int, depth: int
                     ) -> StepRequests:
    """`step_requests` of `spec` cut to `depth` layers (the whole spec at its own depth),
    through STEP_CACHE (fp16 plans as their bf16 twins: `as_generated`)."""
    plan = as_generated(plan)
    key = (id(spec), depth, steps, plan.model_copy(update={"batch_size": 0, "seq_len": 0}))

    def generate(p: TrainPlan) -> StepRequests:
        return step_requests(spec if depth == spec.num_hidden_layers else
                             depth_cut(spec, depth), p, steps)

    result: StepRequests = STEP_CACHE.get(spec, key, plan, generate, StepRequests)
    return result


# load_requests of the plans met last, by (spec, plan but its batch_size and seq_len):
# computed with those two fields Unread (program.symbolic.unread_by), so a result kept is
# the one of every batch and length; None: the load read one of them (computed each time)
_LOADS: dict[tuple[object, ...], tuple[ModelSpec, list[tuple[int, int]] | None]] = {}
_LOADS_KEPT = 16


def _cached_load(spec: ModelSpec, plan: TrainPlan) -> list[tuple[int, int]]:
    """`load_requests(spec, plan)`, kept for the plan's other batch sizes and lengths (a
    search, a sweep; fp16 plans as their bf16 twins, `as_generated`): the same list,
    which the replay only reads."""
    plan = as_generated(plan)
    key = (id(spec), plan.model_copy(update={"batch_size": 0, "seq_len": 0}))
    hit = _LOADS.get(key)
    if hit is None or hit[0] is not spec:
        if len(_LOADS) >= _LOADS_KEPT:
            _LOADS.clear()
        hit = _LOADS[key] = (spec, unread_by(lambda p: load_requests(spec, p), plan))
    return hit[1] if hit[1] is not None else load_requests(spec, plan)


# the load's rounded requested bytes alive at its end and their peak
# (allocator.replay.requested_run), by the very list _cached_load keeps
_LOAD_REQUESTED: dict[int, tuple[list[tuple[int, int]], int, int]] = {}


def _load_requested(spec: ModelSpec, plan: TrainPlan) -> tuple[int, int]:
    """requested_run over `_cached_load(spec, plan)` from nothing: (total, peak), kept
    with the list it was counted on."""
    load = _cached_load(spec, plan)
    hit = _LOAD_REQUESTED.get(id(load))
    if hit is None or hit[0] is not load:
        if len(_LOAD_REQUESTED) >= _LOADS_KEPT:
            _LOAD_REQUESTED.clear()
        hit = _LOAD_REQUESTED[id(load)] = (load, *requested_run({}, 0, load))
    return hit[1], hit[2]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """CPython's cyclic garbage collector off while a program is made and replayed: the
    generator makes ~11,000 container objects for llama-3.1-8b's cut (Buf, Var, Node,
    request tuples), each 700 of which start a collection (gc.get_threshold() (700, 10,
    10), CPython 3.11 Modules/gcmodule.c) that finds nothing to free, as every object
    goes by reference counting: 1.4 ms of a 17.2 ms estimate (2026-12-07, this 2-core
    machine). Turned back on only where it was on (a caller's gc.disable() stands)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# Where the training replay puts new segments: at ever lower addresses (True), as CUDA gave
# the large pool's in the committed training traces (a new large segment fell below every
# earlier new one in 241 of 249 of calibration/h100/run34/tr-k022, 178 of 178 of
# h200/run14-traces/tr-d091; the 2 MiB small-pool ones mostly not), or ever higher ones
# (False). With best fit's tie-break on the lower address (c10 BlockComparatorSize) it
# decides which of equal free blocks a request takes. program.infer always descends.
TRAIN_DESCENDING = False


def program_peaks(spec: ModelSpec, plan: TrainPlan, steps: int = 3,
                  engine: Engine | None = None,
                  descending: bool | None = None) -> ProgramPeaks:
    """Replay the requests of loading and preparing the model (load_requests), then of
    `steps` training steps (step_program), phase by phase (`allocator.replay.
    replay_program`; `engine` None: the compiled replay where it was built; `descending`
    None: `TRAIN_DESCENDING`)."""
    if descending is None:
        descending = TRAIN_DESCENDING
    with _collector_paused():
        program = step_program(spec, plan, steps)
        load = _cached_load(spec, plan)
        r = replay_program(load, program.blocks,
                           [k for _, k in program.phases], plan.expandable_segments, engine,
                           descending)
    phases = {"load": r.load_peak_allocated, "forward": 0, "backward": 0, "optimizer": 0}
    requested = {"load": r.load_peak_requested, "forward": 0, "backward": 0, "optimizer": 0}
    for (name, _), peak, req in zip(program.phases, r.segment_peaks, r.segment_requested,
                                    strict=True):
        phases[name] = max(phases[name], peak)
        requested[name] = max(requested[name], req)
    return ProgramPeaks(phases, r.peak_allocated, r.peak_reserved, r.load_peak_reserved,
                        requested)


def replayed_slack(spec: ModelSpec, plan: TrainPlan, steps: int = 3) -> int:
    """Reserved - allocated at the steps' peak (`program_peaks`: what `calibrate` measures,
    three steps, peaks reset after loading)."""
    peaks = program_peaks(spec, plan, steps)
    return peaks.peak_reserved - peaks.peak_allocated


def offload_host_bytes(spec: ModelSpec, plan: TrainPlan) -> int:
    """The host memory the offloaded activations of a step take at most
    (`Graph.host_peak`), pinned by every technique modelled. Unsloth keeps its host buffers for good
    (one per offloaded layer); torch's pinned CachingHostAllocator keeps OffloadActivations'
    freed blocks cached, so the peak stays held too. The peak is at the forward's end, and
    grows by the same bytes per alike layer: where the layers are alike (as
    `step_program` repeats them), from cuts of 2 and 3 layers."""
    if plan.offload_activations == "none":
        return 0
    layers = spec.num_hidden_layers
    alike = (len(set(sliding_past_window(spec, plan.rows[1]))) == 1
             and len(set(masked_layers(spec, plan))) == 1)
    if layers > 3 and alike:
        try:
            two = step_requests(depth_cut(spec, 2), plan, steps=1).host_peak
            three = step_requests(depth_cut(spec, 3), plan, steps=1).host_peak
        except (VramcalcError, ValueError):
            pass
        else:
            return two + (layers - 2) * (three - two)
    return step_requests(spec, plan, steps=1).host_peak
