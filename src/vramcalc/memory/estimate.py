"""The estimator: peak GPU memory of one QLoRA / LoRA training step, by component.

`estimate(spec, plan)` is pure arithmetic (no torch). It walks the phases of a step under
HF Trainer (load + prepare, forward, backward, optimizer step), computes what is allocated
at the worst moment of each, and reports the largest: peak allocated (what
`torch.cuda.max_memory_allocated` reads), peak reserved (`max_memory_reserved`) and peak
device (what NVML shows for the process, which decides whether it fits).

Formulas and their sources: docs/memory-model.md. Constants measured rather than derived
say so where they are defined, with the data file they come from.
"""

from __future__ import annotations

from vramcalc.errors import PlanError
from vramcalc.memory.allocator.constants import (
    CUBLAS_WORKSPACES,
    CUDA_CONTEXT,
    allocator_slack,
    paged_resident,
    required_slack,
)
from vramcalc.memory.effective import effective_train_plan
from vramcalc.memory.program.activations import (
    eager_mask_bytes,
    eager_score_count,
    eager_scores_bytes,
    expert_dtype_bytes,
    first_layer_unsaved_bytes_per_token,
    int8_saved_bytes_per_token,
    kv_cache_unsaved_bytes_per_token,
    layer_saved_bytes_per_token,
    masked_layers,
    mlp_bytes,
    pre_attention_saved_bytes_per_token,
    residual_bytes,
    window_mask_bytes,
)
from vramcalc.memory.program.logits import (
    FORWARD_END_BYTES_PER_HIDDEN,
    LOGITS_BACKWARD_EXTRA_UNITS,
    LOGITS_FORWARD_EXTRA_UNITS,
    LOGITS_SAVED_UNITS,
    SOFTCAP_SAVED_UNITS,
)
from vramcalc.memory.program.optimizer import optimizer_bytes
from vramcalc.memory.program.step import (
    TRL_CHUNK_TOKENS,
    TRL_FUSED_COLUMNS,
    TRL_FUSED_TOKENS,
    liger_chunk_rows,
    offload_host_bytes,
    program_peaks,
    requested_peak,
    trl_fused_rows,
)
from vramcalc.memory.program.trainable import (
    check_lora_can_start,
    lora_on_experts,
    trainable_param_bytes,
    trainable_param_count,
)
from vramcalc.memory.program.weights import DTYPE_BYTES, expert_bytes, rounded, weight_bytes
from vramcalc.memory.result import COMPONENTS, Components, Estimate
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import (
    CCE_MODEL_TYPES,
    CHUNKED_LOSS_CHUNKS,
    LIGER_MODEL_TYPES,
    TrainPlan,
)

__all__ = ["COMPONENTS", "CUDA_CONTEXT", "Components", "Estimate", "estimate", "required_bytes"]

# Backward through eager attention (eager_attention_forward: fp32 softmax, `.to(bf16)`,
# `probs @ v`): at its peak the saved fp32 probabilities and three fp32 score-sized
# gradients are live (the bf16 probabilities' gradient cast back to fp32 and the softmax
# backward's two), the bf16 probabilities already freed with the matmul's node, and what
# the layer saved after its attention core (o_proj on, the MLP) freed by their backward.
# Per score, beyond the 6 B the layer's activations count: 3 x 4 - 2 = 10 B. Allocator
# snapshots, H200 run 12 (tinyllama QLoRA, llama-2-7b full bf16, llama-3.1-8b QLoRA; four
# 2048 MiB blocks at each peak).
EAGER_BACKWARD_BYTES_PER_SCORE = 10
# Backward through a recomputed layer: gradients of the widest fp32 intermediates (gate,
# up and their product) live together with the layer's recomputed activations.
LAYER_GRAD_FACTOR = 3


