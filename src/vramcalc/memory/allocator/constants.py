"""What lies outside the tensors: allocator slack, the unreleasable part of it, the CUDA
context, cuBLAS workspaces and the resident pages of paged optimizers.

Measured constants say which data they come from (calibration/raw/); the mechanism of each
is in docs/memory-model.md.
"""

from __future__ import annotations

from vramcalc.units import GiB, MiB

# torch CublasHandlePool.cpp: a 32 MiB cuBLAS workspace per handle on Hopper; the forward
# runs on the main thread and backward on autograd's device thread, two handles. Measured:
# +64 MiB allocated after the first step on the H100 (calibration/raw/h100-run1.jsonl).
CUBLAS_WORKSPACES = 2 * 32 * MiB
# NVML 'used' minus torch reserved at the peak: the CUDA context with lazily loaded kernels
# (torch, cuBLAS, bitsandbytes). 763 MiB on every H100 point (CUDA 13.0, driver 580).
CUDA_CONTEXT = 763 * MiB
# bitsandbytes paged optimizers (cudaMallocManaged): NVML showed +113 MiB over the same
# plan unpaged, for 44 MB and 90 MB of paged state (h100-run1.jsonl); modelled as a floor.
PAGED_MIN_RESIDENT = 113 * MiB

# Allocator slack (reserved - allocated at the peak): cached blocks that later requests
# of other sizes cannot reuse. Three sources show in the data: the freed tokens x vocab
# logits blocks, the per-layer checkpoint tensors interleaved with the recomputed layer's
# buffers, and eager attention's score blocks. Least squares over the 29 H100 points of
# calibration/raw/ runs 1-3 (leave-one-model-out: median 1.8 %, worst 6.3 % of reserved;
# docs/memory-model.md); `vramcalc calibrate fit` rescales it per GPU.
SLACK_BASE = 280 * MiB
SLACK_LOGITS_FRACTION = 0.57  # of the fp32 tokens x vocab tensor
SLACK_CHECKPOINT_FRACTION = 0.52  # of all checkpointed layer inputs
SLACK_EAGER_FRACTION = 0.16  # of one layer's eager attention probabilities
# Full fine-tuning: gradients and optimizer-step temporaries are freed and reallocated in
# sizes the next step's activations cannot reuse. 0.25 x the trainable bytes: least squares
# on the 16 full-fine-tuning points of the H200 design run (calibration/h200/run1-design.jsonl,
# bench/accuracy_h200.py), with the other coefficients held; not measured on the H100.
SLACK_TRAINABLE_FRACTION = 0.25
# Under memory pressure the caching allocator frees its fully free cached segments and
# retries before it raises out-of-memory (CUDACachingAllocator.cpp malloc ->
# release_cached_blocks), so only the free space inside partly used segments is needed on
# top of the allocated bytes. Measured on emulated cards (calibration/h200/
# run7-boundary-sweep.jsonl, 120 runs, 6 QLoRA cases x 2 loops x 2 allocators x 5 limits;
# every out-of-memory request was the fp32 upcast of the logits, tokens x vocab x 4 bytes):
# - first step: 0.35-1.02 GiB reserved but unallocated at the failing request.
# - later steps, a loop that keeps the outputs (--loop trainer-plain-outputs): the previous step's
#   output keeps its compute-dtype logits block
#   through the next forward, so the new logits take the cached fp32-logits segment and the
#   fp32 request finds no block: first-step slack + tokens x vocab x compute bytes (within
#   0.13 GiB on all 6 cases).
# - later steps, Trainer: in 2 of 6 cases the cached fp32-logits segment had been split by a
#   longer-lived block and the request needed a new one (first-step slack + 0.9-1.0 x the
#   fp32 logits); in 4 of 6 it was reused (thresholds <= 0.75 GiB). Which happens depends on
#   the order of earlier requests, not modelled: the band between the two is "tight".
# - expandable segments: every limit >= peak allocated + 0.40 GiB ran, 7 of 12 at + 0.15
#   failed (partial 20 MiB pages, below).
REQUIRED_SLACK_BASE = 1 * GiB  # the most a first step left (1.02 GiB, tinyllama)
REQUIRED_SLACK_LOW = 350 * MiB  # the least (0.35 GiB, qwen2.5-0.5b; it ran at + 0.40)
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: one growing segment per stream and pool,
# mapped in pages of kLargeBuffer = 20 MiB (large pool) or kSmallBuffer = 2 MiB (small pool)
# (CUDACachingAllocator.cpp, get_expandable_segment). On out-of-memory the retry unmaps
# every page that lies wholly in a free block (release_cached_blocks ->
# release_expandable_segment / unmap_block), so what cannot be given back is only the
# partial pages at the two ends of each free range: 0.15-0.22 GiB at the failing request on
# the sweep; the bound is the sweep's lowest limit at which every case ran.
EXPANDABLE_REQUIRED_SLACK = 410 * MiB
EXPANDABLE_REQUIRED_SLACK_LOW = 150 * MiB  # the least at a failing request; 3 of 12 ran at + 0.15


def allocator_slack(logits_fp32_bytes: int, checkpoint_bytes: int, eager_scores: int,
                    trained_full_bytes: int = 0) -> int:
    """Reserved - allocated at the peak when memory is plentiful."""
    return SLACK_BASE + int(
        SLACK_LOGITS_FRACTION * logits_fp32_bytes
        + SLACK_CHECKPOINT_FRACTION * checkpoint_bytes
        + SLACK_EAGER_FRACTION * eager_scores
        + SLACK_TRAINABLE_FRACTION * trained_full_bytes
    )


def required_slack(logits_fp32_bytes: int, logits_compute_bytes: int, holds_output: bool,
                   expandable: bool) -> tuple[int, int]:
    """(low, high): the free space inside partly used segments an out-of-memory retry cannot
    give back, at best and at worst (see the constants above). Below peak allocated + low
    the step cannot run; at peak allocated + high it runs whatever the allocator's history."""
    if expandable:
        return EXPANDABLE_REQUIRED_SLACK_LOW, EXPANDABLE_REQUIRED_SLACK
    low = REQUIRED_SLACK_LOW + (logits_compute_bytes if holds_output else 0)
    high = REQUIRED_SLACK_BASE + logits_fp32_bytes
    return low, max(low, high)


def paged_resident(paged_bytes: int) -> int:
    """Managed pages of a paged optimizer that NVML shows as used."""
    return max(paged_bytes, PAGED_MIN_RESIDENT) if paged_bytes else 0
