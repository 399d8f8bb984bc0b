"""How long one training step takes: FLOPs and bytes per kernel class, on a GPU's peaks.

Pure arithmetic on the spec and the plan, like `estimate`: no torch. Two halves:

- `train_work(spec, plan)` counts what a step does, independent of the GPU: for each kernel
  class the FLOPs, the bytes moved through GPU memory and the number of kernels, plus the
  host (CPU) work that launches them. The classes:
  - `block_matmuls`: the decoder Linears. Forward 2 x tokens x in x out FLOPs per Linear
    (the 2N-per-token forward of Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models", section 2.1, and Hoffmann et al. 2022 (Chinchilla) appendix F's 6N = forward
    2N + backward 4N); the backward's input gradient costs another forward, its weight
    gradient a third, only where the weights train (full fine-tuning). Gradient
    checkpointing (non-reentrant) runs every block's forward again inside backward.
  - `moe_experts`: transformers 5's fused experts (`torch._grouped_mm`): the active
    experts' FLOPs (top-k per token), every expert's weights read per pass.
  - `lm_head`: 2 x tokens x hidden x vocab, its input gradient, its weight gradient when
    it trains (full); never recomputed (it is outside the checkpointed blocks).
  - `logits_loss`: transformers `ForCausalLMLoss` upcasts the logits to fp32
    (`logits.float()`) and runs `cross_entropy`: memory-bound passes over tokens x vocab.
  - `attention`: the S^2 term. sdpa/flash (FlashAttention-2, Dao 2023, section 3.1: forward
    4 x S^2 x d per head, backward 2.5 x forward; a causal mask skips half the blocks);
    eager computes the whole square and moves the scores through memory (softmax in fp32,
    `eager_attention_forward` in transformers' modeling files); a materialised mask
    (sliding window under sdpa) runs the whole square too.
  - `elementwise`: RMSNorm/LayerNorm, rotary, the MLP activation, residual adds and
    dropouts, counted in bytes per element from transformers' modeling_llama.py
    (`LlamaRMSNorm.forward`, `apply_rotary_pos_emb`, `LlamaMLP.forward`).
  - `dequant`: bitsandbytes 4-bit (`functional.dequantize_4bit`: reads the packed half-byte
    weights and absmax, writes the full 16-bit weight, once per Linear per pass: forward,
    recompute, and `MatMul4Bit.backward`) and int8 (`MatMul8bitLt`: the activations
    quantized row-wise each forward, and in backward `CB.to(dtype) * SCB / 127` makes the
    16-bit weight for the input gradient).
  - `int8_matmuls`: LLM.int8's forward GEMM on int8 tensor cores.
  - `lora`: peft's adapters (`lora_B(lora_A(dropout(x))) * scaling` added to the base
    output): skinny GEMMs, memory-bound; they always train (weight gradients).
  - `casts`: autocast's 16-bit copies of fp32 weights (full fine-tuning with fp32 master
    weights; the fp32 lm_head after `prepare_model_for_kbit_training`).
  - `optimizer`: bytes per trainable parameter per optimizer variant (`_optimizer_bytes`),
    plus HF Trainer's gradient clipping (`clip_grad_norm_`, max_grad_norm=1.0);
    bitsandbytes' 8-bit blockwise update is SM-bound work after that (`BNB8_LANE_CYCLES`).
- `step_time(work, speed)` puts a GPU under it: each class takes
  max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency), kernels x floor);
  the host launches the kernels meanwhile, so forward+backward takes the longer of the GPU
  and the host, and the optimizer likewise; HF Trainer synchronizes between them (its
  `logging_nan_inf_filter` reads the loss), and a fixed per-step cost comes on top. Where
  the host waits for the GPU inside a phase the overlap breaks: bitsandbytes optimizers'
  synchronize after every tensor makes the optimizer's host and GPU time add, and int8's
  outlier check in every Linear's forward cuts the forward into stretches, one per
  Linear, each as long as the longer of its host and GPU share.

What it ignores: the data loader (the batch is ready), communication between GPUs, torch
compile / fused kernels (unsloth, liger), power throttling, the first step's warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from vramcalc.memory.effective import attention_impl, effective_train_plan
from vramcalc.memory.program.trainable import lora_on_experts, lora_targets, trainable_tensors
from vramcalc.memory.program.weights import fused_experts
from vramcalc.models.spec import ModelSpec, layer_windows
from vramcalc.plans import TrainPlan

TimeBasis = Literal["measured", "derived", "calibrated"]
Peak = Literal["tensor16", "fp32", "int8"]

# ---- bytes per element of the memory-bound passes (forward; backward = BACKWARD_BYTES x) --
# LlamaRMSNorm.forward: .to(float32) r2 w4; pow(2).mean r4 w4 r4; * rsqrt r4 w4;
# weight * .to(dtype) r4 w2 r2 w2 (per hidden element, 16-bit activations).
NORM_BYTES = 36
# residual add: r2 r2 w2.
RESIDUAL_BYTES = 6
# apply_rotary_pos_emb on q and k: q * cos (r2 w2), rotate_half (slice, neg, cat: r2 w2
# r2 w2), * sin (r2 w2), + (r2 r2 w2).
ROTARY_BYTES = 18
# LlamaMLP: act_fn(gate) (r2 w2) * up (r2 r2 w2).
GATED_ACT_BYTES = 10
PLAIN_ACT_BYTES = 4
# transformers' NewGELUActivation ("gelu_new", phi-2; activations.py, 5.25) is Python:
# 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3)))): eight elementwise kernels
# in forward, eleven in backward (the gradients of each, summed into x's), per element of
# the MLP's intermediate: 36 bytes forward, 56 backward (bf16; counted with
# calibration/count_act_bytes.py, which sums every non-view operator's tensor inputs and
# outputs; the fused silu / gelu / gelu_pytorch_tanh count 4 and 6 there).
PY_GELU_FWD_BYTES = 36
PY_GELU_BWD_BYTES = 56
PY_GELU_ACTS = frozenset({"gelu_new"})
# nn.Dropout: r2 w2 and a 1-byte mask.
DROPOUT_BYTES = 5
# A backward pass reads the saved input and the incoming gradient and writes a gradient:
# about twice a forward's traffic.
BACKWARD_BYTES = 2.0
# transformers ForCausalLMLoss: logits.float() (r2 w4), log_softmax (r4 w4), nll; backward:
# softmax grad (r4 w4), to 16-bit (r4 w2): per logit element.
LOSS_BYTES = 28
# Gemma-2's final soft capping: logits / cap, tanh, * cap (three fp32 passes) and backward.
SOFTCAP_BYTES = 24
# Eager attention per score element: matmul output w2, softmax in fp32 (r2 w4, r4 w4),
# .to(dtype) (r4 w2), read by probs @ v (r2); backward about twice.
EAGER_SCORE_BYTES = 24
# FlashAttention-2 (section 3.1): backward = 2.5 x forward FLOPs.
FLASH_BACKWARD_FACTOR = 2.5
# bitsandbytes dequantize_4bit: r 0.5 (packed), w 2 per weight (absmax: 1/64 of that).
DEQUANT4_BYTES = 2.5 + 4 / 64
# int8 backward weight: CB.to(dtype) r1 w2; .mul_(SCB / 127) r2 w2.
DEQUANT8_BYTES = 7.0
# MatMul8bitLt forward per input element (bitsandbytes backends/cuda/ops.py
# int8_vectorwise_quant): A.to(float16) r2 w2, A.abs() r2 w2, >= threshold r2 w1,
# any(dim=0) r1, the row-wise quantization r2 w1; per output element the int32 -> 16-bit
# dequant of int8_mixed_scaled_mm r4 w2.
INT8_ACT_IN_BYTES = 15
INT8_ACT_OUT_BYTES = 6
# Optimizer element accesses per trainable parameter, times its state bytes (see
# `_optimizer_bytes`): torch foreach AdamW (torch/optim/adamw.py `_multi_tensor_adamw`:
# lerp_ 3, mul_ 2, addcmul_ 3, sqrt 2, div_ 2, add_ 2, addcdiv_ 4, weight decay mul_ 2 =
# 20); fused AdamW one kernel (r p g m v, w p m v = 7); bitsandbytes 8-bit blockwise
# (r p g, w p in the parameter dtype, r/w two 1-byte states); paged 32-bit (fp32 states);
# SGD without momentum (r p g, w p).
CLIP_ACCESSES = 3  # clip_grad_norm_: the norm reads every gradient, the scale r/w it
# bitsandbytes 0.50.2's 8-bit blockwise update (csrc kOptimizerStatic8bit2StateBlockwise,
# BLOCKSIZE_2STATE 256, NUM_2STATE 1): one element per thread, each 256-element block loads
# the two 256-entry quantile maps into shared memory, dequantizes through them, reduces two
# absmax values across the block (CUB BlockReduce), re-quantizes by a search in the maps,
# with ten __syncthreads per block; its loads are 1- and 2-byte per thread. It does not
# stream: its 10 bytes per element (bf16) would take 4.7 ms per G elements on an H100 at
# the memory efficiency, and run 30's full fine-tuning points imply 25-33 ms (30-40 G
# elements/s: u0/1, u1/1, u3/1 without checkpointing and the 4-layer u4/0; seen data,
# docs/time-model.md). The work is the SMs' (latency of the block's barriers and lookups
# times blocks), so it is timed on the SMs' issue rate, the fp32 peak (SMs x clock x fp32
# lanes): BNB8_LANE_CYCLES fp32-lane cycles per element, 67 TFLOP/s / 35 G elements/s
# on the H100 SXM (15 SM cycles per element at 128 lanes), or its bytes at the memory
# efficiency if that is longer.
BNB8_LANE_CYCLES = 1900.0
# The 32-bit path (kOptimizer32bit2State: 4 elements per thread, 1024 threads) streams.
# bitsandbytes keeps tensors under `min_8bit_size` (4096 elements, optim/optimizer.py
# Optimizer2State.init_state) in 32-bit states, and HF Trainer registers every nn.Embedding
# weight for 32-bit states (`register_module_override(module, "weight", {"optim_bits":
# 32})`, transformers trainer.py Trainer.create_optimizer, for bitsandbytes optimizers with
# optim_bits 8): 3 x d + 16 bytes per parameter, as paged 32-bit.
BNB8_MIN_SIZE = 4096
# Launches and host time (eager PyTorch). The host issues every operator from Python
# through the dispatcher (and records its autograd node in forward); the GPU runs the
# kernels meanwhile. The counts are dispatched operators (aten ops, views included, and
# bitsandbytes' torch.library ops with their ctypes launches), counted with a
# TorchDispatchMode over forward and backward of transformers 5.25's Llama block under
# autocast (peft 0.21.2 LoRA, non-reentrant checkpointing; tools: calibration/count_ops.py):
# the kernels per decoder layer are about the same as the dispatched ops.
KERNELS_PER_LAYER_FWD = 30
KERNELS_PER_LAYER_BWD = 45
OPS_LAYER_FWD = 77  # Llama block forward, use_cache off (norms, rotary, sdpa, MLP, adds)
OPS_LAYER_BWD = 142  # its backward with every weight trained (full fine-tuning)
OPS_WGRAD = 3  # per trained Linear or norm weight: its gradient's mm/sum, t, accumulate
# Other blocks, per layer (forward, backward) beyond Llama's, counted the same way:
OPS_BIAS_BWD = 3  # per Linear with a bias (Qwen2's q/k/v): its gradient's sum
OPS_QK_NORM = (18, 40)  # Qwen3's per-head q_norm and k_norm
OPS_NORM = (9, 14)  # each norm beyond two (Gemma-2's four)
OPS_EAGER = (25, 24)  # eager attention instead of sdpa (Llama block counted both ways)
OPS_SOFTCAP = (12, 20)  # the rest of Gemma-2's count: soft capping, sliding-window masks
# Gemma's (1) block beyond Llama's: GemmaRMSNorm's `* (1.0 + self.weight.float())`, GeGLU
# (count_ops.py gemma, transformers 5.25: 81 forward, 144 backward; run 32 timed gemma-2b)
OPS_GEMMA = (4, 2)
# non-reentrant checkpointing's recompute beyond the forward's own operators (the saved-
# tensor hooks): 57 for the Llama block, 75 with LoRA on its 7 Linears; more for blocks
# with more operators (Qwen3 77, Gemma-2 79): 57 + 3 per LoRA module + half the extra
OPS_CKPT_LAYER = 57
# phi-2's PhiDecoderLayer (transformers 5.25 modeling_phi.py; calibration/count_ops.py phi):
# forward 70, backward 132 with every weight and bias trained; the checkpoint's own
# operators in backward 38 (+ 3 per LoRA module, as Llama's)
OPS_PHI_LAYER = (70, 132)
OPS_PHI_CKPT = 38
OPS_CKPT_LORA = 3
# embedding, final norm, lm_head, loss: forward 48 (36 with a tied head) and backward 37
OPS_STEP_FWD = 48
OPS_STEP_BWD = 37
# peft LoraLayer.forward per targeted module: _cast_input_dtype (x to the fp32 adapters'
# dtype), dropout, lora_A and lora_B under autocast (weight and input casts), * scaling,
# the add, result.to(dtype): 18 forward, 23 backward (counted as above, the frozen base's
# own backward without its weight gradients); lora_dropout 0 is nn.Identity (one fewer
# each way)
OPS_LORA_FWD = 18
OPS_LORA_BWD = 23
# bitsandbytes 0.50.2 Linear4bit per Linear (nn/modules.py Linear4bit.forward,
# autograd/_functions.py MatMul4Bit, backends/cuda/ops.py gemm_4bit ->
# _dequant_linear_fallback for more than 1536 rows): x.to(compute dtype), the Function,
# the gemm_4bit op, the nested absmax (empty_like, dequantize_blockwise launch, + offset),
# empty, dequantize_4bit launch, linear, .to(input dtype); peft's Linear4bit
# `result.clone()`: 12. Backward (MatMul4Bit.backward): dequantize_4bit again through
# functional.dequantize_4bit (dequantize_blockwise op, += offset, dequantize_4bit op, their
# empties and launches), matmul, the two casts' backward: 11.
OPS_NF4_FWD = 12
OPS_NF4_BWD = 11
# Linear8bitLt / MatMul8bitLt (autograd/_functions.py) per Linear: reshape, A.to(float16),
# int8_vectorwise_quant (2 empty, abs, >=, any, launch: backends/cuda/ops.py),
# int8_mixed_scaled_mm (numel, empty), int8_scaled_mm -> int8_linear_matmul (empty,
# cublasLt launch) and int8_mm_dequant (empty, launch), each a torch.library op; reshape:
# 22. Backward: CB.to(dtype_A), SCB.unsqueeze, mul, mul_, grad.to, matmul, reshapes: 10.
OPS_INT8_FWD = 22
OPS_INT8_BWD = 10
KERNELS_PER_LORA_FWD = 7  # dropout, A, B, scaling, add, autocast casts of A and B
KERNELS_PER_LORA_BWD = 10
KERNELS_PER_DEQUANT4 = 3  # nested absmax, + offset, dequantize_4bit per Linear per pass
# int8 per Linear, besides its GEMM: forward quantize A, outlier columns, output dequant;
# backward CB.to(dtype), mul_(SCB / 127) (the small abs / >= / any kernels of the outlier
# check are in the host's serial forward)
KERNELS_PER_INT8_FWD = 3
KERNELS_PER_INT8_BWD = 2
KERNEL_FLOOR_S = 3e-6  # the shortest kernel on the GPU, launch to end
# Host seconds per dispatched operator. Until run 31 one cost for every operator: 13 us
# from run 28's host-bound points, 14 us from runs 28 and 30 together. Since run 31
# (docs/time-model.md, "Time holdout 3"): an operator issued from Python (the forward, the
# recompute, the checkpoint's hooks, bitsandbytes' Python autograd backward) costs the host
# more than one the autograd engine's C++ thread issues in backward (one cost for both left
# every checkpointed point under-predicted against its no-ckpt twin).
# Since run 32 (time holdout 4): the four H100 SXM hosts seen (runs 28, 30, 31, 32; same
# card name, same torch 2.11 / transformers 5.17 / peft 0.21 / bitsandbytes 0.50.2) differ
# per operator by up to 1.8x (fitted per run: 0.87, 1.05, 0.77, 1.36 of the constants
# below), and the time worker's probe does not say which host is which (HOST_PROBE_REF_S),
# so the constants are the centre of the four (the geometric mean of the per-run factors
# is 0.99), with the engine-to-Python ratio that fits the four runs with a factor each
# (0.61; runs 28-31 alone wanted 0.5-0.6, run 32 alone 0.65-0.75): a host-bound prediction is
# good to about +-30 % on an unknown host of this kind (seen data, docs/time-model.md).
HOST_FWD_OP_S = 18e-6
HOST_BWD_OP_S = 11e-6
# The time worker's host probe (calibrate/time_worker.py host_probe: seconds per `x.add_(1)`
# on the GPU, no autograd, 3 x 2,000 operators once at the process's start). Holdout 4
# tested whether host time follows it: it does not. On run 32's one machine the five
# processes probed 6.7-10.3 us while their host-bound points wanted factors that do not
# follow it (gemma-2b probed 10.3 us and wanted 1.36x run 28's host, llama-2-13b 6.7 us
# and 1.12-1.53x, qwen3-1.7b 6.9 us and 1.10-1.81x), and across machines the probe moved 1.17x
# (run 31's median 6.2 us, run 32's 7.3 us) where the steps' operators moved 1.8x (0.77 vs
# 1.36). Probe / fitted factor: run 31 8.1 us, run 32 5.3 us; HOST_PROBE_REF_S is their
# geometric mean, for `bench/time_accuracy.py --host-probe` only: not a calibration.
HOST_PROBE_REF_S = 6.6e-6


def host_factor_of_probe(probe_s: float) -> float:
    """Host time relative to the reference host (HOST_FWD_OP_S, HOST_BWD_OP_S) of a machine
    whose time-worker probe measured `probe_s` seconds per operator."""
    return probe_s / HOST_PROBE_REF_S
# int8's `if outliers.any()` (bitsandbytes 0.50.2 backends/cuda/ops.py
# int8_vectorwise_quant, called by MatMul8bitLt.forward on each Linear's input before its
# int8 GEMM) copies a flag to the host in every Linear's forward: the host waits for the
# GPU, and the GPU then idles until the host has issued the next kernels (a round trip per
# sync, HOST_SYNC_S: a prior). Between two syncs the two still overlap: the stretch from
# one Linear's quantization to the next's holds that Linear's GEMM and the operators up to
# the next Linear, and takes the longer of its host and its GPU time (StepWork
# .serial_segments; the GPU's forward spread over the Linears by their weights, the host's
# evenly). Until run 32 the whole forward was host + GPU: int8 was over-predicted on every
# run (median signed +5.3, +7.8, +7.7, +11.2 % on runs 28, 30, 31, 32, each on its own
# host; these constants); by stretches -4.6, -2.3, -3.9, +3.0 % (seen data,
# docs/time-model.md).
HOST_SYNC_S = 20e-6
HOST_STEP_S = 6e-3  # HF Trainer per step: inputs to device, callbacks, scheduler, loss sync
HOST_STEP_PLAIN_S = 1e-3  # a plain loop: the batch to the device, zero_grad
HOST_OPT_TENSOR_S = {  # host time per trainable tensor in the optimizer step
    "adamw_torch": 4e-6, "adamw_torch_fused": 2e-6, "sgd": 3e-6,
    "adamw_8bit": 35e-6, "paged_adamw_8bit": 50e-6, "paged_adamw_32bit": 50e-6,
}  # torch groups tensors (foreach / fused); bitsandbytes runs one Python update per tensor
# (optim/optimizer.py Optimizer8bit.step: update_step, then sync_gpu(p) =
# torch.cuda.synchronize() after every parameter; paged states add two prefetch calls)
BNB_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})
HOST_CLIP_TENSOR_S = 2e-6
# peft LoRA per input element of a targeted Linear (layer.py Linear.forward): the adapters
# are fp32 (get_peft_model's autocast_adapter_dtype), so `_cast_input_dtype` makes an fp32
# copy of a 16-bit x (r2 w4), dropout runs in fp32 (r4 w4, a 1-byte mask), autocast casts
# the dropped input back to 16-bit for lora_A (r4 w2), which reads it (r2). Backward: the
# casts' and dropout's gradients (r2 w4, r4 r1 w4, r4 w2), the add into x's gradient
# (r2 r2 w2) and lora_A's weight gradient reading its input (r2).
LORA_CAST_IN_BYTES = 6  # the fp32 copy of a 16-bit input (absent when x is fp32 already)
LORA_DROPOUT_FWD_BYTES = 9
LORA_AUTOCAST_IN_BYTES = 8
LORA_IN_BWD_BYTES = 29
LORA_DROPOUT_BWD_BYTES = 9
# int8 under an fp32 residual stream (prepare_model_for_kbit_training casts norms and
# embeddings to fp32): MatMul8bitLt's ctx.dtype_A is fp32, so backward builds an fp32
# weight (`state.CB.to(ctx.dtype_A, copy=True).mul_(...)`: r1 w4, r4 w4) and runs the
# input gradient as an fp32 matmul outside autocast (the autograd engine's thread): on the
# fp32 peak (TF32 off). Linears fed by sdpa's 16-bit output (o) stay 16-bit.
DEQUANT8_FP32_BYTES = 13.0
# Linear4bit.forward with an fp32 input: x.to(bf16) (r4 w2) and the output
# .to(input dtype) (r2 w4); backward the two casts again.
NF4_CAST_BYTES = 6
# GEMM efficiency falls for few rows (tile quantization): efficiency x M / (M + GEMM_M_HALF).
GEMM_M_HALF = 128
# _grouped_mm over many small experts reaches a fraction of a dense GEMM.
GROUPED_MM_FACTOR = 0.5


class KernelClass(NamedTuple):
    """One class of kernels of a step: what it computes and moves, on which peak."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    peak: Peak = "tensor16"
    gemm_rows: int = 0  # rows (tokens) of its GEMMs: 0 = not GEMMs
    # work of an SM-bound kernel run after the rest (bnb 8-bit): fp32-lane cycles, timed on
    # the fp32 peak, or its bytes at the memory efficiency if those take longer
    sm_ops: float = 0.0
    sm_bytes: float = 0.0
    grouped: bool = False
    forward_share: float = -1.0  # its forward passes' share of its time; < 0: by passes


