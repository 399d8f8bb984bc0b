"""The plans an estimate takes (pure data, no torch): TrainPlan (a training step),
InferPlan (generate), MergePlan (merge_and_unload)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

# qlora: frozen quantized base (4-bit or int8) + LoRA; lora: frozen 16-bit base + LoRA;
# full: every parameter trained.
Method = Literal["qlora", "lora", "full"]
Quant = Literal["nf4", "fp4", "int8", "none"]
WeightsDtype = Literal["bf16", "fp16", "fp32"]
# The training loop (TrainPlan.loop): what built the model and optimizer, and what the loop
# keeps into the next step.
Loop = Literal["trainer", "plain", "trainer-plain", "trainer-plain-outputs",
               "trainer-plain-outputs-del"]
# What survives one step into the next: nothing, the loss (and the graph its grad_fn
# reaches), or the model output (its logits and graph)
Survives = Literal["nothing", "loss", "outputs"]
# MoE experts stored as 3-D tensors (transformers 5) are left unquantized by bitsandbytes;
# stacks with per-expert nn.Linear modules (transformers 4.x, axolotl's option) quantize them.
MoeExperts = Literal["unquantized", "quantized"]
ComputeDtype = Literal["bf16", "fp16", "fp32"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
# How a step's sequences reach the model (TrainPlan.layout): padded rows (a padding
# collator: batch x the longest in the batch), packed rows (batch rows of seq_len, several
# sequences each with their own position_ids: axolotl sample_packing), or padding-free (every
# sequence of the step flattened into one row, position_ids restarting per sequence: TRL
# padding_free, and TRL packing=True, whose default "bfd" strategy forces padding-free).
Layout = Literal["padded", "packed", "padding-free"]
# Activation offloading to host memory (TrainPlan.offload_activations): none; the inputs of
# the checkpointed layers (Unsloth use_gradient_checkpointing="unsloth", axolotl
# activation_offloading: hidden_states); every saved tensor of the forward outside the
# lm_head (torchtune / TRL OffloadActivations, axolotl gradient_checkpointing: offload).
# DeepSpeed's activation_checkpointing.cpu_checkpointing is neither: it acts only inside
# deepspeed.checkpointing.checkpoint, which Hugging Face models never call (docs/memory-model.md).
OffloadActivations = Literal["none", "checkpoints", "all"]
# The loss head (TrainPlan.loss_kernel): transformers' lm_head + ForCausalLMLoss (torch),
# liger-kernel's fused linear cross-entropy with its RMSNorm / SwiGLU / RoPE kernels
# (`use_liger_kernel=True`), Apple's cut-cross-entropy (`cce_patch`), or torchtune-style
# chunked cross-entropy (CEWithChunkedOutputLoss, 8 chunks), or TRL SFTTrainer's default
# `loss_type="chunked_nll"` of TRL 1.4-1.14 (trl-chunked: checkpointed chunks of 256
# labelled tokens), or TRL SFTTrainer's fused LM head of TRL >= 1.15 (trl-fused:
# `add_fused_lm_head`, ChunkedLogProbFunction tiles of 4096 rows x 32768 columns).
LossKernel = Literal["torch", "liger", "cce", "chunked", "trl-chunked", "trl-fused"]
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
LAYOUTS: tuple[str, ...] = get_args(Layout)
OFFLOAD_ACTIVATIONS: tuple[str, ...] = get_args(OffloadActivations)
LOSS_KERNELS: tuple[str, ...] = get_args(LossKernel)
# The model types each kernel patches: liger-kernel 0.8.5 transformers/monkey_patch.py
# MODEL_TYPE_TO_APPLY_LIGER_FN (the dense and MoE text models of the catalog's families;
# other types get no kernel: `_apply_liger_kernel_to_instance` logs and returns), and
# cut-cross-entropy's transformers/patch.py PATCH_FNS (upstream 25.6.4; others raise; the
# 25.1.1 wheel ships the loss only, which the worker calls as the patch does).
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "gemma", "gemma2",
                               "gemma3_text", "qwen2", "qwen3", "qwen3_moe", "phi3",
                               "granite", "olmo2", "glm4", "smollm3"})
CCE_MODEL_TYPES = frozenset({"llama", "phi3", "gemma2", "mistral", "qwen2"})
# torchtune CEWithChunkedOutputLoss (modules/loss/ce_chunked_output_loss.py) default
CHUNKED_LOSS_CHUNKS = 8

# The largest values the options accept (commands/options.py), and so the searches' upper
# bounds (sizing/search.py largest_fitting_infer): past these an input is a typo, not a plan.
MAX_SEQ_LEN = 2**24  # 16M tokens: 128 x the largest max_position_embeddings of the catalog
MAX_BATCH = 2**20  # sequences per device per step

# The loop names of calibration matrices and records made before issue 27 (runs 1-26):
# their `plain` loops were plain steps on a model and optimizer a Trainer had built.
# `loop_names` of a matrix file says which names it uses (absent: 1).
LEGACY_LOOPS: dict[str, str] = {
    "plain": "trainer-plain",
    "plain-outputs": "trainer-plain-outputs",
    "plain-outputs-del": "trainer-plain-outputs-del",
}
LOOP_NAMES = 2  # the `loop_names` of the names above


def current_loop_names(plan: dict[str, Any], loop_names: int = 1) -> dict[str, Any]:
    """A plan dict read from a matrix or record that uses `loop_names`, in today's names."""
    loop = plan.get("loop")
    if loop_names >= LOOP_NAMES or not isinstance(loop, str) or loop not in LEGACY_LOOPS:
        return plan
    return {**plan, "loop": LEGACY_LOOPS[loop]}