def step_program_covers(spec: ModelSpec, plan: TrainPlan) -> bool:
    """Whether the step program models every mechanism the phase formula has for `plan`.
    Not for parallel blocks (phi-2's gelu_new and partial rotary, falcon: the program
    is 10-35 % under on their H200 points) nor for a frozen base held above the compute
    dtype (LoRA on fp32 weights: the 16-bit program, 16 % under on xt4)
    (`python bench/program_vs_formula.py`)."""
    frozen_upcast = (plan.method != "full"
                     and DTYPE_BYTES[plan.load_dtype] > DTYPE_BYTES[plan.compute_dtype])
    return spec.norms_per_layer != 1 and not frozen_upcast


def fused_head_bytes(spec: ModelSpec, plan: TrainPlan) -> tuple[int, int]:
    """The phase formula's logits-and-loss bytes of a fused or chunked head at the end of
    the forward and in the loss's backward (the step program replays the requests:
    program.step._fused_head)."""
    t, h, v = plan.tokens, spec.hidden_size, spec.vocab_size
    c = DTYPE_BYTES[plan.compute_dtype]
    act = residual_bytes(plan)
    head_grad = v * h * DTYPE_BYTES[plan.load_dtype] if plan.method == "full" else 0
    if plan.loss_kernel == "liger":
        # grad_input and grad_weight made in forward, two chunks' logits at a time
        rows = liger_chunk_rows(t, v, h)
        kept = t * h * act + head_grad
        return kept + 2 * min(rows, t) * v * c, kept
    if plan.loss_kernel == "cce":
        # the cast hidden states kept; backward's de (and dc) then their casts
        kept = t * h * c + 12 * t
        return kept, kept + t * h * (c + act) + 2 * head_grad
    if plan.loss_kernel == "trl-chunked":
        # the gathered copy of the hidden states kept; one 256-row chunk's fp32 logits,
        # log_p, exp and product at a time (with autocast's cast of the weight where the
        # rows are not in the compute dtype), and in backward SliceBackward's zeros
        # (step.py _trl_chunked_head, trl 1.14.0)
        rows = min(TRL_CHUNK_TOKENS, t)
        kept = t * h * act + head_grad
        chunk = (v * h * c if act != c else 0) + 4 * rows * v * 4
        return kept + chunk, 2 * kept + chunk
    if plan.loss_kernel == "trl-fused":
        # the scored rows kept (saved) with a few fp32 per-row vectors; one 4096 x 32768
        # logits tile (and a weight column cast) at a time; in backward the fp32
        # grad_hidden (and grad_weight), the tile, and IndexBackward's zeros
        # (step.py _trl_fused_head)
        _, nv = trl_fused_rows(plan)
        tile = min(nv, TRL_FUSED_TOKENS) * TRL_FUSED_COLUMNS * c
        cols = min(TRL_FUSED_COLUMNS, v) * h * c
        kept = nv * h * act + 17 * nv  # the rows, targets, log_z, entropy, the mask
        train_w = v * h * 4 if plan.method == "full" else 0
        bwd = kept + tile + 2 * cols + nv * h * (4 + act) + train_w + head_grad
        return kept + tile + cols + 30 * nv, bwd
    # chunked: every chunk's log-softmax kept (fp32) and the compute-dtype logits until
    # the loss is summed, one fp32 copy at a time
    units = 4 + c + 4 / CHUNKED_LOSS_CHUNKS
    return int(units * t * v), int((4 + (4 + c) / CHUNKED_LOSS_CHUNKS) * t * v)