class StepWork(NamedTuple):
    """What one optimizer step does, before any GPU is chosen."""

    tokens: int
    classes: tuple[KernelClass, ...]
    optimizer: KernelClass
    host_fwd_bwd_s: float
    host_optimizer_s: float
    host_forward_s: float = 0.0  # the forward passes' share of host_fwd_bwd_s
    serial_forward: bool = False  # the forward waits for the GPU in every layer (int8)
    forward_passes: int = 1  # forward passes (2 under checkpointing) of the blocks
    host_syncs_s: float = 0.0  # round trips of the forward's device-to-host syncs
    # serial_forward: the stretches between two syncs, each one Linear's share of the
    # forward's GPU time (its weights' share of the block's: its GEMM dominates the stretch)
    serial_segments: tuple[float, ...] = ()
    serial_optimizer: bool = False  # a synchronize after every tensor (bitsandbytes)
    host_step_s: float = HOST_STEP_S

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.classes) + self.optimizer.flops

    def of(self, name: str) -> KernelClass:
        for c in (*self.classes, self.optimizer):
            if c.name == name:
                return c
        raise KeyError(name)


class GpuSpeed(NamedTuple):
    """A GPU's dense peaks (FLOP/s per dtype, bytes/s) and the share of them a step reaches.

    `tensor16` is the dense bf16 (or fp16 where the card has no bf16) tensor-core rate with
    fp32 accumulation, `fp32` the non-tensor fp32 rate (PyTorch's default leaves TF32 off for
    matmuls), `int8` the dense int8 tensor-core rate (None: no int8 tensor cores).
    """

    name: str
    architecture: str
    tensor16_flops: float
    fp32_flops: float
    bandwidth: float  # bytes/s
    matmul_efficiency: float
    attention_efficiency: float
    memory_efficiency: float
    int8_ops: float | None = None
    host_factor: float = 1.0  # host time relative to the reference machine (H100 host)
    basis: TimeBasis = "derived"

    def peak(self, which: Peak) -> float:
        if which == "int8":
            return self.int8_ops or self.tensor16_flops
        return self.tensor16_flops if which == "tensor16" else self.fp32_flops