def normalize_targets(value: str) -> str:
    """'q_proj, v_proj' -> 'q_proj,v_proj'; an empty list is an error."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ValueError("targets is empty; use 'all-linear' or names like 'q_proj,v_proj'")
    return ",".join(parts)


# ---- inference and merging ------------------------------------------------------

InferQuant = Literal["nf4", "fp4", "int8", "none"]
Dtype16 = Literal["bf16", "fp16"]
AdapterDtype = Literal["fp32", "bf16", "fp16"]
CacheKind = Literal["dynamic", "static"]
MergeOn = Literal["gpu", "cpu"]
MergeBase = Literal["none", "nf4", "fp4"]

CACHES: tuple[str, ...] = get_args(CacheKind)
ADAPTER_DTYPES: tuple[str, ...] = get_args(AdapterDtype)
INFER_QUANTS: tuple[str, ...] = get_args(InferQuant)
DTYPES16: tuple[str, ...] = get_args(Dtype16)
MERGE_ON: tuple[str, ...] = get_args(MergeOn)
MERGE_BASES: tuple[str, ...] = get_args(MergeBase)


class InferPlan(BaseModel):
    """One generation run: `generate(input_ids[batch x prompt_len], max_new_tokens=N)`,
    greedy, on a base loaded with `quant`, with a LoRA adapter of `rank` on `targets`
    (unmerged, in `adapter_dtype`), or none when `merged`."""

    # defer_build: a training plan (`plan` without --task) never validates one, so its
    # validator is built on first use, not at import (~0.4 ms each, InferPlan and MergePlan)
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    batch_size: PositiveInt = 1
    prompt_len: PositiveInt = 512
    new_tokens: PositiveInt = 128
    quant: InferQuant = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    rank: PositiveInt = 16
    targets: str = "all-linear"
    adapter_dtype: AdapterDtype = "fp32"  # peft autocast_adapter_dtype=True: fp32
    merged: bool = False  # adapter merged into the weights (or no adapter): no LoRA tensors
    cache: CacheKind = "dynamic"
    attn: Literal["sdpa", "eager"] = "sdpa"

    @field_validator("targets")
    @classmethod
    def _normalize_targets(cls, value: str) -> str:
        return normalize_targets(value)

    @property
    def total_len(self) -> int:
        """Tokens in the cache after generate(): the last new token never goes through
        the model, so prompt + new - 1 (the static cache's max_cache_len too, measured)."""
        return self.prompt_len + self.new_tokens - 1

    def lora_plan(self) -> TrainPlan:
        """The adapter's shape as trainable.py reads it (rank, targets)."""
        return TrainPlan(rank=self.rank, targets=self.targets, use_dora=False)


class MergePlan(BaseModel):
    """`merge_and_unload()` of a LoRA adapter into a base loaded in `dtype` (or into a
    4-bit base, `base_quant`, dequantize + add + requantize), on the GPU or the CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see InferPlan

    rank: PositiveInt = 16
    targets: str = "all-linear"
    dtype: Dtype16 = "bf16"
    adapter_dtype: AdapterDtype = "fp32"
    on: MergeOn = "gpu"
    base_quant: MergeBase = "none"
    double_quant: bool = True

    @field_validator("targets")
    @classmethod
    def _normalize_targets(cls, value: str) -> str:
        return InferPlan._normalize_targets(value)

    def lora_plan(self) -> TrainPlan:
        return TrainPlan(rank=self.rank, targets=self.targets, use_dora=False)


# ---- training ---------------------------------------------------------------------


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
    # config.use_cache as the step sees it; None: what the loop leaves (TrainPlan.kv_cache)
    use_cache: bool | None = None
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    moe_experts: MoeExperts = "unquantized"
    layout: Layout = "padded"
    # padding-free only: the real tokens of the step planned (its worst step); None: every
    # row full, batch_size x seq_len
    tokens_per_step: PositiveInt | None = None
    offload_activations: OffloadActivations = "none"
    loss_kernel: LossKernel = "torch"
    # QLoRA only: whether peft `prepare_model_for_kbit_training` ran (peft 0.21 utils/
    # other.py: every non-quantized fp16/bf16 parameter cast to fp32). TRL's SFTTrainer
    # does not call it (trl 1.16 sft_trainer.py SFTTrainer.__init__: get_peft_model only),
    # so its norms, embeddings and lm_head stay in the load dtype (TrainPlan.param_dtype).
    kbit_prep: bool = True
    # LoRA / QLoRA: the adapters' dtype. peft get_peft_model(autocast_adapter_dtype=True)
    # makes them fp32; TRL's SFTTrainer casts a quantized model's trainable parameters
    # (but lora_magnitude_vector) to bf16 after it (sft_trainer.py, `param.data.to(
    # torch.bfloat16)`).
    adapter_dtype: AdapterDtype = "fp32"

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

    @model_validator(mode="after")
    def _check_layout_and_offload(self) -> TrainPlan:
        if self.tokens_per_step is not None:
            if self.layout != "padding-free":
                raise ValueError("tokens_per_step is for the padding-free layout (a padded or "
                                 "packed batch holds batch x seq_len tokens whatever is real)")
        if self.offload_activations == "checkpoints" and not self.gradient_checkpointing:
            raise ValueError("offload_activations checkpoints offloads the checkpointed layer "
                             "inputs: it needs gradient checkpointing")
        return self

    @model_validator(mode="after")
    def _check_kbit_and_adapters(self) -> TrainPlan:
        if not self.kbit_prep and self.method != "qlora":
            raise ValueError("kbit_prep (prepare_model_for_kbit_training) is for a quantized "
                             f"base (method qlora); method {self.method} never runs it")
        if self.adapter_dtype != "fp32":
            if self.method == "full":
                raise ValueError("adapter_dtype is for LoRA / QLoRA adapters; full "
                                 "fine-tuning trains the weights in weights_dtype")
            if self.use_dora:
                raise ValueError("adapter_dtype other than fp32 with DoRA is not modelled "
                                 "(TRL keeps lora_magnitude_vector in fp32)")
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
    def kbit_upcast(self) -> bool:
        """prepare_model_for_kbit_training ran (QLoRA with kbit_prep): the non-quantized
        parameters are fp32, and so is every activation that follows from them."""
        return self.method == "qlora" and self.kbit_prep

    @property
    def param_dtype(self) -> str:
        """The one dtype decision of the model's non-quantized parameters (embeddings,
        norms, lm_head, unquantized experts, 16-bit bases) as the step sees them: fp32
        after prepare_model_for_kbit_training (peft 0.21 utils/other.py casts every
        fp16/bf16 parameter that is not Params4bit / Int8Params), else the load dtype.
        The residual stream, the norm and embedding outputs, the logits' input and the
        experts' compute dtype follow it (memory/program/activations.py, step.py)."""
        return "fp32" if self.kbit_upcast else self.load_dtype

    @property
    def trainer_built(self) -> bool:
        """A Trainer (or TRL's SFTTrainer) built the model and the optimizer: every loop but
        `plain`, the tutorial loop (`opt = torch.optim.AdamW(model.parameters())` or
        `bnb.optim.PagedAdamW8bit(...)`, no Trainer constructed). Trainer.__init__ sets
        `model.config.use_cache = args.use_cache` (False; transformers trainer.py), and its
        `create_optimizer` keeps 32-bit states for nn.Embedding weights under bitsandbytes
        8-bit optimizers (`GlobalOptimManager.register_module_override(module, "weight",
        {"optim_bits": 32})`)."""
        return self.loop != "plain"

    @property
    def survives(self) -> Survives:
        """What the loop keeps into the next step. `plain`: `loss = model(...).loss` is
        rebound only once the next forward returns, so the previous loss and the graph its
        grad_fn reaches live through that forward. `trainer-plain-outputs`: `out =
        model(...)`, the same with the output (its logits). The others drop both (Trainer's
        training_step returns `loss.detach()`; `trainer-plain` does `del loss`,
        `trainer-plain-outputs-del` `del out`)."""
        if self.loop == "plain":
            return "loss"
        return "outputs" if self.loop == "trainer-plain-outputs" else "nothing"

    @property
    def kv_cache(self) -> bool:
        """The forward fills a DynamicCache: config.use_cache on (the config default True
        where no Trainer set it False, or `use_cache`) and no gradient checkpointing, under
        which transformers turns it off in training (utils/generic.py
        `merge_with_config_defaults`: `gradient_checkpointing and self.training and
        torch.is_grad_enabled()` -> use_cache False)."""
        on = (not self.trainer_built) if self.use_cache is None else self.use_cache
        return on and not self.gradient_checkpointing

    @property
    def autocast(self) -> bool:
        """Whether the step runs under torch autocast. HF Trainer with bf16/fp16 always does
        (accelerate's mixed precision), and so does `plain` (the tutorial loop's `with
        torch.autocast("cuda", dtype=torch.bfloat16)`). The Trainer-built plain loops
        (`trainer-plain*`, as transformers' native-PyTorch docs write the loop) have none of
        their own; they need autocast only when trained weights are not already 16-bit, so
        pure 16-bit full fine-tuning runs without it (calibrate/run.py `_plain_loop`)."""
        pure_16bit = self.method == "full" and self.load_dtype in ("bf16", "fp16")
        return not (self.loop.startswith("trainer-") and pure_16bit)

    @property
    def holds_output(self) -> bool:
        """The loop keeps the model output (its logits) through backward:
        `trainer-plain-outputs(-del)`, `outputs = model(**batch); outputs.loss.backward()` as
        transformers' native-PyTorch docs write it. The others take `model(**batch).loss`
        and drop the output, as Trainer's compute_loss does."""
        return self.loop in ("trainer-plain-outputs", "trainer-plain-outputs-del")

    @property
    def holds_output_past_step(self) -> bool:
        """The held output (and the graph its grad_fn reaches) lives on into the next
        step's forward: `trainer-plain-outputs`. `trainer-plain-outputs-del` frees it after
        backward (`out.loss.backward(); del out`, the loop H200 runs 1-9 measured)."""
        return self.survives == "outputs"

    @property
    def holds_graph_past_step(self) -> bool:
        """The previous step's graph (what its nodes keep after backward) lives through the
        next forward: the loss or the output survives the step."""
        return self.survives != "nothing"

    @property
    def is_lora(self) -> bool:
        return self.method != "full"

    @property
    def tokens(self) -> int:
        """The tokens of one step: every row in full (padded, packed), or the real ones
        (padding-free, `tokens_per_step`)."""
        rows = self.batch_size * self.seq_len
        if self.layout == "padding-free" and self.tokens_per_step is not None:
            # at most the rows: a plan made with a smaller batch or shorter sequences (a
            # search, a suggestion) keeps the real tokens where the rows still hold them
            # (an upper bound); the options refuse more than batch x seq_len
            # (commands/options.py build_plan, api.make_plan)
            return min(self.tokens_per_step, rows)
        return rows

    @property
    def rows(self) -> tuple[int, int]:
        """(batch, sequence) of the tensors the model sees: padding-free flattens the step
        into one row (TRL DataCollatorForLanguageModeling with padding_free: `input_ids =
        [torch.cat(input_ids)]`, trl/trainer/sft_trainer.py)."""
        if self.layout == "padding-free":
            return 1, self.tokens
        return self.batch_size, self.seq_len

    @property
    def attention_masked(self) -> bool:
        """Every layer's attention gets an explicit mask: packed or padding-free rows
        under sdpa. transformers 5.25 masking_utils `create_causal_mask` finds the packed
        sequences from position_ids (`find_packed_sequence_indices`, with no 2-D
        attention_mask) and then turns `allow_is_causal_skip` off: sdpa gets a (batch, 1,
        S, S) bool block-causal mask instead of is_causal. Flash attention takes the
        sequences' boundaries (varlen, cu_seqlens) and no mask; eager has a mask anyway."""
        return self.layout != "padded" and self.attn == "sdpa"

    def target_list(self) -> list[str]:
        return self.targets.split(",")