def fused_head_largest(spec: ModelSpec, plan: TrainPlan) -> int:
    """The largest request of a fused or chunked head (program.step._fused_head): the
    largest allocation a retry after an out-of-memory error may need as one block."""
    t, h, v = plan.tokens, spec.hidden_size, spec.vocab_size
    c = DTYPE_BYTES[plan.compute_dtype]
    rows = {"liger": min(liger_chunk_rows(t, v, h), t), "cce": 0,
            "chunked": -(-t // CHUNKED_LOSS_CHUNKS),
            "trl-chunked": min(TRL_CHUNK_TOKENS, t), "trl-fused": 0}[plan.loss_kernel]
    weight = v * h * max(c, DTYPE_BYTES[plan.load_dtype])
    if plan.loss_kernel == "trl-fused":  # the logits tile, the fp32 grad_hidden
        tile = min(trl_fused_rows(plan)[1], TRL_FUSED_TOKENS) * TRL_FUSED_COLUMNS * c
        return max(tile, t * h * 4, weight)
    return max(rows * v * 4, t * h * 4, weight)


def check_loss_kernel(spec: ModelSpec, plan: TrainPlan) -> None:
    """Refuse a loss kernel (TrainPlan.loss_kernel) the model or the plan cannot run, or
    whose mechanism the estimate cannot replay."""
    kernel = plan.loss_kernel
    if kernel == "torch":
        return
    flag = f"--loss-kernel {kernel}"
    if kernel == "liger" and spec.model_type not in LIGER_MODEL_TYPES:
        raise PlanError(f"{flag}: liger-kernel has no kernels for model type "
                        f"{spec.model_type} ({spec.name}); use_liger_kernel leaves it as it is")
    if kernel == "cce" and spec.model_type not in CCE_MODEL_TYPES:
        raise PlanError(f"{flag}: cut-cross-entropy's cce_patch does not know model type "
                        f"{spec.model_type} ({spec.name}): it raises")
    if kernel == "chunked" and plan.holds_output:
        raise PlanError(f"{flag}: not modelled with --loop {plan.loop} (a loop holding the "
                        "output's list of logit chunks); use trainer, plain or trainer-plain")
    if kernel == "trl-fused" and plan.loop != "trainer":
        raise PlanError(f"{flag}: TRL's fused LM head is SFTTrainer's (its compute_loss "
                        f"calls the model with fused_lm_head=True): use --loop trainer, "
                        f"not {plan.loop}")
    if not step_program_covers(spec, plan):
        raise PlanError(f"{flag}: not modelled for {spec.name} with this plan (the step "
                        "program does not cover it, docs/memory-model.md)")


def _program_breakdown(formula: dict[str, int], total: int) -> dict[str, int]:
    """The components of the phase formula's candidate for the program's peak phase,
    made to add up to the program's peak: weights, gradients and optimizer states are
    the same in both; the difference goes to the transients (the program's peak lies
    inside an op: temporaries the formula's phase sums do not hold), and where the
    program is below the formula, comes off the transients, then the activations, then
    the logits."""
    out = dict(formula)
    diff = total - sum(out.values())
    # what is left below the formula's static parts (their per-tensor rounding differs by
    # a few MiB from the program's on the largest full fine-tunes) comes off the largest
    largest = max(out, key=lambda k: out[k])
    for name in ("transient", "activations", "logits_loss", largest):
        if diff >= 0:
            break
        take = min(out.get(name, 0), -diff)
        out[name] = out.get(name, 0) - take
        diff += take
    out["transient"] = out.get("transient", 0) + diff
    return out


def estimate(spec: ModelSpec, plan: TrainPlan, *, replay: bool = True) -> Estimate:
    """Peak memory of `plan` on `spec`, by phase and component. See module docstring.

    `replay=False` skips the step program's replay (program.step.program_peaks) and gives
    the phase formula with the linear slack rule: within a few percent of the full
    estimate, for a search's first guess only (search.largest_fitting confirms every
    answer on the full estimate); no number a command shows comes from it."""
    check_lora_can_start(spec, plan)
    check_loss_kernel(spec, plan)
    plan, planned_as, notes = effective_train_plan(spec, plan)
    wb = weight_bytes(spec, plan)
    opt = optimizer_bytes(spec, plan)
    full = plan.method == "full"
    trained = trainable_param_bytes(spec, plan)
    adapters = 0 if full else trained
    grads = trained  # one gradient per trainable tensor, same dtype and allocation sizes

    tokens = plan.tokens
    h, v, layers = spec.hidden_size, spec.vocab_size, spec.num_hidden_layers
    act = residual_bytes(plan)
    per_layer = layer_saved_bytes_per_token(spec, plan)
    scores = eager_scores_bytes(spec, plan)
    compute = DTYPE_BYTES[plan.compute_dtype]

    # Autocast casts a weight that is not in the compute dtype for each matmul, and the
    # matmul keeps the cast for backward when its input requires grad. The cast of a leaf
    # that requires grad is also cached until the forward's autocast region ends (torch
    # autocast `cached_cast`: `arg.requires_grad() && arg.is_leaf()`): full fine-tuning's
    # copies are alive at the forward's end even with checkpointing; a frozen base's
    # (LoRA on fp32 weights) only where the layer keeps its graph. QLoRA: the fp32 lm_head
    # (after prepare) is cast. fp32 weights under bf16 autocast: every Linear.
    lm_head_copy = 0
    weight_copies = 0  # autocast copies of the block Linears alive at the forward's end
    autocast_cast = DTYPE_BYTES[plan.load_dtype] > compute  # weights above the compute dtype
    if plan.kbit_upcast or autocast_cast:
        lm_head_copy = rounded(v * h * compute)
    if autocast_cast and plan.method != "qlora":
        weight_copies = layers * sum(rounded(lin.weight_numel * compute)
                                     for lin in spec.block_linears())
        # fused 3-D experts are not cast: `_grouped_mm` is on no autocast list, so they run
        # in their own dtype (activations.expert_dtype_bytes; H200 run 5 trace d061)
    logits_unit = tokens * v
    # with checkpointing each layer keeps only its input (also a source of slack below)
    checkpoints = layers * tokens * act * h if plan.gradient_checkpointing else 0
    # sdpa with a sliding window reached: one bool mask for the step, an additive copy
    # saved per sliding layer (activations.window_mask_bytes)
    window_bool, window_saved = window_mask_bytes(spec, plan)
    # (the additive copy of one layer's mask: window_saved is one per masked layer)
    window_copy = window_saved // max(sum(masked_layers(spec, plan)), 1)
    if plan.gradient_checkpointing:
        # int8 layers keep their inputs outside the checkpoint's hooks (activations.py)
        layer_acts = (checkpoints + eager_mask_bytes(plan) + window_bool
                      + layers * tokens * int8_saved_bytes_per_token(spec, plan))
        saved_copies = 0  # recomputed per layer in backward
    else:
        # the first layer keeps less: nothing before it requires grad (activations.py)
        layer_acts = (layers * (tokens * per_layer + scores) + window_bool + window_saved
                      - tokens * first_layer_unsaved_bytes_per_token(spec, plan))
        saved_copies = weight_copies
    final_norm = tokens * act * h
    softcap = SOFTCAP_SAVED_UNITS if spec.final_logit_softcapping else 0
    # A loop that keeps the outputs (`--loop trainer-plain-outputs`: `out = model(**batch);
    # out.loss.backward(); optimizer.step()`, the loop of transformers' "training in native
    # PyTorch" docs) holds the model output (its compute-dtype logits) through backward, and
    # the previous step's output through the next forward until `out` is rebound. Trainer's
    # compute_loss returns the loss alone, as `--loop plain` and `trainer-plain`
    # (`model(**batch).loss`) keep it: the logits are freed before backward (trainer.py
    # Trainer.compute_loss).
    held_logits = compute if plan.holds_output else 0
    # ... and with it the previous step's graph, whose int8 nodes keep their ctx tensors
    # (activations.int8_saved_bytes_per_token) until `out` is rebound after the forward
    # (H200 run 13 z004: step 2 starts 4.16 GB above step 1; bf16 logits 1.24 GB, the
    # int8 inputs 2.79 GB). `del out` after backward (`trainer-plain-outputs-del`) frees
    # both before the optimizer step. A loss that survives the step (`--loop plain`: `loss`
    # is rebound once the next forward returns) keeps the same graph without the logits,
    # and, under checkpointing, the embedding output enable_input_require_grads made a leaf
    # with its gradient (its AccumulateGrad node; program.step `Graph.backward`).
    held_next = held_logits if plan.holds_output_past_step else 0
    held_graph = 0
    if plan.holds_graph_past_step:
        held_graph = layers * tokens * int8_saved_bytes_per_token(spec, plan,
                                                                  after_backward=True)
        if plan.gradient_checkpointing and not full:
            held_graph += 2 * tokens * act * h
    # use_cache without checkpointing (`--loop plain`, or --use-cache): the forward's
    # DynamicCache holds every layer's keys and values until the output goes, after the
    # loss (activations.kv_cache_unsaved_bytes_per_token)
    kv_cache = layers * tokens * kv_cache_unsaved_bytes_per_token(spec, plan)
    logits_saved = (LOGITS_SAVED_UNITS + softcap) * logits_unit
    # Later in backward: logits are gone, every gradient may exist, and (with
    # checkpointing) one layer is recomputed while its gradients flow.
    inter = spec.expert_intermediate_size
    # eager attention's backward: its score-sized transients, less what the layer has freed
    # by then (its tensors after the attention core, the bf16 probabilities: the constant)
    post_attention = per_layer - pre_attention_saved_bytes_per_token(spec, plan)
    # the MLP's backward: gradients of its intermediates in their dtype (fp32 under QLoRA,
    # the compute dtype when the base Linears run under autocast), the residual's in its own
    layer_grads = max(
        LAYER_GRAD_FACTOR * tokens * max(mlp_bytes(plan) * inter, act * h),
        EAGER_BACKWARD_BYTES_PER_SCORE * eager_score_count(spec, plan) - tokens * post_attention,
    )
    layer_copies = weight_copies // layers if layers else 0
    recompute = tokens * per_layer + scores + layer_copies + window_copy
    # peft ParamWrapper folds the LoRA delta into a full copy of a layer's expert stack
    # (tuners/lora/layer.py _LoraFactorsProxy.forward: torch.baddbmm(W, lhs, rhs)) in the
    # experts' dtype; the copy lives until that layer's backward: every layer's without
    # checkpointing, the recomputed layer's with it (H200 trace, snap-mixtral-qlora).
    fold = 0
    if lora_on_experts(spec, plan):
        fold = expert_bytes(spec, expert_dtype_bytes(plan))
    fold_transient = fold if plan.gradient_checkpointing else 0
    if fold:
        # backward through the folded stacks: `_grouped_mm` returns the gradient of the
        # folded weight (a full stack) while the folds are alive; down_proj first (next to
        # both folds), then gate_up_proj (its fold and its gradient, down's fold freed).
        # H200 snapshots (run 1 snap-mixtral-qlora, run 5 v013): unframed backward blocks.
        e, inter = spec.num_local_experts, spec.expert_intermediate_size
        f_down = rounded(e * inter * h * expert_dtype_bytes(plan))
        f_gate_up = rounded(e * 2 * inter * h * expert_dtype_bytes(plan))
        fold_transient += max(f_down, f_gate_up - f_down)
    if not plan.gradient_checkpointing:
        layer_acts += layers * fold
    # Activation offloading (program.step Graph._offload): what goes to host memory leaves
    # the layers' saved activations on the GPU (the program brings each back around its
    # backward; the formula, a first guess, only takes it off).
    host = offload_host_bytes(spec, plan)
    layer_acts -= min(host, layer_acts)
    # Full fine-tuning: the lm_head's gradient (vocab x hidden) comes first in backward, the
    # input embedding's last. Tied embeddings (one parameter): autograd holds the lm_head's
    # gradient in the AccumulateGrad node's input buffer until the embedding's arrives, and
    # sums the two (torch/csrc/autograd/input_buffer.cpp `accumulate`). In pure 16-bit the
    # lm_head's gradient is the Linear backward's transposed mm output, which the buffer
    # cannot add into in place: the end of backward holds every gradient plus two more
    # vocab x hidden tensors (run 5 snapshots of gemma-2-9b, gemma-3-1b, smollm2: exact to
    # 1 MiB). With fp32 master weights it arrives through autocast's cast backward as a
    # fresh tensor: one more (d009 gemma-2-9b, d060 llama-3.2-1b, within 0.3 %).
    vocab_grad = rounded(v * h * DTYPE_BYTES[plan.load_dtype]) if full else 0
    tied_extra = ((1 if autocast_cast else 2) * vocab_grad
                  if spec.tie_word_embeddings else 0)
    # the input embedding's gradient does not exist yet while the layers run backward
    embed_grad_later = vocab_grad if not spec.tie_word_embeddings else 0

    weights = {
        "base_weights": wb.base_weights,
        "quant_constants": wb.quant_constants,
        "unquantized_params": wb.unquantized_params + wb.buffers,
        "expert_weights": wb.expert_weights,
        "adapter_weights": adapters,
    }
    steady = {**weights, "optimizer_states": opt.device, "cublas_workspace": CUBLAS_WORKSPACES}
    fwd_h = int(FORWARD_END_BYTES_PER_HIDDEN * tokens * h)
    logits_fwd = logits_saved + LOGITS_FORWARD_EXTRA_UNITS * logits_unit
    logits_ce = logits_saved + (LOGITS_BACKWARD_EXTRA_UNITS + held_logits) * logits_unit
    if plan.loss_kernel != "torch":
        # the fused / chunked heads (program.step._fused_head; docs/memory-model.md
        # "Loss kernels"): no logits are held by the output
        held_logits = held_next = 0
        logits_fwd, logits_ce = fused_head_bytes(spec, plan)
    candidates: dict[str, dict[str, int]] = {
        "load": {**weights, "adapter_weights": 0},
        "forward": {
            **steady,
            "activations": layer_acts + final_norm + held_graph + kv_cache,
            "logits_loss": logits_fwd + held_next * logits_unit,
            "transient": lm_head_copy + fwd_h + (
                weight_copies if full or not plan.gradient_checkpointing else 0),
        },
        "backward": {
            **steady,
            "activations": layer_acts + final_norm,
            "logits_loss": logits_ce,
            "transient": lm_head_copy + saved_copies,
        },
        "backward_layers": {
            **steady,
            "gradients": grads,
            # with every gradient allocated, the activations left are those of the last
            # layers backward reaches: the checkpoints and one recomputed layer
            "activations": layer_acts + recompute if plan.gradient_checkpointing else layer_acts,
            "expert_weights": wb.expert_weights,
            "logits_loss": held_logits * logits_unit,
            "transient": layer_grads + fold_transient,
        },
        "optimizer": {**steady, "gradients": grads, "transient": opt.step_transient,
                      "activations": held_graph,  # the surviving graph, from backward on
                      "logits_loss": held_next * logits_unit},
    }
    if full:
        # Gradients grow layer by layer while the saved activations shrink: the worst moment
        # is at the first layer backward reaches (the lm_head's gradient, every layer's
        # activations) or at the last (every layer's gradients, one layer's activations),
        # then the embedding's backward (every gradient, nothing saved).
        one_layer = (layer_acts // max(layers, 1)
                     + (recompute if plan.gradient_checkpointing else layer_copies))
        per_layer_grads = (grads - vocab_grad
                           - (0 if spec.tie_word_embeddings else vocab_grad)) // max(layers, 1)
        top = {**candidates["backward_layers"],
               "gradients": vocab_grad + per_layer_grads,
               # without checkpointing every layer's autocast weight copies are still saved
               "transient": candidates["backward_layers"]["transient"] + saved_copies}
        bottom = {**candidates["backward_layers"],
                  "gradients": grads - embed_grad_later,
                  "activations": one_layer}
        candidates["backward_layers"] = max(top, bottom, key=lambda c: sum(c.values()))
        candidates["backward_end"] = {
            **steady,
            "gradients": grads,
            "expert_weights": wb.expert_weights,
            "logits_loss": held_logits * logits_unit,
            "transient": tied_extra,
        }
    totals = {name: sum(c.values()) for name, c in candidates.items()}
    # each phase's worst candidate
    phase_of = {"load": "load", "forward": "forward", "optimizer": "optimizer",
                "backward": max((n for n in totals if n.startswith("backward")),
                                key=lambda n: totals[n])}
    phases = {phase: totals[name] for phase, name in phase_of.items()}
    peak_phase = max(phases, key=lambda k: phases[k])
    breakdown = candidates[phase_of[peak_phase]]

    # The step program (program.step: the requests of loading and of three steps,
    # replayed on the caching allocator) gives reserved - allocated and, where it models
    # every mechanism of the plan (`step_program_covers`), the peak allocated of each step
    # phase too; without the replay (`replay=False`, a search's first guess) the phase
    # formula above and the linear slack rule stand in.
    # Loading and preparing the model (load_requests: the quantization and upcast
    # transients) can hold more than the steps, allocated or reserved (H200 run 24 g020:
    # qwen2-moe int8 reserved 9.34 GiB in prepare, 7.57 in the steps): what `calibrate`
    # measures and NVML reads is the peak over both.
    # Required free memory decides fit, so it must not fall when the work grows: it rests
    # on a peak that cannot (docs/memory-model.md "Required memory never falls"). The
    # formula's phases are sums of terms that grow with batch, sequence length and rank;
    # the program's allocated peak is not (a block's unsplit rest depends on where a
    # request lands), so the program gives its requested peak (`requested_peaks`) here.
    required_peak = max(phases.values())
    if replay:
        program = program_peaks(spec, plan)
        slack = program.peak_reserved - program.peak_allocated
        if step_program_covers(spec, plan):
            required_peak = max(phases["load"], *program.requested.values())
            phases = {"load": max(phases["load"], program.phases["load"]),
                      **{k: v for k, v in program.phases.items() if k != "load"}}
            peak_phase = max(phases, key=lambda k: phases[k])
            breakdown = _program_breakdown(candidates[phase_of[peak_phase]],
                                           phases[peak_phase])
            slack = max(program.peak_reserved, program.load_reserved) - phases[peak_phase]
        else:
            slack = max(slack, program.load_reserved - phases[peak_phase])
    else:
        slack = allocator_slack(4 * logits_unit, checkpoints, scores, trained if full else 0)
    peak_allocated = phases[peak_phase]
    peak_reserved = peak_allocated + slack
    paged = paged_resident(opt.paged)
    peak_device = peak_reserved + CUDA_CONTEXT + paged
    # the largest request of the loss head: a fresh segment the retry may need whole
    head_block = 4 * logits_unit if plan.loss_kernel == "torch" else fused_head_largest(spec,
                                                                                      plan)
    low, high = required_slack(head_block, compute * logits_unit, plan.holds_output,
                               plan.expandable_segments)
    required_device = required_peak + high + CUDA_CONTEXT + paged
    required_low = required_peak + low + CUDA_CONTEXT + paged
    if plan.use_cache and plan.gradient_checkpointing:
        notes.append("use_cache has no effect under gradient checkpointing: transformers turns "
                     "it off in training (utils/generic.py merge_with_config_defaults)")
    if plan.attn == "flash_attention_2":
        notes.append("flash_attention_2 is modelled as sdpa (the same O(T) saved tensors)")
    if plan.layout != "padded" and plan.attn != "flash_attention_2":
        rows, seq = plan.rows
        notes.append(f"{plan.layout} rows under {plan.attn}: one ({rows}, 1, {seq}, {seq}) "
                     "attention mask per forward (transformers create_causal_mask finds the "
                     "packed sequences from position_ids); flash_attention_2 needs none")
    if plan.offload_activations != "none":
        notes.append(f"offloaded activations take {host / 2**30:.2f} GiB of host memory "
                     f"({plan.offload_activations}); copies to and from the CPU cost "
                     "throughput")
    if plan.loss_kernel == "liger" and any(lin.role == "gate_up"
                                           for lin in spec.block_linears()):
        notes.append("Liger's SwiGLU on a fused gate_up projection is not modelled: the MLP "
                     "is planned as transformers runs it (its RMSNorm, RoPE and loss are "
                     "Liger's)")
    if spec.is_moe and plan.moe_experts == "unquantized" and plan.method == "qlora":
        notes.append("MoE experts are 3-D tensors that bitsandbytes leaves unquantized "
                     "(transformers 5); --moe-experts quantized for stacks that quantize them")
    components = Components(
        **breakdown,
        optimizer_paged=paged,
        allocator_slack=slack,
        cuda_context=CUDA_CONTEXT,
    )
    # every phase attributed as the peak phase is (the program's phase peak spread over the
    # formula's candidate for it, `_program_breakdown`), for multi_gpu's per-phase placement
    outside = {"optimizer_paged": paged, "allocator_slack": slack, "cuda_context": CUDA_CONTEXT}
    phase_components = {phase: {**Components(**(
        breakdown if phase == peak_phase else
        _program_breakdown(candidates[phase_of[phase]], phases[phase])
        if replay and step_program_covers(spec, plan) else candidates[phase_of[phase]]),
        **outside).model_dump()} for phase in phases}
    return Estimate(
        model=spec.name,
        params=spec.num_params(),
        trainable_params=trainable_param_count(spec, plan),
        components=components,
        phases=phases,
        peak_phase=peak_phase,
        peak_allocated_bytes=peak_allocated,
        peak_reserved_bytes=peak_reserved,
        peak_device_bytes=peak_device,
        required_device_bytes=required_device,
        required_device_low_bytes=required_low,
        paged_bytes=paged,
        notes=tuple(notes),
        planned_as=planned_as,
        phase_components=phase_components,
        host_bytes=host,
    )


def required_bytes(spec: ModelSpec, plan: TrainPlan, formula: Estimate | None = None, *,
                   replay: bool = True) -> tuple[int, int]:
    """`estimate(spec, plan)`'s required_device_bytes and required_low, byte for byte,
    without the allocator's replay: what a verdict and a search read (sizing.verdict).

    They rest on the required peak (`estimate`): where the step program covers the plan,
    the largest of the formula's load phase and the program's requested peaks, which do
    not depend on where a request lands (program.step.requested_peak reads them off the
    requests alone); elsewhere the formula's peak. Everything added to it (the allocator
    band, the CUDA context, the paged optimizer) is the same as in the formula's estimate
    (`formula`: `estimate(spec, plan, replay=False)`, made here if not given), so each is
    the formula's, shifted by the difference of the two peaks. Not for a corrected
    estimate (corrections.factors.corrected reads the replay's allocated peak).
    `replay=False`: the formula's own, as `estimate(..., replay=False)` gives them.
    tests/memory/test_required_bytes.py compares with `estimate` on the catalog."""
    if formula is None:
        formula = estimate(spec, plan, replay=False)
    effective, _, _ = effective_train_plan(spec, plan)
    if not replay or not step_program_covers(spec, effective):
        return formula.required_device_bytes, formula.required_low
    shift = (max(formula.phases["load"], requested_peak(spec, effective))
             - max(formula.phases.values()))
    return formula.required_device_bytes + shift, formula.required_low + shift