class ClassTime(NamedTuple):
    name: str
    seconds: float
    bound: Literal["compute", "memory", "launch"]


class StepTime(NamedTuple):
    """Seconds of one step on one GPU, and what bounds each kernel class."""

    gpu: str
    basis: TimeBasis
    tokens: int
    step_seconds: float
    gpu_seconds: float
    host_seconds: float
    classes: tuple[ClassTime, ...]
    # the step's wall time split: its first forward (before backward begins), the rest of
    # forward+backward (recompute and backward), and the optimizer step; step_seconds is
    # their sum plus the fixed per-step cost (timing/parallel_time.py overlaps the
    # collectives of several GPUs with the first two)
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    optimizer_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds


# ---- counting --------------------------------------------------------------------------


def _dtype_bytes(name: str) -> int:
    return 4 if name == "fp32" else 2


def _attention(spec: ModelSpec, plan: TrainPlan, impl: str, passes_fwd: int
               ) -> KernelClass:
    # padding-free rows under eager or sdpa: one row of the step's tokens, computed whole
    # under its block-causal mask (TrainPlan.rows, attention_masked); flash attention's
    # varlen kernel works per sequence (at most seq_len each)
    b, s = plan.rows if impl != "flash_attention_2" else (plan.batch_size, plan.seq_len)
    heads, d = spec.num_attention_heads, spec.head_size
    flops = 0.0
    nbytes = 0.0
    for window in layer_windows(spec):
        # sdpa gets a materialised mask (specs.sliding_past_window); flash-attention-2 runs
        # the window natively (a narrower band of blocks)
        masked = impl == "sdpa" and (plan.attention_masked
                                     or (window is not None and s >= window))
        if impl == "eager":
            fwd = 4.0 * b * heads * s * s * d
            flops += fwd * (passes_fwd + 2.0)  # backward: 4 matmuls
            score = b * heads * s * s * EAGER_SCORE_BYTES
            nbytes += score * (passes_fwd + BACKWARD_BYTES)
            if spec.attn_logit_softcapping:
                nbytes += b * heads * s * s * SOFTCAP_BYTES * (passes_fwd + 1)
        else:
            causal = 1.0 if masked else 0.5
            fwd = 4.0 * b * heads * s * s * d * causal
            flops += fwd * (passes_fwd + FLASH_BACKWARD_FACTOR)
            if masked:
                nbytes += b * s * s * (passes_fwd + 1)  # the bool mask, read per pass
        # q, k, v, output and their gradients pass through memory once per pass
        qkv = b * s * (spec.q_size + 2 * spec.kv_size) * 2
        nbytes += qkv * (passes_fwd + 2)
    return KernelClass(name="attention", flops=flops, bytes=nbytes,
                       kernels=spec.num_hidden_layers * (passes_fwd * 2 + 3), gemm_rows=0)


