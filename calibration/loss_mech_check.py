"""Loss kernels on the GPU without the matrix driver (issue 29): one process per kernel,
`python3 calibration/loss_mech_check.py KERNEL VOCAB` prints `R kernel vocab
max_memory_allocated max_memory_reserved` over three steps after the model is built (peaks
reset then, as measure_point does). A llama-style 4-layer model (hidden 2048, MLP 8192,
16 heads, 8 KV heads), random bf16 weights built on the GPU, LoRA r=16 all-linear with
dropout 0.05, non-reentrant checkpointing, batch 4 x 2048, the tutorial loop (autocast bf16,
torch.optim.AdamW, `loss` rebound by the next forward); the kernels applied as
calibrate/run.py apply_loss_kernel does (written compactly: it travels inside the device
command, gzip + base64, as the device runs the main tree). Predictions:
calibration/matrices/h100-loss-mech-predictions.json (committed before the run)."""

import sys
import types

import peft
import torch
import torch.nn.functional as F
import transformers as T
from transformers.modeling_outputs import CausalLMOutputWithPast as O

k, V = sys.argv[1], int(sys.argv[2])
c = T.LlamaConfig(
    vocab_size=V,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
)
with torch.device("cuda"):
    m = T.AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16, attn_implementation="sdpa")
m.enable_input_require_grads()
m = peft.get_peft_model(
    m,
    peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    ),
)
m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
b = m.get_base_model()


def f(s, input_ids=None, labels=None, **kw):
    kw.pop("num_items_in_batch", None)
    h = s.model(input_ids=input_ids, **kw)[0]
    if k == "cce":
        from cut_cross_entropy import linear_cross_entropy as L

        d = torch.get_autocast_gpu_dtype()
        l = L(h.to(d), s.lm_head.weight.to(d), labels, shift=True)
    else:
        y = F.pad(labels, (0, 1), value=-100)[..., 1:]
        l = (
            sum(
                F.cross_entropy(z.float().reshape(-1, V), t.reshape(-1), reduction="sum")
                for z, t in zip([s.lm_head(x) for x in h.chunk(8, 1)], y.chunk(8, 1))
            )
            / (y != -100).sum()
        )
    return O(loss=l)


if k == "liger":
    from liger_kernel.transformers import _apply_liger_kernel_to_instance as A

    A(model=b)
if k in ("cce", "chunked"):
    b.forward = types.MethodType(f, b)
o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
m.train()
x = torch.randint(0, V, (4, 2048), device="cuda")
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
for i in range(3):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(input_ids=x, labels=x).loss
    loss.backward()
    o.step()
    o.zero_grad(set_to_none=True)
torch.cuda.synchronize()
print("R", k, V, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), flush=True)
