"""Logits and loss of a causal LM step, in units of tokens x vocab bytes.

transformers `loss/loss_utils.py` ForCausalLMLoss: `logits.float()` then cross_entropy;
accelerate's `convert_outputs_to_fp32` returns an fp32 copy of the logits under
`Trainer(bf16=True)`. Measured on the H100 (calibration/raw/h100-run1.jsonl, run2).
"""

from __future__ import annotations

LOGITS_SAVED_UNITS = 8  # alive after forward: log_softmax output (4) + fp32 logits (4)
LOGITS_FORWARD_EXTRA_UNITS = 2  # bf16 logits alive while the fp32 copy is made
LOGITS_BACKWARD_EXTRA_UNITS = 4  # cross-entropy backward: fp32 grad (8) minus freed logits (4)
# Gemma-2 final_logit_softcapping (modeling_gemma2.py: logits / cap, tanh, * cap) keeps the
# tanh output (compute dtype) for backward: +2 units, measured on gemma-2-2b (h100-run2).
SOFTCAP_SAVED_UNITS = 2
# Per token at the forward's last moment: final norm output and its casts, measured 14.5 B
# per hidden element on qwen2.5-0.5b and llama-3.1-8b (h100-run1.jsonl).
FORWARD_END_BYTES_PER_HIDDEN = 14.5
