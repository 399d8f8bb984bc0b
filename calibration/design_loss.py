"""The loss-kernel matrix (issue 29): each loss head (TrainPlan.loss_kernel) on four
architectures whose vocabularies run from 32k to 256k, at full depth, in the loops that use
them, with the default head beside each as the baseline.

    python calibration/design_loss.py > calibration/matrices/h200-loss1.json
    python calibration/design.py predict calibration/matrices/h200-loss1.json "NOTE" \
        > calibration/matrices/h200-loss1-predictions.json

Hand-designed, not drawn: one setting per architecture, chosen so the logits are a large
share of the default head's peak and every point fits 70 GiB of peak device memory
(an H100), each setting run with torch, liger, cce and chunked:
- llama-2-7b (32k): QLoRA nf4, 4 x 2048, Trainer;
- llama-3.1-8b (128k): QLoRA nf4, 4 x 4096, Trainer (the issue's case at half its batch);
- qwen2.5-1.5b (152k): LoRA on bf16, 8 x 2048, the tutorial loop (`plain`, no Trainer:
  liger applied with `_apply_liger_kernel_to_instance`);
- gemma-2-2b (256k, final logit softcapping): QLoRA nf4, 4 x 2048, `trainer-plain`;
- qwen2.5-1.5b: full fine-tuning in bf16 (adamw_torch), 4 x 2048, Trainer (the lm_head
  trains: liger's grad_weight, cce's dc, chunked's per-chunk weight gradient).
"""

from __future__ import annotations

import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/calibration/", 1)[0] + "/src")

from vramcalc.memory.estimate import estimate  # noqa: E402
from vramcalc.plans import LOOP_NAMES, TrainPlan  # noqa: E402
from vramcalc.models.spec import get_spec  # noqa: E402

GiB = 2**30
MAX_DEVICE_GIB = 70
KERNELS = ("torch", "liger", "cce", "chunked")
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("l2", "llama-2-7b", {"method": "qlora", "quant": "nf4", "batch_size": 4,
                          "seq_len": 2048, "loop": "trainer"}),
    ("l3", "llama-3.1-8b", {"method": "qlora", "quant": "nf4", "batch_size": 4,
                            "seq_len": 4096, "loop": "trainer"}),
    ("q", "qwen2.5-1.5b", {"method": "lora", "batch_size": 8, "seq_len": 2048,
                           "loop": "plain"}),
    ("g", "gemma-2-2b", {"method": "qlora", "quant": "nf4", "batch_size": 4,
                         "seq_len": 2048, "loop": "trainer-plain"}),
    ("f", "qwen2.5-1.5b", {"method": "full", "optimizer": "adamw_torch", "batch_size": 4,
                           "seq_len": 2048, "loop": "trainer"}),
]


def points() -> list[dict[str, Any]]:
    out = []
    for tag, name, plan in SETTINGS:
        for kernel in KERNELS:
            p = {**plan, "loss_kernel": kernel}
            est = estimate(get_spec(name), TrainPlan.model_validate(p))
            if est.peak_device_bytes > MAX_DEVICE_GIB * GiB:
                raise SystemExit(f"{tag}-{kernel}: predicted {est.peak_device_bytes / GiB:.1f} "
                                 f"GiB > {MAX_DEVICE_GIB}")
            steps = 4 if plan["loop"] == "plain" else 3
            out.append({"id": f"k-{tag}-{kernel}-{name}", "spec": name, "layers": None,
                        "plan": p, "steps": steps})
    return out


if __name__ == "__main__":
    json.dump({"loop_names": LOOP_NAMES, "points": points()}, sys.stdout, indent=1)
    sys.stdout.write("\n")