def _elementwise(spec: ModelSpec, plan: TrainPlan, passes_fwd: int, act_bytes: int
                 ) -> KernelClass:
    """Norms, residual adds, rotary, the MLP activation, dropouts. The residual stream is
    fp32 where the norms' weights are (QLoRA: `prepare_model_for_kbit_training` casts them
    and the embeddings to fp32; full fine-tuning with fp32 weights): `weight *
    hidden.to(dtype)` then returns fp32, so norms and residual adds move twice the bytes."""
    h, i = spec.hidden_size, spec.intermediate_size
    if spec.is_moe:
        i = spec.expert_intermediate_size * spec.num_experts_per_tok
    norms = spec.norms_per_layer * NORM_BYTES * h
    if spec.qk_norm:  # Qwen3's q_norm / k_norm run over every head of q and k
        norms += NORM_BYTES * (spec.q_size + spec.kv_size)
    resid = 2 * RESIDUAL_BYTES * h
    rotary = ROTARY_BYTES * (spec.q_size + spec.kv_size)
    act = (GATED_ACT_BYTES if spec.mlp_layout != "plain" else PLAIN_ACT_BYTES) * i
    py_gelu = spec.hidden_act in PY_GELU_ACTS
    if py_gelu:  # counted per pass below, its backward as counted (not 2x its forward)
        act = 0
    drop = 0.0
    if spec.resid_dropout:
        drop += 2 * DROPOUT_BYTES * h
    stream = 4 if plan.param_dtype == "fp32" else act_bytes
    per_token = (norms + resid + drop) * stream / 2 + (rotary + act) * act_bytes / 2
    fwd = per_token * plan.tokens * spec.num_hidden_layers
    nbytes = fwd * (passes_fwd + BACKWARD_BYTES)
    if py_gelu:
        nbytes += (PY_GELU_FWD_BYTES * passes_fwd + PY_GELU_BWD_BYTES) * act_bytes / 2 \
            * i * plan.tokens * spec.num_hidden_layers
    return KernelClass(name="elementwise", bytes=nbytes)


