"""What lies outside the tensors: allocator slack, the unreleasable part of it, the CUDA
context, cuBLAS workspaces and the resident pages of paged optimizers.

Measured constants say which data they come from (calibration/raw/); the mechanism of each
is in docs/memory-model.md.
"""

from __future__ import annotations

MiB = 2**20
GiB = 2**30

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
# Under memory pressure the caching allocator frees its cached blocks and retries before
# it raises out-of-memory (CUDACachingAllocator release_cached_blocks), so the slack above
# is not all needed: only the free space inside partly used segments is. Set from the
# boundary runs on the H100 (calibration/raw/h100-run5-check-verify.jsonl,
# h100-run6-boundary.jsonl, h100-run7-boundary-holdout.jsonl): the largest point that ran
# and the smallest that ran out of memory, for llama-3.1-8b, qwen2.5-0.5b, phi-3-mini,
# gemma-2-2b and mistral-7b, bound the unreleasable part to 1 GiB + 0.161-0.171 x the
# logits bytes kept for backward (8 or 10 x tokens x vocab). A narrow window from 9
# boundary observations: keep a margin (check --margin).
REQUIRED_SLACK_BASE = 1 * GiB
REQUIRED_SLACK_LOGITS_FRACTION = 0.166
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: one growing segment per stream and pool,
# mapped in pages of kLargeBuffer = 20 MiB (large pool) or kSmallBuffer = 2 MiB (small pool)
# (CUDACachingAllocator.cpp, get_expandable_segment). On out-of-memory the retry unmaps
# every page that lies wholly in a free block (release_cached_blocks ->
# release_expandable_segment / unmap_block), so what cannot be given back is only the
# partial pages at the two ends of each free range: at most 2 x 20 MiB per gap between
# live blocks. Bounded here by a dozen such gaps at the peak (the live blocks of a
# checkpointed step are the weights, one checkpoint per layer, allocated back to back, and
# the recomputed layer); measured 0.11 GiB on the emulated-card edge points of
# calibration/h200/run2-more.jsonl (plain loop, 1 retry).
EXPANDABLE_REQUIRED_SLACK = 256 * MiB


def allocator_slack(logits_fp32_bytes: int, checkpoint_bytes: int, eager_scores: int,
                    trained_full_bytes: int = 0) -> int:
    """Reserved - allocated at the peak when memory is plentiful."""
    return SLACK_BASE + int(
        SLACK_LOGITS_FRACTION * logits_fp32_bytes
        + SLACK_CHECKPOINT_FRACTION * checkpoint_bytes
        + SLACK_EAGER_FRACTION * eager_scores
        + SLACK_TRAINABLE_FRACTION * trained_full_bytes
    )


def unreleasable_slack(slack: int, logits_saved_bytes: int, expandable: bool = False) -> int:
    """The part of the slack an out-of-memory retry cannot give back: free space inside
    partly used segments (default allocator) or partial pages (expandable segments)."""
    if expandable:
        return min(slack, EXPANDABLE_REQUIRED_SLACK)
    required = REQUIRED_SLACK_BASE + int(REQUIRED_SLACK_LOGITS_FRACTION * logits_saved_bytes)
    return min(slack, required)


def paged_resident(paged_bytes: int) -> int:
    """Managed pages of a paged optimizer that NVML shows as used."""
    return max(paged_bytes, PAGED_MIN_RESIDENT) if paged_bytes else 0
