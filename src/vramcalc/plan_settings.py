"""TrainPlan: the training settings an estimate depends on (pure data, no torch)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

# qlora: frozen quantized base (4-bit or int8) + LoRA; lora: frozen 16-bit base + LoRA;
# full: every parameter trained.
Method = Literal["qlora", "lora", "full"]
Quant = Literal["nf4", "fp4", "int8", "none"]
WeightsDtype = Literal["bf16", "fp16", "fp32"]
# The training loop: HF Trainer, or a plain PyTorch loop (forward with labels, backward,
# optimizer.step(), zero_grad(set_to_none=True)).
Loop = Literal["trainer", "plain", "plain-outputs", "plain-outputs-del"]
# MoE experts stored as 3-D tensors (transformers 5) are left unquantized by bitsandbytes;
# stacks with per-expert nn.Linear modules (transformers 4.x, axolotl's option) quantize them.
MoeExperts = Literal["unquantized", "quantized"]
ComputeDtype = Literal["bf16", "fp16", "fp32"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "sgd",
]

# The valid values, for error messages and option help.
METHODS: tuple[str, ...] = get_args(Method)
WEIGHTS_DTYPES: tuple[str, ...] = get_args(WeightsDtype)
LOOPS: tuple[str, ...] = get_args(Loop)
MOE_EXPERTS: tuple[str, ...] = get_args(MoeExperts)
QUANTS: tuple[str, ...] = get_args(Quant)
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


def normalize_targets(value: str) -> str:
    """'q_proj, v_proj' -> 'q_proj,v_proj'; an empty list is an error."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ValueError("targets is empty; use 'all-linear' or names like 'q_proj,v_proj'")
    return ",".join(parts)


class TrainPlan(BaseModel):
    """One fine-tuning configuration. Defaults follow the seeds' SFT recipe: QLoRA with
    nf4 + double quant, bf16 compute, paged_adamw_8bit, gradient checkpointing, sdpa.

    `method` and `quant` go together: qlora needs a quantized base (nf4, fp4, int8), lora
    and full a 16/32-bit one (quant none). When only one is given the other follows:
    `quant="none"` alone means lora; `method="lora"|"full"` alone means quant none.
    `weights_dtype` is the dtype the model is loaded in (`from_pretrained(dtype=...)`);
    None means the compute dtype. Full fine-tuning with fp32 weights and bf16 compute is
    fp32 master weights under autocast; with bf16 weights it is pure bf16 (AdamW states
    follow the parameters' dtype).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "qlora"
    rank: PositiveInt = 16
    alpha: float = 32.0
    targets: str = "all-linear"  # "all-linear" or a comma list of module names
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    use_dora: bool = False
    batch_size: PositiveInt = 1
    seq_len: PositiveInt = 512
    quant: Quant = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bf16"
    optimizer: Optimizer = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    attn: Attention = "sdpa"
    weights_dtype: WeightsDtype | None = None
    loop: Loop = "trainer"
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    moe_experts: MoeExperts = "unquantized"

    @model_validator(mode="before")
    @classmethod
    def _method_and_quant_follow_each_other(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method, quant = data.get("method"), data.get("quant")
        if method is None and quant == "none":
            data["method"] = "lora"
        elif method in ("lora", "full") and quant is None:
            data["quant"] = "none"
        return data

    @model_validator(mode="after")
    def _check_method(self) -> TrainPlan:
        if self.method == "qlora" and self.quant == "none":
            raise ValueError("method qlora needs a quantized base: quant nf4, fp4 or int8 "
                             "(for a 16-bit base use method lora)")
        if self.method in ("lora", "full") and self.quant != "none":
            raise ValueError(f"method {self.method} trains on a 16/32-bit base: quant must be "
                             f"none, got {self.quant} (a quantized base is method qlora)")
        return self

    @field_validator("targets")
    @classmethod
    def _normalize_targets(cls, value: str) -> str:
        return normalize_targets(value)

    @property
    def load_dtype(self) -> str:
        """The dtype of the loaded (non-quantized) weights."""
        return self.weights_dtype or self.compute_dtype

    @property
    def autocast(self) -> bool:
        """Whether the step runs under torch autocast. HF Trainer with bf16/fp16 always does
        (accelerate's mixed precision). A plain loop (`plain`, `plain-outputs`, as
        transformers' native-PyTorch docs write it) has none of its own; it needs autocast
        only when trained weights are not already 16-bit, so pure 16-bit full fine-tuning
        runs without it (calibrate/run.py `_plain_loop`)."""
        pure_16bit = self.method == "full" and self.load_dtype in ("bf16", "fp16")
        return not (self.loop != "trainer" and pure_16bit)

    @property
    def holds_output(self) -> bool:
        """The loop keeps the model output (its logits) through backward and the next
        forward: `plain-outputs`, `outputs = model(**batch); outputs.loss.backward()` as
        transformers' native-PyTorch docs write it. `plain` takes `model(**batch).loss` and
        drops the output, as Trainer's compute_loss does."""
        return self.loop in ("plain-outputs", "plain-outputs-del")

    @property
    def holds_output_past_step(self) -> bool:
        """The held output (and the graph its grad_fn reaches) lives on into the next
        step's forward: `plain-outputs`. `plain-outputs-del` frees it after backward
        (`out.loss.backward(); del out`, the loop H200 runs 1-9 measured)."""
        return self.loop == "plain-outputs"

    @property
    def is_lora(self) -> bool:
        return self.method != "full"

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def target_list(self) -> list[str]:
        return self.targets.split(",")