def _optimizer_bytes(optimizer: str, dtype_bytes: int) -> float:
    d = dtype_bytes
    if optimizer == "adamw_torch":
        return 20 * d
    if optimizer == "adamw_torch_fused":
        return 7 * d
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 3 * d + 4
    if optimizer == "paged_adamw_32bit":
        return 3 * d + 16
    return 3 * d  # sgd


def _block_ops(spec: ModelSpec, impl: str, full: bool) -> tuple[int, int, float]:
    """Dispatched operators of one decoder block's forward and backward (the OPS_* counts):
    without weight and bias gradients when the base is frozen; and the checkpoint hooks'
    operators in backward under checkpointing (OPS_CKPT_LAYER, scaled to the block)."""
    linears = spec.block_linears()
    biases = sum(1 for lin in linears if lin.bias)
    if spec.model_type == "phi":
        # PhiDecoderLayer (modeling_phi.py): one LayerNorm, parallel attention and MLP,
        # partial rotary, gelu_new, biases on every Linear: counted whole (OPS_PHI_LAYER)
        fwd, bwd = OPS_PHI_LAYER
        hooks = float(OPS_PHI_CKPT)
        if impl == "eager":
            fwd += OPS_EAGER[0]
            bwd += OPS_EAGER[1]
        if not full:
            bwd -= OPS_WGRAD * (len(linears) + spec.norms_per_layer) + OPS_BIAS_BWD * biases
        return fwd, bwd, hooks
    fwd, bwd = OPS_LAYER_FWD, OPS_LAYER_BWD
    bwd += OPS_BIAS_BWD * biases
    extra_norms = max(0, spec.norms_per_layer - 2)
    fwd += extra_norms * OPS_NORM[0]
    bwd += extra_norms * OPS_NORM[1]
    if spec.qk_norm:
        fwd += OPS_QK_NORM[0]
        bwd += OPS_QK_NORM[1]
    if spec.model_type == "gemma":
        fwd += OPS_GEMMA[0]
        bwd += OPS_GEMMA[1]
    if impl == "eager":
        fwd += OPS_EAGER[0]
        bwd += OPS_EAGER[1]
        if spec.attn_logit_softcapping:
            fwd += OPS_SOFTCAP[0]
            bwd += OPS_SOFTCAP[1]
    if not full:  # frozen: no weight or bias gradients for the Linears and the norms
        bwd -= OPS_WGRAD * (len(linears) + spec.norms_per_layer) + OPS_BIAS_BWD * biases
    return fwd, bwd, OPS_CKPT_LAYER + (fwd - OPS_LAYER_FWD) / 2


def train_work(spec: ModelSpec, plan: TrainPlan) -> StepWork:
    """FLOPs, bytes, kernels and host time of one optimizer step of `plan` (see the module
    docstring for what each class counts); the plan the stack really runs
    (`effective_train_plan`) is what is counted."""
    plan, _, _ = effective_train_plan(spec, plan)
    impl = attention_impl(spec, plan.attn)
    t = plan.tokens
    layers = spec.num_hidden_layers
    full = plan.method == "full"
    ckpt = plan.gradient_checkpointing
    passes_fwd = 2 if ckpt else 1  # forward + the recompute inside backward
    act = 4 if (plan.compute_dtype == "fp32") else 2
    wdt = _dtype_bytes(plan.load_dtype)
    gemm_peak: Peak = "fp32" if plan.compute_dtype == "fp32" else "tensor16"
    quant = plan.quant if plan.method == "qlora" else "none"

    linears = spec.block_linears()
    n_lin = len(linears)
    numel = sum(lin.in_features * lin.out_features for lin in linears)
    io = sum(lin.in_features + lin.out_features for lin in linears)
    # GEMMs per Linear: forward(s), input gradient, weight gradient when trained
    fwd_gemms = passes_fwd
    bwd_gemms = 1 + (1 if full else 0)
    # Weights as the GEMM reads them: 16-bit (dequantized, autocast copies or the load
    # dtype), fp32 only when the compute dtype is
    gemm_w = 4 if plan.compute_dtype == "fp32" else 2
    classes: list[KernelClass] = []

    # the residual stream is fp32 under prepare_model_for_kbit_training (norms and
    # embeddings cast to fp32): the norms hand the Linears fp32 inputs, sdpa (autocast)
    # hands o_proj a 16-bit one; a quantized Linear's output keeps its input's dtype
    stream32 = plan.param_dtype == "fp32"  # TrainPlan.param_dtype: the norms' and embeddings'

    fp32_in = [lin for lin in linears if stream32 and lin.role != "o"]
    numel32 = sum(lin.in_features * lin.out_features for lin in fp32_in) \
        if quant == "int8" and plan.compute_dtype != "fp32" else 0
    io32 = sum(lin.in_features + lin.out_features for lin in fp32_in) if numel32 else 0
    mm16_gemms = (0 if quant == "int8" else fwd_gemms) + bwd_gemms
    mm16_flops = 2.0 * t * (numel * mm16_gemms - numel32)
    classes.append(KernelClass(
        name="block_matmuls", flops=mm16_flops * layers,
        bytes=layers * (mm16_gemms * (numel * gemm_w + t * io * act)
                        - numel32 * gemm_w - t * io32 * act),
        kernels=layers * n_lin * mm16_gemms, peak=gemm_peak, gemm_rows=t,
        forward_share=(fwd_gemms / mm16_gemms) if quant != "int8" else 0.0))
    if quant == "int8":
        classes.append(KernelClass(
            name="int8_matmuls", flops=2.0 * t * numel * fwd_gemms * layers,
            bytes=layers * fwd_gemms * (numel + t * io),
            kernels=layers * n_lin * fwd_gemms, peak="int8", gemm_rows=t, forward_share=1.0))
        if numel32:
            # MatMul8bitLt.backward: fp32 weight and fp32 input-gradient matmul
            classes.append(KernelClass(
                name="int8_fp32_grad", flops=2.0 * t * numel32 * layers,
                bytes=layers * (numel32 * (DEQUANT8_FP32_BYTES + 4) + t * io32 * 4),
                kernels=layers * len(fp32_in) * 3, peak="fp32", gemm_rows=t,
                forward_share=0.0))

    if spec.is_moe and fused_experts(spec, plan):
        e, k, ei, h = (spec.num_local_experts, spec.num_experts_per_tok,
                       spec.expert_intermediate_size, spec.hidden_size)
        expert_train = full or lora_on_experts(spec, plan)
        gemms = fwd_gemms + 1 + (1 if full else 0)
        flops = 2.0 * t * k * 3 * h * ei * gemms * layers
        router = 2.0 * t * h * e * gemms * layers
        nbytes = layers * gemms * (e * 3 * h * ei * wdt + t * k * (h + 3 * ei) * act)
        classes.append(KernelClass(
            name="moe_experts", flops=flops + router, bytes=nbytes,
            kernels=layers * (6 * gemms + (4 if expert_train else 0)), peak=gemm_peak,
            gemm_rows=max(1, t * k // e), grouped=True))

    # lm_head (tied: the embedding matrix) and the loss
    h, v = spec.hidden_size, spec.vocab_size
    head_gemms = 1 + 1 + (1 if full else 0)
    classes.append(KernelClass(
        name="lm_head", flops=2.0 * t * h * v * head_gemms,
        bytes=head_gemms * (h * v * gemm_w + t * (h + v) * act),
        kernels=head_gemms, peak=gemm_peak, gemm_rows=t))
    loss = LOSS_BYTES + (SOFTCAP_BYTES if spec.final_logit_softcapping else 0)
    classes.append(KernelClass(name="logits_loss", bytes=float(t * v * loss), kernels=8))

    classes.append(_attention(spec, plan, impl, passes_fwd))
    classes.append(_elementwise(spec, plan, passes_fwd, act))

    # dequantization of the quantized base, per Linear per pass
    if quant in ("nf4", "fp4"):
        classes.append(KernelClass(
            name="dequant", bytes=layers * numel * DEQUANT4_BYTES * (fwd_gemms + 1),
            kernels=layers * n_lin * KERNELS_PER_DEQUANT4 * (fwd_gemms + 1)))
        if stream32:  # Linear4bit.forward's casts of an fp32 input and of its output
            cast4 = sum(lin.in_features + lin.out_features for lin in fp32_in)
            classes.append(KernelClass(
                name="quant_casts", bytes=layers * t * cast4 * NF4_CAST_BYTES * (fwd_gemms + 1),
                kernels=layers * len(fp32_in) * 2 * (fwd_gemms + 1),
                forward_share=fwd_gemms / (fwd_gemms + 1)))
    elif quant == "int8":
        # an fp32 input: A.to(float16) reads 4 bytes, int8_mm_dequant writes 4
        extra = 2 if stream32 else 0
        act_bytes = t * sum(lin.in_features * (INT8_ACT_IN_BYTES + extra)
                            + lin.out_features * (INT8_ACT_OUT_BYTES + extra)
                            for lin in linears)
        w_bytes = (numel - numel32) * DEQUANT8_BYTES  # the 16-bit backward weights
        fwd_part = act_bytes * fwd_gemms
        classes.append(KernelClass(
            name="dequant",
            bytes=layers * (w_bytes + fwd_part),
            kernels=layers * n_lin * (KERNELS_PER_INT8_FWD * fwd_gemms
                                      + KERNELS_PER_INT8_BWD),
            forward_share=fwd_part / (w_bytes + fwd_part) if w_bytes + fwd_part else 0.0))

    # LoRA adapters: forward(s), input gradient, weight gradients (they always train)
    targets = lora_targets(spec, plan)
    n_lora = len(targets)
    if targets:
        r = plan.rank
        lflops = sum(2.0 * t * r * (lin.in_features + lin.out_features) for lin in targets)
        fp32_roles = {lin.role for lin in fp32_in}
        drop_f = LORA_DROPOUT_FWD_BYTES if plan.lora_dropout > 0 else 0
        drop_b = LORA_DROPOUT_BWD_BYTES if plan.lora_dropout > 0 else 0
        fwd_b = 0.0
        bwd_b = 0.0
        for lin in targets:
            # a 16-bit input is copied to the adapters' fp32 first (none when fp32 already,
            # or when the compute dtype is fp32 and no autocast casts back)
            # (none either for 16-bit adapters: TrainPlan.adapter_dtype)
            cast_in = 0 if (lin.role in fp32_roles or act == 4
                            or plan.adapter_dtype != "fp32") else LORA_CAST_IN_BYTES
            fwd_b += t * (lin.in_features * (cast_in + drop_f + LORA_AUTOCAST_IN_BYTES)
                          + 4 * lin.out_features * act)
            bwd_b += t * (lin.in_features * (LORA_IN_BWD_BYTES - LORA_DROPOUT_BWD_BYTES
                                             + drop_b)
                          + 2 * lin.out_features * act)
        classes.append(KernelClass(
            name="lora", flops=layers * lflops * (fwd_gemms + 2),
            bytes=layers * (fwd_b * fwd_gemms + bwd_b),
            kernels=layers * n_lora * (KERNELS_PER_LORA_FWD * fwd_gemms + KERNELS_PER_LORA_BWD),
            peak=gemm_peak, gemm_rows=t))

    # autocast copies of fp32 weights (r4 w2 per forward pass)
    cast = 0.0
    cast_kernels = 0
    if plan.compute_dtype != "fp32" and plan.autocast:
        if full and plan.load_dtype == "fp32":
            cast += (numel * layers + h * v * (0 if spec.tie_word_embeddings else 1)) * 6.0 \
                * fwd_gemms
            cast += numel * layers * 10.0  # 16-bit weight gradients into the fp32 .grad
            cast_kernels = (layers * n_lin + 1) * (fwd_gemms + 1)
        elif plan.kbit_upcast:
            # prepare_model_for_kbit_training leaves lm_head (or the tied embedding) fp32
            cast += h * v * 6.0
            cast_kernels = 1
    if cast:
        classes.append(KernelClass(name="casts", bytes=cast, kernels=cast_kernels))

    kernels = (layers * (KERNELS_PER_LAYER_FWD * passes_fwd + KERNELS_PER_LAYER_BWD))
    classes.append(KernelClass(name="other_kernels", kernels=kernels))

    # host: dispatched operators per layer and module (the counts above), the recompute's
    # forward again under checkpointing
    q_fwd, q_bwd = {"int8": (OPS_INT8_FWD, OPS_INT8_BWD), "none": (0, 0)}.get(
        quant, (OPS_NF4_FWD, OPS_NF4_BWD))
    block_f, block_b, block_hooks = _block_ops(spec, impl, full)
    lora_drop = 0 if plan.lora_dropout > 0 else 1
    ops_fwd = block_f + n_lora * (OPS_LORA_FWD - lora_drop) + n_lin * q_fwd
    ops_bwd = block_b + n_lora * (OPS_LORA_BWD - lora_drop)
    # the recompute is a forward again (host_forward_s counts both: under int8 both wait
    # on the syncs), plus the checkpoint's own operators in backward. Python issues the
    # forward passes, the checkpoint's hooks and bitsandbytes' autograd Functions'
    # backward (MatMul4Bit / MatMul8bitLt.backward are Python); the autograd engine's C++
    # thread issues the rest of the backward (HOST_FWD_OP_S vs HOST_BWD_OP_S)
    hooks = (block_hooks + OPS_CKPT_LORA * n_lora) if ckpt else 0.0
    host_fwd = (layers * ops_fwd * passes_fwd + OPS_STEP_FWD) * HOST_FWD_OP_S
    host_bwd = ((layers * (hooks + n_lin * q_bwd)) * HOST_FWD_OP_S
                + (layers * ops_bwd + OPS_STEP_BWD) * HOST_BWD_OP_S)
    # int8: one device-to-host sync per Linear per forward pass (the recompute's too)
    syncs = layers * n_lin * passes_fwd * HOST_SYNC_S if quant == "int8" else 0.0

    tensors = trainable_tensors(spec, plan)
    count = sum(x.copies for x in tensors)
    trainer = plan.loop == "trainer"  # HF Trainer clips gradients; the plain loops do not
    clip = CLIP_ACCESSES if trainer else 0
    opt_bytes = 0.0
    sm_ops = sm_bytes = 0.0  # bitsandbytes' 8-bit blockwise kernel (BNB8_LANE_CYCLES)
    eight = plan.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    for x in tensors:
        n = x.numel * x.copies
        opt_bytes += clip * x.dtype_bytes * n
        if eight and ((x.embedding and plan.trainer_built) or x.numel < BNB8_MIN_SIZE):
            opt_bytes += _optimizer_bytes("paged_adamw_32bit", x.dtype_bytes) * n
        elif eight:
            sm_ops += BNB8_LANE_CYCLES * n
            sm_bytes += _optimizer_bytes(plan.optimizer, x.dtype_bytes) * n
        else:
            opt_bytes += _optimizer_bytes(plan.optimizer, x.dtype_bytes) * n
    per_tensor = (HOST_OPT_TENSOR_S.get(plan.optimizer, 4e-6)
                  + (HOST_CLIP_TENSOR_S if trainer else 0.0))
    opt_kernels = count if plan.optimizer in BNB_OPTIMIZERS else 0
    optimizer = KernelClass(name="optimizer", bytes=opt_bytes, kernels=opt_kernels + 20,
                            sm_ops=sm_ops, sm_bytes=sm_bytes)
    return StepWork(tokens=t, classes=tuple(classes), optimizer=optimizer,
                    host_fwd_bwd_s=host_fwd + host_bwd, host_forward_s=host_fwd,
                    serial_forward=quant == "int8", forward_passes=passes_fwd,
                    serial_segments=tuple(lin.in_features * lin.out_features / numel
                                          for lin in linears) if quant == "int8" else (),
                    host_syncs_s=syncs, host_optimizer_s=count * per_tensor,
                    serial_optimizer=plan.optimizer in BNB_OPTIMIZERS,
                    host_step_s=HOST_STEP_S if trainer else HOST_STEP_PLAIN_S)


# ---- timing -----------------------------------------------------------------------------


def class_seconds(c: KernelClass, speed: GpuSpeed) -> ClassTime:
    """max(compute, memory, launch floor) of one kernel class on `speed`."""
    compute = 0.0
    if c.flops:
        eff = speed.attention_efficiency if c.name == "attention" else speed.matmul_efficiency
        if c.gemm_rows:
            eff *= c.gemm_rows / (c.gemm_rows + GEMM_M_HALF)
        if c.grouped:
            eff *= GROUPED_MM_FACTOR
        compute = c.flops / (speed.peak(c.peak) * eff)
    memory = c.bytes / (speed.bandwidth * speed.memory_efficiency) if c.bytes else 0.0
    launch = c.kernels * KERNEL_FLOOR_S
    seconds = max(compute, memory, launch)
    if c.sm_ops:
        seconds += max(c.sm_ops / speed.fp32_flops,
                       c.sm_bytes / (speed.bandwidth * speed.memory_efficiency))
    bound: Literal["compute", "memory", "launch"] = (
        "compute" if seconds == compute else "memory" if seconds == memory else "launch")
    return ClassTime(name=c.name, seconds=seconds, bound=bound)


def step_time(work: StepWork, speed: GpuSpeed) -> StepTime:
    """Seconds per step of `work` on `speed` (module docstring: GPU and host overlap within
    forward+backward and within the optimizer step, not across them)."""
    return step_at_host(work, speed)(speed.host_factor)


def step_at_host(work: StepWork, speed: GpuSpeed) -> Callable[[float], StepTime]:
    """`step_time` of `work` on `speed` as a function of the host factor: the GPU's kernel
    classes are timed once, and each call puts a host `h` times the reference host's
    (HOST_FWD_OP_S, HOST_BWD_OP_S, ...) under them. `step_at_host(w, s)(s.host_factor)` is
    `step_time(w, s)`; timing/host_calibration.py fits `h` to a user's timed steps with it."""
    times = [class_seconds(c, speed) for c in work.classes]
    opt = class_seconds(work.optimizer, speed)
    gpu_fb = sum(x.seconds for x in times)
    # the forward passes' GPU time (each class's forward share, else by passes: a forward
    # pass costs one, a backward two); the first forward's is 1 / forward_passes of it
    by_passes = work.forward_passes / (work.forward_passes + 2.0)
    forward_gpu = sum(x.seconds * (c.forward_share if c.forward_share >= 0 else by_passes)
                      for x, c in zip(times, work.classes, strict=True))
    first_share = forward_gpu / work.forward_passes / gpu_fb if gpu_fb else 0.0
    gpu_f = forward_gpu if work.serial_forward else 0.0  # the serial forward's (int8)
    classes = (*times, opt)

    def at(host_factor: float) -> StepTime:
        host_fb = work.host_fwd_bwd_s * host_factor
        host_opt = work.host_optimizer_s * host_factor
        host_step = work.host_step_s * host_factor
        if work.serial_forward:
            # the forward's syncs (int8) empty the GPU's queue in every Linear: the host's
            # forward and the GPU's no longer overlap; the backward still does
            host_f = work.host_forward_s * host_factor
            # between two syncs the host and the GPU still overlap: each stretch takes the
            # longer of its share of the host's operators and its share of the GPU's work
            # (HOST_SYNC_S: the stretches, not the whole forward, are serial)
            shares = work.serial_segments or (1.0,)
            n = len(shares)
            serial = sum(max(host_f / n, gpu_f * s) for s in shares)
            fwd_bwd = (serial + work.host_syncs_s * host_factor
                       + max(gpu_fb - gpu_f, host_fb - host_f))
        else:
            fwd_bwd = max(gpu_fb, host_fb)
        opt_s = (host_opt + opt.seconds if work.serial_optimizer
                 else max(opt.seconds, host_opt))
        step = fwd_bwd + opt_s + host_step
        forward = fwd_bwd * first_share
        return StepTime(gpu=speed.name, basis=speed.basis, tokens=work.tokens,
                        step_seconds=step, gpu_seconds=gpu_fb + opt.seconds,
                        host_seconds=host_fb + host_opt + host_step, classes=classes,
                        forward_seconds=forward, backward_seconds=fwd_bwd - forward,
                        optimizer_seconds=opt_s)

    return at


# ---- inference: prefill and decode ------------------------------------------------------

# Host time of one eager forward per decoder layer in generate() (no autograd records),
# per LoRA module and per quantized Linear: priors, not yet measured (the training step's
# per-operator costs, HOST_FWD_OP_S / HOST_BWD_OP_S, were fitted on runs 28-31; decode was
# not re-fitted with them).
HOST_LAYER_FWD_S = 350e-6
HOST_LORA_FWD_S = 60e-6
HOST_QUANT_FWD_S = 40e-6
HOST_INT8_FWD_S = 100e-6
# transformers generate(), eager: per new token the whole stack runs once from Python
# (per-layer host time as a training forward) plus generate()'s own step (logits
# processors, stopping criteria, cache update, the `unfinished_sequences.max() == 0`
# check that waits for the GPU every token).
HOST_GENERATE_STEP_S = 2e-3
# bitsandbytes 4-bit inference with one token (matmul_4bit: `A.numel() == A.shape[-1]`)
# runs gemv_4bit on the packed weights (0.5 byte per weight + absmax); more tokens
# dequantize first (DEQUANT4_BYTES) and read the 16-bit copy.
GEMV4_BYTES = 0.5 + 4 / 64


class InferTime(NamedTuple):
    """Prefill and decode speed of `generate()` on one GPU."""

    gpu: str
    basis: TimeBasis
    prefill_seconds: float
    prefill_tokens_per_second: float
    decode_step_seconds: float  # one new token for the whole batch (average over the run)
    decode_tokens_per_second: float  # new tokens per second, whole batch
    total_seconds: float


def infer_time(spec: ModelSpec, *, batch_size: int, prompt_len: int, new_tokens: int,
               quant: str, compute_dtype: str, lora_modules_per_layer: int,
               attn: str, speed: GpuSpeed) -> InferTime:
    """`generate()` of `new_tokens` after a `prompt_len` prompt, greedy, with a KV cache.

    Prefill: one forward over batch x prompt tokens (compute-bound: 2 x params per token,
    the S^2 attention term, 4-bit weights dequantized once); only the last position goes
    through lm_head (transformers' `logits_to_keep`). Decode: each new token reads every
    weight once (bandwidth-bound at small batch) and the KV cache so far (on average
    prompt + new/2 positions), plus the host's per-token work (HOST_GENERATE_STEP_S and
    the per-layer forward), which dominates small models.
    """
    b, p, n = batch_size, prompt_len, new_tokens
    layers = spec.num_hidden_layers
    act = _dtype_bytes(compute_dtype)
    linears = spec.block_linears()
    numel = sum(lin.in_features * lin.out_features for lin in linears)
    io = sum(lin.in_features + lin.out_features for lin in linears)
    h, v = spec.hidden_size, spec.vocab_size
    peak: Peak = "fp32" if compute_dtype == "fp32" else "tensor16"
    w16 = 4 if compute_dtype == "fp32" else 2
    stored = {"nf4": GEMV4_BYTES, "fp4": GEMV4_BYTES, "int8": 1.0}.get(quant, float(w16))
    if spec.is_moe:  # every expert's weights are read; top-k of them compute
        ei, e, k = spec.expert_intermediate_size, spec.num_local_experts, spec.num_experts_per_tok
        expert_numel, active_numel = e * 3 * h * ei, k * 3 * h * ei
    else:
        expert_numel = active_numel = 0
    host_layer = HOST_LAYER_FWD_S + lora_modules_per_layer * HOST_LORA_FWD_S + (
        len(linears) * (HOST_INT8_FWD_S if quant == "int8" else HOST_QUANT_FWD_S)
        if quant != "none" else 0.0)

    def forward(tokens: int, kv_len: float, one_token: bool) -> float:
        flops = 2.0 * tokens * (numel + active_numel) * layers + 2.0 * b * h * v
        heads, d = spec.num_attention_heads, spec.head_size
        q_len = tokens // b
        flops += 4.0 * b * heads * q_len * kv_len * d * (0.5 if not one_token else 1.0) \
            * layers
        weights = layers * (numel * (stored if (one_token and b == 1 or quant == "int8")
                                     else w16) + expert_numel * w16) + h * v * w16
        if quant in ("nf4", "fp4") and not (one_token and b == 1):
            weights += layers * numel * DEQUANT4_BYTES
        kv = 2.0 * layers * b * kv_len * spec.kv_size * act
        acts = tokens * layers * (io + spec.norms_per_layer * NORM_BYTES * h) * act
        gemm = KernelClass(name="gemm", flops=flops, bytes=weights + acts, peak=peak,
                           gemm_rows=tokens)
        cache = KernelClass(name="kv", bytes=kv)
        gpu = sum(class_seconds(c, speed).seconds for c in (gemm, cache))
        gpu = max(gpu, layers * KERNELS_PER_LAYER_FWD * KERNEL_FLOOR_S)
        host = (layers * host_layer + HOST_GENERATE_STEP_S) * speed.host_factor
        return max(gpu, host)

    prefill = forward(b * p, p / 2, one_token=False)
    decode = forward(b, p + n / 2, one_token=True)
    return InferTime(gpu=speed.name, basis=speed.basis, prefill_seconds=prefill,
                     prefill_tokens_per_second=b * p / prefill, decode_step_seconds=decode,
                     decode_tokens_per_second=b / decode,
                     total_seconds=prefill + decode * max(0, n - 1))
