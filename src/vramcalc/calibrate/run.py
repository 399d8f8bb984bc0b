"""Measure one training point for real: qlora, lora or full, under HF Trainer or a plain loop.

The QLoRA recipe (../shared/QLORA_MEMORY.md): `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...), dtype=bf16)`, `prepare_model_for_kbit_training`, `get_peft_model`,
then `Trainer(bf16=True, optim=..., gradient_checkpointing=...)` steps on full-length random
token sequences. lora skips the quantization and prepare; full skips peft and trains every
parameter in its load dtype. Memory is read at every phase boundary and at every step:
torch allocator statistics (allocated / reserved, current and peak), NVML memory (a
polling thread keeps the peaks of the device and of this process) and the exact bytes of
every static tensor by category. `snapshot=True` summarizes the allocator trace at the
peak (`trace.py`).

This is the only module, with `weights.py`, that imports torch, transformers,
bitsandbytes and peft; it is imported inside command bodies only. It runs one point per
process (see `worker.py`): peaks are only clean in a fresh process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramcalc.models.spec import ModelSpec
from vramcalc.plans import TrainPlan

_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class PhaseLog:
    """Allocator readings at named moments of the run, in bytes."""

    marks: dict[str, dict[str, int]] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        self.marks[name] = {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated(),
            "max_reserved": torch.cuda.max_memory_reserved(),
        }


class NvmlPoller:
    """Polls NVML in a thread and keeps the maxima (bytes) of device-wide 'used' memory and
    of this process's own memory.

    With several workers on one GPU the device-wide 'used' is shared, so the process's
    entry in `nvmlDeviceGetComputeRunningProcesses` (nvidia-smi's per-process column) is
    the reading that belongs to this point. Some containers list no processes (or list
    host pids): then `process_source` is "device" and only device-wide readings exist.
    """

    def __init__(self, index: int = 0, period_s: float = 0.005, enabled: bool = True) -> None:
        self.peak_used = 0
        self.last_used = 0
        self.peak_process_used = 0
        self.process_seen = False
        self._stop = threading.Event()
        self._period = period_s
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        self._pid = os.getpid()
        self._nvml: Any = None
        if not enabled:  # a timing run: no thread, no readings
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # NVML missing (CPU runs): the poller stays silent
            self._nvml = None

    @property
    def process_source(self) -> str:
        return "process" if self.process_seen else "device"

    def used(self) -> int:
        if self._nvml is None:
            return 0
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used(self) -> int | None:
        """This process's memory as NVML lists it; None when NVML does not list it."""
        if self._nvml is None:
            return None
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        mine = [int(p.usedGpuMemory or 0) for p in procs if p.pid == self._pid]
        if not mine:
            return None
        self.process_seen = True
        return sum(mine)

    def _loop(self) -> None:
        while not self._stop.is_set():
            used = self.used()
            self.last_used = used
            self.peak_used = max(self.peak_used, used)
            mine = self.process_used()
            if mine is not None:
                self.peak_process_used = max(self.peak_process_used, mine)
            time.sleep(self._period)

    def start(self) -> None:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def static_tensor_bytes(model: Any) -> dict[str, int]:
    """Exact bytes of every parameter and buffer, by the estimator's categories.

    - base_weights: packed 4-bit (`Params4bit`) or int8 (`Int8Params`) weight storage;
    - quant_constants: absmax, nested absmax, offset and code tables of the 4-bit
      QuantState (bitsandbytes `functional.QuantState`), int8 row scales (SCB);
    - unquantized: every other frozen parameter (embeddings, lm_head, norms, biases);
    - lora: trainable parameters (LoRA A/B, DoRA magnitudes);
    - buffers: registered buffers (rotary inv_freq ...).
    """
    out = {"base_weights": 0, "quant_constants": 0, "unquantized": 0, "lora": 0, "buffers": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        nbytes = param.numel() * param.element_size()
        kind = param.__class__.__name__
        if "lora_" in name:
            out["lora"] += nbytes
        elif kind in ("Params4bit", "Int8Params"):
            out["base_weights"] += nbytes
            out["quant_constants"] += _quant_state_bytes(param)
        else:
            out["unquantized"] += nbytes
    for _, buf in model.named_buffers():
        out["buffers"] += buf.numel() * buf.element_size()
    return out


def _quant_state_bytes(param: Any) -> int:
    total = 0
    qs = getattr(param, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
        nested = getattr(qs, "state2", None)
        if nested is not None:
            for t in (nested.absmax, nested.code):
                if t is not None:
                    total += t.numel() * t.element_size()
    scb = getattr(param, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


def torch_dtype(name: str) -> Any:
    """'bf16' -> torch.bfloat16."""
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def quant_config(quant: str, compute_dtype: str, double_quant: bool,
                 quant_storage: str | None = None) -> Any:
    """The BitsAndBytesConfig of a base: None for a 16/32-bit one (quant none).
    `quant_storage`: the dtype the packed 4-bit weights are stored in (bitsandbytes' default
    uint8 when None; the same bytes either way)."""
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    extra = {} if quant_storage is None else {
        "bnb_4bit_quant_storage": torch_dtype(quant_storage)}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        **extra,
    )


# How the model is prepared for training (a worker job's "prep", a matrix point's): "peft"
# is the worker's own recipe, chosen by the plan's fields (`_wrap_for_method`); "axolotl"
# and "llama-factory" repeat those trainers' own calls on a 4/8-bit base, the plan they map
# to being kbit_prep False with fp32 adapters (trainers.AXOLOTL_KBIT, training_config.
# _axolotl_kbit / _llama_factory). Both trainers checkpoint reentrant by default (axolotl
# 067b021 utils/config/__init__.py normalize_config: gradient_checkpointing_kwargs
# {"use_reentrant": True}; LLaMA-Factory ff6d4d1 hparams/model_args.py use_reentrant_gc
# True); a job's "gc_reentrant" overrides it (their configs' `gradient_checkpointing_kwargs:
# {use_reentrant: false}` / `use_reentrant_gc: false`). The estimator models non-reentrant
# checkpointing only (memory/program/step.py), the peft recipe's.
# "unsloth": Unsloth itself loads and wraps the model (calibrate/unsloth_prep.py), the plan
# being the --trainer unsloth preset's; its checkpointing is its own (no use_reentrant).
TRAINER_PREPS = ("peft", "axolotl", "llama-factory", "unsloth")
_PREP_REENTRANT = {"peft": False, "axolotl": True, "llama-factory": True, "unsloth": False}


def prep_error(plan: TrainPlan, prep: str, gc_reentrant: bool | None) -> str | None:
    """Why a point cannot be prepared with `prep` (and `gc_reentrant`), or None."""
    if prep not in TRAINER_PREPS:
        return f"prep must be one of {', '.join(TRAINER_PREPS)}, got {prep!r}"
    if prep == "peft":
        if gc_reentrant:
            return ("gc_reentrant is for prep axolotl / llama-factory (the peft recipe "
                    "checkpoints non-reentrant, as the estimator models)")
        return None
    if prep == "unsloth":
        from vramcalc.calibrate.unsloth_prep import unsloth_error

        return unsloth_error(plan, gc_reentrant)
    if plan.method != "qlora" or plan.kbit_prep or plan.adapter_dtype != "fp32":
        return (f"prep {prep} prepares a 4/8-bit base as planned with kbit_prep false and "
                f"adapter_dtype fp32 (method qlora); this plan: method {plan.method}, "
                f"kbit_prep {str(plan.kbit_prep).lower()}, adapter_dtype {plan.adapter_dtype}")
    if plan.loop != "trainer" or plan.loss_kernel != "torch" or plan.layout != "padded" \
            or plan.offload_activations != "none":
        return (f"prep {prep} is measured under loop trainer with the torch loss, padded "
                "rows and no offloading (the preparation alone)")
    if gc_reentrant is not None and not plan.gradient_checkpointing:
        return "gc_reentrant needs gradient checkpointing"
    return None


def gc_reentrant_of(prep: str, gc_reentrant: bool | None) -> bool:
    """The use_reentrant a point checkpoints with: the job's, else its trainer's default."""
    return _PREP_REENTRANT[prep] if gc_reentrant is None else gc_reentrant


def _bnb_config(plan: TrainPlan, prep: str = "peft") -> Any:
    """The quantization config of the plan: None for lora/full (a 16/32-bit base). The
    trainers store the packed 4-bit weights in bf16 (axolotl 067b021 loaders/model.py
    `bnb_4bit_quant_storage: torch.bfloat16`; LLaMA-Factory ff6d4d1 model_utils/
    quantization.py `bnb_4bit_quant_storage=model_args.compute_dtype`)."""
    if plan.method != "qlora":
        return None
    storage = {"peft": None, "axolotl": "bf16", "llama-factory": plan.compute_dtype}[prep]
    return quant_config(plan.quant, plan.compute_dtype, plan.double_quant, storage)


def lora_target_modules(spec: ModelSpec, plan: TrainPlan) -> Any:
    return "all-linear" if plan.targets == "all-linear" else plan.target_list()


# Step markers written into the allocator trace (`snapshot: true`): two small-pool
# allocations of unusual sizes back to back begin step k; another pair ends the run.
# Multiples of 512 below 1 MiB, so the block size equals the requested size.
MARK_STEP = (512 * 1999, 512 * 1997)
MARK_END = (512 * 1993, 512 * 1987)
MARK_TRAIN = (512 * 1979, 512 * 1973)  # load and prepare done (trace files only)


def _trace_mark(pair: tuple[int, int]) -> None:
    import torch

    a = torch.empty(pair[0], dtype=torch.uint8, device="cuda")
    b = torch.empty(pair[1], dtype=torch.uint8, device="cuda")
    del a, b


def _step_begin(readings: list[dict[str, int]], tracing: bool) -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    readings.append({"step_begin": torch.cuda.memory_allocated()})
    if tracing:
        _trace_mark(MARK_STEP)


def _before_optimizer(readings: list[dict[str, int]]) -> None:
    import torch

    torch.cuda.synchronize()
    readings[-1]["fwd_bwd_peak"] = torch.cuda.max_memory_allocated()
    readings[-1]["fwd_bwd_peak_reserved"] = torch.cuda.max_memory_reserved()
    readings[-1]["after_backward"] = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()


def _tick(clock: list[float], on_gpu: bool) -> None:
    """A step boundary on the clock, after every queued kernel has finished."""
    import torch

    if on_gpu:
        torch.cuda.synchronize()
    clock.append(time.perf_counter())


def step_seconds(clock: list[float]) -> dict[str, Any]:
    """Step times from `clock` (begin, end, begin, end, ...): every step's seconds, and the
    median over the steps after the first (the first step warms up cuBLAS, the caching
    allocator and bitsandbytes' paged buffers); None when fewer than two steps ended."""
    import statistics

    each = [round(clock[k + 1] - clock[k], 6) for k in range(0, len(clock) - 1, 2)]
    timed = each[1:]
    return {"step_seconds_each": each,
            "step_seconds": statistics.median(timed) if timed else None}


def _after_optimizer(readings: list[dict[str, int]]) -> None:
    import torch

    torch.cuda.synchronize()
    readings[-1]["optimizer_peak"] = torch.cuda.max_memory_allocated()
    readings[-1]["optimizer_peak_reserved"] = torch.cuda.max_memory_reserved()
    readings[-1]["after_optimizer"] = torch.cuda.memory_allocated()


def _load_model(spec: ModelSpec, plan: TrainPlan, weights_dir: str, on_gpu: bool,
                trust_remote_code: bool, prep: str = "peft") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        weights_dir,
        quantization_config=_bnb_config(plan, prep),
        dtype=torch_dtype(plan.load_dtype),
        device_map={"": 0} if on_gpu else {"": "cpu"},
        attn_implementation=plan.attn,
        trust_remote_code=trust_remote_code,  # off unless --trust-remote-code
    )


def _wrap_for_method(model: Any, spec: ModelSpec, plan: TrainPlan, prep: str = "peft",
                     gc_reentrant: bool = False) -> Any:
    """prepare_model_for_kbit_training (qlora with kbit_prep), get_peft_model (qlora,
    lora); full: as is. `prep` "axolotl" / "llama-factory": those trainers' own calls
    (`_axolotl_prepare`, `_llama_factory_prepare`; prep_error has checked the plan),
    checkpointing with `gc_reentrant`.

    lora with checkpointing calls `enable_input_require_grads()` as peft's
    prepare_model_for_kbit_training and TRL's SFTTrainer do, so that checkpointed blocks
    whose parameters are all frozen still get a gradient path.

    qlora without kbit_prep is what TRL's SFTTrainer.__init__ does (trl 1.16.0
    sft_trainer.py): `get_peft_model(model, peft_config)` on the quantized model as loaded
    (norms, embeddings, lm_head in the load dtype), then `model.enable_input_require_grads()`
    under gradient checkpointing; checkpointing itself is turned on as for lora (Trainer's
    gradient_checkpointing argument, or `_checkpointing` in the loops outside Trainer).
    Then, for any LoRA plan whose adapter_dtype is not fp32, every trainable parameter but
    lora_magnitude_vector is cast to it as SFTTrainer casts a quantized model's
    (`param.data = param.data.to(torch.bfloat16)`).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if prep == "axolotl":
        return _axolotl_prepare(model, spec, plan, gc_reentrant)
    if prep == "llama-factory":
        return _llama_factory_prepare(model, spec, plan, gc_reentrant)
    if plan.kbit_upcast:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if plan.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if plan.method == "lora" and plan.gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, _lora_config(spec, plan))
    if plan.method == "qlora" and not plan.kbit_prep and plan.gradient_checkpointing:
        model.enable_input_require_grads()
    cast_adapters(model, plan.adapter_dtype)
    return model


def _lora_config(spec: ModelSpec, plan: TrainPlan) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=plan.rank,
        lora_alpha=plan.alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=lora_target_modules(spec, plan),
        use_dora=plan.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


# axolotl 067b021 src/axolotl/loaders/utils.py get_linear_embedding_layers (by model_type;
# every other type: embed_tokens, lm_head)
_AXOLOTL_EMBEDDINGS = {"gpt_neox": ("embed_in", "embed_out"),
                       "falcon": ("word_embeddings", "lm_head"),
                       "nemotron_h": ("embeddings", "lm_head")}


def _axolotl_convert(model: Any, embeddings: tuple[str, ...], dtype: Any,
                     before_kbit: bool) -> None:
    """axolotl 067b021 loaders/model.py ModelLoader._convert_embedding_modules_dtype (no
    fp32_norms, no lora_on_cpu, not btlm): every module with "norm" in its name to `dtype`;
    before the kbit preparation also every router `.gate`; the embedding modules too."""
    for name, module in model.named_modules():
        if "norm" in name:
            module.to(dtype)
        if before_kbit and name.endswith(".gate"):
            module.to(dtype)
        if any(m in name for m in embeddings) and hasattr(module, "weight"):
            module.to(dtype=dtype)


def _axolotl_prepare(model: Any, spec: ModelSpec, plan: TrainPlan, reentrant: bool) -> Any:
    """A quantized base as axolotl 067b021 prepares it for adapter lora / qlora with
    load_in_4bit / load_in_8bit, one GPU, no FSDP / DeepSpeed (src/axolotl/loaders/model.py
    ModelLoader.load -> _apply_post_model_load_setup -> _configure_embedding_dtypes, then
    _load_adapters -> loaders/adapter.py load_lora, then _apply_post_lora_load_setup):

    1. `_convert_embedding_modules_dtype(float32, before_kbit_train_or_finetune=True)`: the
       norms, routers and embed_tokens / lm_head to fp32;
    2. with gradient checkpointing, `gradient_checkpointing_enable(gradient_checkpointing_
       kwargs=cfg.gradient_checkpointing_kwargs)` ({"use_reentrant": True} unless the
       config says otherwise);
    3. `_prepare_model_for_quantization`: peft `prepare_model_for_kbit_training(model,
       use_gradient_checkpointing=cfg.gradient_checkpointing)` (every remaining 16-bit
       parameter, e.g. the quantized layers' biases, to fp32; input grads);
    4. `_convert_embedding_modules_dtype(cfg.torch_dtype, False)` (adapter lora / qlora:
       needs_fa2_dtype): the norms and embed_tokens / lm_head back to the load dtype (the
       routers and biases stay fp32);
    5. load_lora: `get_peft_model(model, lora_config)` (autocast_adapter_dtype: fp32
       adapters), no cast of them;
    6. `gc.collect(); torch.cuda.empty_cache()` three times.
    The Trainer then checkpoints with the same kwargs (core/builders/base.py
    _configure_gradient_checkpointing; `measure_point`'s TrainingArguments)."""
    import gc

    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    embeddings = _AXOLOTL_EMBEDDINGS.get(spec.model_type, ("embed_tokens", "lm_head"))
    _axolotl_convert(model, embeddings, torch.float32, True)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=plan.gradient_checkpointing)
    _axolotl_convert(model, embeddings, torch_dtype(plan.load_dtype), False)
    model = get_peft_model(model, _lora_config(spec, plan))
    for _ in range(3):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return model


def _checkpointed_module(func: Any) -> Any:
    """The layer a GradientCheckpointingLayer hands to its checkpoint function:
    LLaMA-Factory reads `func.func.__self__` (transformers <= 5.8 pass `partial(super().
    __call__, **kwargs)`); later ones pass `partial(forward, self, **kwargs)` (transformers
    5.25 modeling_layers.py), whose layer is the partial's first argument."""
    from functools import partial

    target = func.func if isinstance(func, partial) else func
    module = getattr(target, "__self__", None)
    if module is None and isinstance(func, partial) and func.args:
        module = func.args[0]
    return module


def llama_factory_checkpoint_func(reentrant: bool) -> Any:
    """LLaMA-Factory ff6d4d1 model/model_utils/checkpointing.py
    get_custom_gradient_checkpointing_func over `partial(checkpoint, use_reentrant=...)`:
    a layer with a trainable parameter is checkpointed, its first floating tensor argument
    (the hidden states) made to require grad first; a layer without one runs as is."""
    from functools import partial

    import torch
    from torch.utils.checkpoint import checkpoint

    inner = partial(checkpoint, use_reentrant=reentrant)

    def custom_gradient_checkpointing_func(func: Any, *args: Any, **kwargs: Any) -> Any:
        module = _checkpointed_module(func)
        if any(param.requires_grad for param in module.parameters()):
            for arg in args:
                if torch.is_tensor(arg) and torch.is_floating_point(arg):
                    arg.requires_grad_(True)
                    break
            return inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    return custom_gradient_checkpointing_func


def _llama_factory_prepare(model: Any, spec: ModelSpec, plan: TrainPlan,
                           reentrant: bool) -> Any:
    """A quantized base as LLaMA-Factory ff6d4d1 prepares it for LoRA (src/llamafactory/
    model/loader.py load_model: patcher.py patch_model, then adapter.py init_adapter):

    1. model_utils/checkpointing.py prepare_model_for_training: no norm upcast
       (upcast_layernorm false); with gradient checkpointing (disable_gradient_checkpointing
       false) its own `_gradient_checkpointing_enable` installs
       `llama_factory_checkpoint_func` through `_set_gradient_checkpointing(enable=True,
       gradient_checkpointing_func=...)` (no enable_input_require_grads: the function makes
       the hidden states require grad) and sets config.use_cache False; no lm_head output
       hook (upcast_lmhead_output false). No prepare_model_for_kbit_training anywhere.
    2. init_adapter -> _setup_lora_tuning: `get_peft_model(model, peft_config)`, then
       every trainable parameter to fp32 (cast_trainable_params_to_fp32: not pure_bf16).
    The HF Trainer does not checkpoint again (TrainingArguments.gradient_checkpointing
    stays False: `measure_point`)."""
    import torch
    from peft import get_peft_model

    if plan.gradient_checkpointing:
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=llama_factory_checkpoint_func(reentrant))
        model.config.use_cache = False
    model = get_peft_model(model, _lora_config(spec, plan))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return model


def cast_adapters(model: Any, adapter_dtype: str) -> None:
    """Every trainable parameter but DoRA's lora_magnitude_vector cast to `adapter_dtype`
    (nothing for fp32, get_peft_model's autocast_adapter_dtype already made them fp32), as
    trl 1.16.0 sft_trainer.py SFTTrainer.__init__ does for a quantized model."""
    if adapter_dtype == "fp32":
        return
    wanted = torch_dtype(adapter_dtype)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(wanted)


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_loss_kernel(model: Any, plan: TrainPlan) -> None:
    """Put the plan's loss kernel (TrainPlan.loss_kernel) on the model, as its users do.
    Imports are lazy: liger-kernel and cut-cross-entropy are device-only wheels
    (calibration/DEVICE.md).

    liger: liger-kernel's `_apply_liger_kernel_to_instance` on the CausalLM, what
    transformers' Trainer does for `use_liger_kernel=True`. Trainer does it in `train()`
    (transformers 5.x trainer.py `Trainer.train`: `apply_liger_kernel(self.model, ...)`),
    not in `__init__`, so only the `trainer` loop gets it from TrainingArguments; the
    loops that never call `train()` (`plain`, and the `trainer-plain*` loops, which only
    build a Trainer for its optimizer) get it here.
    trl-chunked: TRL's own patch (`_patch_chunked_ce_lm_head`), as SFTTrainer 1.4-1.14
    applies it. trl-fused: TRL's `add_fused_lm_head` (trl >= 1.15), as SFTTrainer applies
    it; the loss is SFTTrainer.compute_loss's (`_sft_trainer`).
    cce and chunked: the CausalLM's forward replaced, in training with labels, by the
    decoder, then the loss from its last hidden state (`_head_loss_forward`)."""
    if plan.loss_kernel == "torch":
        return
    lm = _causal_lm(model)
    if plan.loss_kernel == "liger":
        if plan.loop != "trainer":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=lm)
        return
    if plan.loss_kernel == "trl-chunked":
        # what SFTTrainer.__init__ does for loss_type="chunked_nll" (trl 1.4-1.14
        # sft_trainer.py): patch the inner CausalLM's forward, chunks of 256 tokens
        from trl.trainer.sft_trainer import _CHUNKED_LM_HEAD_CHUNK_SIZE, _patch_chunked_ce_lm_head

        _patch_chunked_ce_lm_head(lm, chunk_size=_CHUNKED_LM_HEAD_CHUNK_SIZE)
        return
    if plan.loss_kernel == "trl-fused":
        # what SFTTrainer.__init__ does in trl 1.15+ (1.16.0 sft_trainer.py, after the peft
        # wrapping, on `self.model.get_base_model()`): the fused LM head on the CausalLM;
        # the trainer loop's compute_loss calls it (_SFTLoss.compute_loss)
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(lm, outputs=TRL_FUSED_OUTPUTS)
        return
    import types

    lm.forward = types.MethodType(_head_loss_forward(plan.loss_kernel, lm.forward), lm)


# trl 1.16.0 sft_trainer.py SFTTrainer.__init__: add_fused_lm_head's outputs (`is_top1`
# feeds mean_token_accuracy)
TRL_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _sft_loss_trainer(base: Any) -> Any:
    """`base` (transformers Trainer or a subclass) with TRL SFTTrainer's compute_loss for
    its default loss (trl 1.16.0 sft_trainer.py SFTTrainer.compute_loss, loss_type "nll",
    no compute_loss_func, no label smoothing, one process: gather_for_metrics is the
    identity): `model(**inputs, fused_lm_head=True)`, `-outputs.log_probs` summed over the
    labelled tokens, then the metrics SFTTrainer logs (entropy, mean_token_accuracy,
    num_tokens), each read with `.item()` as it does."""

    class SFTLossTrainer(base):  # type: ignore[misc,valid-type]
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            import torch

            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_token_loss = -outputs.log_probs  # zero on ignored positions
            num_tokens = (outputs.label_mask.sum() if num_items_in_batch is None
                          else num_items_in_batch)
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            num_valid = outputs.label_mask.sum()
            entropy_sum = outputs.entropy.detach().sum()
            num_correct = outputs.is_top1.sum()
            metrics = self.__dict__.setdefault("_sft_metrics", [])
            metrics.append(((entropy_sum / num_valid).item() if num_valid > 0 else 0.0,
                            (num_correct / num_valid).item() if num_valid > 0 else 0.0))
            if "attention_mask" in inputs:
                inputs["attention_mask"].sum().item()
            return (loss, outputs) if return_outputs else loss

    return SFTLossTrainer


def _head_loss_forward(kernel: str, original: Any) -> Any:
    """A CausalLM forward that, in training with labels, runs the decoder and computes
    the loss without the model's logits; otherwise the original forward.

    cce: cut-cross-entropy's `linear_cross_entropy(e, c, labels, shift=True)` as its
    transformers patch calls it (cut_cross_entropy/transformers/utils.py apply_lce), e and
    c cast to the autocast dtype first as upstream's LinearCrossEntropyFunction does
    (the 25.1.1 wheel's backward refuses fp32 embeddings), softcap from the config.
    chunked: torchtune's CEWithChunkedOutputLoss (num_output_chunks 8): the lm_head on
    each chunk of the sequence (with the model's final logit softcapping), then per chunk
    `F.cross_entropy(logits.float(), labels, reduction="sum")`, divided by the labelled
    tokens."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self: Any, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
        if not (self.training and labels is not None):
            return original(input_ids=input_ids, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = self.model(input_ids=input_ids, **kwargs)
        hidden = out[0]
        cap = getattr(self.config, "final_logit_softcapping", None)
        if kernel == "cce":
            from cut_cross_entropy import linear_cross_entropy

            e, c = hidden, self.lm_head.weight
            if torch.is_autocast_enabled():
                dtype = torch.get_autocast_gpu_dtype()
                e, c = e.to(dtype), c.to(dtype)
            loss = linear_cross_entropy(e, c, labels, shift=True, softcap=cap)
        else:
            # labels shifted as transformers' ForCausalLMLoss does: pad, then drop the first
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
            logits = [self.lm_head(chunk) for chunk in hidden.chunk(8, dim=1)]
            if cap:
                logits = [torch.tanh(lg / cap) * cap for lg in logits]
            total = sum(
                F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), y.reshape(-1),
                                ignore_index=-100, reduction="sum")
                for lg, y in zip(logits, shifted.chunk(8, dim=1), strict=True))
            loss = total / (shifted != -100).sum()
        return CausalLMOutputWithPast(loss=loss, past_key_values=getattr(
            out, "past_key_values", None))

    return forward


def _known_addresses(model: Any, optimizer: Any) -> dict[int, str]:
    """data_ptr -> category for blocks the allocator trace may not have seen allocated."""
    known: dict[int, str] = {}
    for param in model.parameters():
        if param.device.type != "cuda":
            continue
        kind = "parameters_trainable" if param.requires_grad else "parameters_frozen"
        known.setdefault(param.data_ptr(), kind)
        qs = getattr(param, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, getattr(getattr(qs, "state2", None), "absmax", None)):
                if t is not None:
                    known.setdefault(t.data_ptr(), "quant_constants")
        if param.grad is not None:
            known.setdefault(param.grad.data_ptr(), "gradients")
    for _, buf in model.named_buffers():
        if buf.device.type == "cuda":
            known.setdefault(buf.data_ptr(), "buffers")
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if hasattr(value, "data_ptr") and getattr(value, "is_cuda", False):
                known.setdefault(value.data_ptr(), "optimizer_states")
    return known


def measure_point(
    spec: ModelSpec,
    plan: TrainPlan,
    weights_dir: str | None,
    steps: int = 3,
    device: str = "cuda",
    trust_remote_code: bool = False,
    snapshot: bool = False,
    memory_limit_gib: float | None = None,
    trace_file: str | None = None,
    poll_nvml: bool = True,
    prep: str = "peft",
    gc_reentrant: bool | None = None,
) -> dict[str, Any]:
    """Run `plan` for `steps` optimizer steps and return every reading.

    Methods: qlora (4-bit nf4/fp4 or int8 base, prepare_model_for_kbit_training, LoRA),
    lora (16-bit base, LoRA), full (every parameter trained; bf16 weights = pure bf16,
    fp32 weights = fp32 master weights under bf16 autocast). Loops: HF Trainer; `plain`,
    the tutorial loop with no Trainer constructed (`_tutorial_loop`); or plain steps on
    the optimizer the Trainer would build (`trainer-plain*`, `_plain_loop`).

    A failure to build the model (e.g. peft refusing a module) is a result:
    `error` and `cannot_start: true`; an out-of-memory error is a result (`oom: true`);
    another error in training is recorded in `error`. `snapshot` records the allocator
    trace during training and returns its summary (`trace.summarize_snapshot`);
    `trace_file` (with `snapshot`) also writes the whole trace without stacks there
    (`trace.compact_trace`, gzip JSON) for the allocator replay.

    `weights_dir` holds a saved checkpoint (random or real weights); None builds the model
    from `spec` (CPU tests of tiny models only: a 4-bit load needs a checkpoint on disk,
    so one is written to a temporary folder first).

    Step time: each step is timed from its beginning to its end (optimizer, scheduler and
    zero_grad included), both after `torch.cuda.synchronize()`; `step_seconds` is the
    median over the steps after the first (`step_seconds()`). `poll_nvml=False` leaves the
    NVML polling thread off (a timing run: the thread takes the GIL every 5 ms; device
    peaks are then not read).

    `prep`: how the model is prepared (TRAINER_PREPS: the worker's peft recipe, or as
    axolotl / LLaMA-Factory do it), checkpointing reentrant or not as `gc_reentrant` says
    (None: that trainer's default); a point they do not apply to is a result
    (`cannot_start`, prep_error). Both are returned with the readings.
    """
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    on_gpu = device == "cuda"
    tracing = snapshot and on_gpu
    log = PhaseLog()
    poller = NvmlPoller(enabled=poll_nvml)
    baseline_used = poller.used()
    clock: list[float] = []
    result: dict[str, Any] = {
        "oom": False,
        "oom_phase": None,
        "method": plan.method,
        "loop": plan.loop,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "prep": prep,
    }
    prep_why = prep_error(plan, prep, gc_reentrant)
    reentrant = False if prep_why else gc_reentrant_of(prep, gc_reentrant)
    if plan.gradient_checkpointing and prep != "unsloth":  # (Unsloth's own checkpointing)
        result["gc_reentrant"] = reentrant
    readings: list[dict[str, int]] = []
    forward_marks: list[dict[str, int]] = []
    t0 = time.perf_counter()

    if on_gpu:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        if memory_limit_gib is not None:
            # Emulate a smaller card for boundary runs: the caching allocator raises
            # out-of-memory once its reserved bytes would pass this (CUDACachingAllocator
            # set_memory_fraction); managed (paged) memory and the context are outside it.
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(memory_limit_gib * 2**30 / total)
            result["memory_limit_bytes"] = int(memory_limit_gib * 2**30)
        torch.cuda.synchronize()
        result["context_bytes"] = poller.used() - baseline_used - torch.cuda.memory_reserved()
        mine = poller.process_used()
        if mine is not None:
            result["context_bytes_process"] = mine - torch.cuda.memory_reserved()
    poller.start()
    if tracing and trace_file:
        # A trace file holds the load and prepare phases too: the blocks they leave free
        # in the cache (the 16-bit copies quantized away, the fp32 upcasts) are where the
        # first step's requests land.
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    phase = "load"
    tmp: tempfile.TemporaryDirectory[str] | None = None
    out_dir: str | None = None  # HF Trainer's output_dir (save_strategy "no": stays empty)
    model: Any = None
    trainer: Any = None
    optimizer: Any = None
    try:
        if prep_why is not None:
            result["error"] = prep_why
            result["cannot_start"] = True
            result["error_phase"] = phase
            raise _Stop
        if weights_dir is None:
            from vramcalc.calibrate.weights import save_random_weights

            tmp = tempfile.TemporaryDirectory(prefix="vramcalc-weights-")
            save_random_weights(spec, tmp.name, device="cpu")
            weights_dir = tmp.name
        try:
            if prep == "unsloth":
                from vramcalc.calibrate import unsloth_prep

                model = unsloth_prep.load(spec, plan, weights_dir)
            else:
                model = _load_model(spec, plan, weights_dir, on_gpu, trust_remote_code, prep)
            log.mark("after_load")
            result["static_after_load"] = static_tensor_bytes(model)
            phase = "prepare"
            if prep == "unsloth":
                model = unsloth_prep.wrap(model, plan)
            else:
                model = _wrap_for_method(model, spec, plan, prep, reentrant)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # peft/transformers refused the setup: a result
            result["error"] = _one_line(err)
            result["cannot_start"] = True
            result["error_phase"] = phase
            raise _Stop from None
        log.mark("after_prepare")
        log.mark("after_peft")
        result["static_after_peft"] = static_tensor_bytes(model)
        result["trainable_params"] = sum(
            p.numel() for p in model.parameters() if p.requires_grad
        )

        def after_forward(module: Any, inputs: Any, output: Any) -> None:
            if on_gpu:
                forward_marks.append(
                    {
                        "fwd_peak": torch.cuda.max_memory_allocated(),
                        "after_forward": torch.cuda.memory_allocated(),
                    }
                )

        model.register_forward_hook(after_forward)

        class Recorder(TrainerCallback):  # type: ignore[misc]  # phases of each step
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if offloader is not None:  # after Trainer's activation_checkpointing_enable
                    result["offload"] = {"impl": "unsloth-style",
                                         "layers": offloader.install(model)}

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                _tick(clock, on_gpu)
                if on_gpu:
                    _step_begin(readings, tracing)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                _tick(clock, on_gpu)

            def on_pre_optimizer_step(
                self, args: Any, state: Any, control: Any, **kw: Any
            ) -> None:
                if on_gpu:
                    _before_optimizer(readings)

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if on_gpu:
                    _after_optimizer(readings)

        ids = torch.randint(0, spec.vocab_size, (plan.batch_size * steps * 2, plan.seq_len))
        dataset = [{"input_ids": row, "labels": row} for row in ids]
        from vramcalc.calibrate import offload as off

        offloader: Any = None  # "checkpoints": installed once Trainer enabled checkpointing
        if plan.layout != "padded" or plan.offload_activations != "none":
            if plan.loop != "trainer":
                result["error"] = ("batch layouts and activation offloading are measured "
                                   "under --loop trainer only (TRL / axolotl / Unsloth run "
                                   "them in a Trainer)")
                result["cannot_start"] = True
                raise _Stop
            dataset = off.layout_rows(plan, spec.vocab_size,
                                      off.per_device_batch(plan) * steps * 2)
            if plan.offload_activations == "checkpoints" and prep != "unsloth":
                # (prep unsloth: Unsloth's own offloading checkpoint function)
                offloader = off.CheckpointOffload(spec.num_hidden_layers)
        out_dir = tempfile.mkdtemp(prefix="vramcalc-trainer-")  # removed in `finally`
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=off.per_device_batch(plan),
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=2e-4,
            bf16=on_gpu and plan.compute_dtype == "bf16",
            fp16=on_gpu and plan.compute_dtype == "fp16",
            optim=plan.optimizer,
            # LLaMA-Factory's model checkpoints itself (_llama_factory_prepare), Unsloth's
            # too (get_peft_model's use_gradient_checkpointing="unsloth")
            gradient_checkpointing=plan.gradient_checkpointing
            and prep not in ("llama-factory", "unsloth"),
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            use_cpu=not on_gpu,
            disable_tqdm=True,
            # Trainer.train applies liger-kernel to the model (or peft's base model); the
            # loops that do not call train() get it from apply_loss_kernel
            # (prep unsloth: Unsloth's fused loss in its own forward, unsloth_prep.py)
            use_liger_kernel=plan.loss_kernel == "liger" and plan.loop == "trainer"
            and prep != "unsloth",
        )
        if prep != "unsloth":
            apply_loss_kernel(model, plan)
        phase = "train"
        if plan.trainer_built:
            # Trainer.__init__ sets model.config.use_cache = args.use_cache (False)
            trainer_cls = Trainer
            if plan.offload_activations == "all":
                context, impl = off.offload_context(model)
                result["offload"] = {"impl": impl}

                class OffloadTrainer(Trainer):  # type: ignore[misc]
                    """TRL SFTTrainer.training_step: the step under the offload context."""

                    def training_step(self, *a: Any, **kw: Any) -> Any:
                        with context:
                            return super().training_step(*a, **kw)

                trainer_cls = OffloadTrainer
            if plan.loss_kernel == "trl-fused":
                trainer_cls = _sft_loss_trainer(trainer_cls)
            trainer = trainer_cls(model=model, args=args, train_dataset=dataset,
                                  callbacks=[Recorder()])
        if plan.use_cache is not None:
            model.config.use_cache = plan.use_cache
        elif not plan.trainer_built:
            model.config.use_cache = True  # PretrainedConfig's default, as loaded
        result["use_cache"] = bool(getattr(model.config, "use_cache", False))
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        log.mark("before_train")
        if tracing and trace_file:
            _trace_mark(MARK_TRAIN)
        elif tracing:
            torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        try:
            if plan.loop == "trainer":
                trainer.train()
                optimizer = trainer.optimizer
            elif not plan.trainer_built:
                optimizer = _tutorial_loop(model, plan, ids, steps, on_gpu, readings, tracing,
                                           clock)
            else:
                optimizer = _plain_loop(model, trainer, plan, ids, steps, on_gpu, readings,
                                        tracing, clock)
            if on_gpu:
                torch.cuda.synchronize()
        finally:
            if tracing:
                result["snapshot"] = _trace_summary(
                    model, optimizer or getattr(trainer, "optimizer", None), trace_file)
        log.mark("after_train")
        if "offload" in result:
            own = offloader if offloader is not None else (
                context if plan.offload_activations == "all" else None)
            result["offload"]["host_peak_bytes"] = getattr(own, "host_peak", None)
            if on_gpu:
                result["offload"]["host_allocator_peak_bytes"] = off.host_allocator_peak()
        result.update(step_seconds(clock))
        result["steps"] = readings
        result["forward_marks"] = forward_marks
        result["static_after_train"] = static_tensor_bytes(model)
        result["optimizer_state_bytes"] = _optimizer_state_bytes(optimizer)
    except torch.cuda.OutOfMemoryError as err:
        result["oom"] = True
        result["oom_phase"] = phase
        result["oom_message"] = " ".join(str(err).split())[:800]
        result["steps"] = readings
        if on_gpu:
            result["oom_segments"] = _oom_segments()
    except _Stop:
        pass
    except Exception as err:  # an error in training: recorded, the driver goes on
        result["error"] = _one_line(err)
        result["error_phase"] = phase
        result["steps"] = readings
    finally:
        poller.stop()
        if tmp is not None:
            tmp.cleanup()
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)

    if on_gpu:
        _final_readings(result, log, readings, poller, baseline_used)
    result["marks"] = log.marks
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "accelerate": _version("accelerate"),
        "cuda": torch.version.cuda,
    }
    if prep == "unsloth":
        result["versions"].update(unsloth=_version("unsloth"), unsloth_zoo=_version("unsloth_zoo"),
                                  trl=_version("trl"))
    return result


class _Stop(Exception):
    """The setup failed and the failure is already recorded in the result."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:500]


def direct_optimizer(model: Any, plan: TrainPlan) -> Any:
    """The optimizer a plain loop builds itself (no Trainer: no GlobalOptimManager override
    keeping nn.Embedding states 32-bit): torch.optim.AdamW (foreach, or fused), SGD, or
    bitsandbytes' AdamW8bit / PagedAdamW8bit / PagedAdamW32bit over the parameters that
    train (a frozen quantized weight is no float tensor, which fused AdamW refuses)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr = 2e-4
    if plan.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr)
    if plan.optimizer == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[plan.optimizer]
    return cls(params, lr=lr)


def _checkpointing(model: Any, plan: TrainPlan) -> None:
    """Gradient checkpointing as the loops outside Trainer turn it on: non-reentrant, and
    the inputs made to require grad where the base is frozen (what
    prepare_model_for_kbit_training(use_gradient_checkpointing=True) leaves)."""
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if plan.method != "full":
            model.enable_input_require_grads()


def _tutorial_loop(model: Any, plan: TrainPlan, ids: Any, steps: int, on_gpu: bool,
                   readings: list[dict[str, int]], tracing: bool, clock: list[float]) -> Any:
    """`--loop plain`, the loop tutorials write (issue 27): no Trainer constructed, the
    optimizer built directly (`direct_optimizer`), the forward under torch.autocast, and
    `loss = model(input_ids=batch, labels=batch).loss` kept until the next forward rebinds
    it; config.use_cache as loaded (True) unless the plan says otherwise (set by the
    caller). Checkpointing as prepare_model_for_kbit_training(use_gradient_checkpointing)
    leaves it (non-reentrant, inputs made to require grad)."""
    import contextlib

    import torch

    _checkpointing(model, plan)
    model.train()
    optimizer = direct_optimizer(model, plan)
    dev = "cuda" if on_gpu else "cpu"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.compute_dtype)
    use_amp = on_gpu and amp_dtype is not None
    loss = None
    for step in range(steps):
        batch = ids[step * plan.batch_size:(step + 1) * plan.batch_size].to(dev)
        _tick(clock, on_gpu)
        if on_gpu:
            _step_begin(readings, tracing)
        ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=batch, labels=batch).loss  # the old loss lives until here
        loss.backward()
        if on_gpu:
            _before_optimizer(readings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            _after_optimizer(readings)
        _tick(clock, on_gpu)  # the step's end (begin, end, ...: step_seconds)
    del loss
    return optimizer


def _plain_loop(model: Any, trainer: Any, plan: TrainPlan, ids: Any, steps: int,
                on_gpu: bool, readings: list[dict[str, int]], tracing: bool,
                clock: list[float]) -> Any:
    """forward with labels, backward, optimizer.step(), zero_grad(set_to_none=True), as in
    transformers' "training in native PyTorch" docs: `out` is rebound by the next forward,
    so the previous step's output (its logits) lives through that forward
    (`trainer-plain-outputs`). `trainer-plain` keeps only `model(...).loss` and deletes it
    after backward: the output is freed before backward, as under Trainer.

    The optimizer is the one HF Trainer builds from the same `optim` name
    (`Trainer.create_optimizer`), so only the loop differs from the trainer path: no
    accelerate wrapper (no `convert_outputs_to_fp32`), autocast only when the trainable
    weights are not already 16-bit (`TrainPlan.autocast`).
    """
    import contextlib

    import torch

    optimizer = trainer.create_optimizer()
    _checkpointing(model, plan)
    model.train()
    dev = "cuda" if on_gpu else "cpu"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.compute_dtype)
    use_amp = on_gpu and amp_dtype is not None and plan.autocast
    for step in range(steps):
        batch = ids[step * plan.batch_size:(step + 1) * plan.batch_size].to(dev)
        _tick(clock, on_gpu)
        if on_gpu:
            _step_begin(readings, tracing)
        ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        if plan.holds_output:
            with ctx:
                out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            if not plan.holds_output_past_step:
                del out
        else:  # plain: the output is dropped, only the loss lives on
            with ctx:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            del loss
        if on_gpu:
            _before_optimizer(readings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            _after_optimizer(readings)
        _tick(clock, on_gpu)
    return optimizer


def _trace_summary(model: Any, optimizer: Any, trace_file: str | None = None
                   ) -> dict[str, Any]:
    import torch

    from vramcalc.calibrate.trace import compact_trace, summarize_snapshot
    from vramcalc.corrections.factors import write_json_atomic

    try:
        _trace_mark(MARK_END)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if trace_file:
        try:
            write_json_atomic(Path(trace_file), compact_trace(snap))
        except Exception as err:  # a trace must never cost the measurement
            return {"error": "trace_file: " + _one_line(err)}
    try:
        known = _known_addresses(model, optimizer) if optimizer is not None else {}
        return summarize_snapshot(snap, step=-1, known=known, step_mark=MARK_STEP,
                                  end_mark=MARK_END)
    except Exception as err:  # a summary must never cost the measurement
        return {"error": _one_line(err)}


def _oom_segments() -> dict[str, Any]:
    """The allocator's segments right after an out-of-memory error (before the step's
    tensors, still held by the traceback, are freed): the caching allocator has already
    released every fully free segment (release_cached_blocks), so the free bytes left are
    the ones it could not give back. Per pool: segments, reserved, allocated, free, the
    largest free block. The message's "reserved by PyTorch but unallocated" is the same
    figure at the failing request itself."""
    import torch

    try:
        segments = torch.cuda.memory._snapshot()["segments"]
    except Exception as err:  # a summary must never cost the measurement
        return {"error": _one_line(err)}
    out: dict[str, Any] = {}
    for seg in segments:
        pool = out.setdefault(seg.get("segment_type", "?"), {
            "segments": 0, "reserved": 0, "allocated": 0, "free": 0, "largest_free": 0,
            "free_blocks": 0})
        pool["segments"] += 1
        pool["reserved"] += int(seg["total_size"])
        pool["allocated"] += int(seg["allocated_size"])
        for block in seg.get("blocks", []):
            if block.get("state") == "inactive":
                pool["free"] += int(block["size"])
                pool["free_blocks"] += 1
                pool["largest_free"] = max(pool["largest_free"], int(block["size"]))
    return out


def _final_readings(result: dict[str, Any], log: PhaseLog, readings: list[dict[str, int]],
                    poller: NvmlPoller, baseline_used: int) -> None:
    import torch

    stats = torch.cuda.memory_stats()
    result["torch_peak_allocated"] = int(stats.get("allocated_bytes.all.peak", 0))
    result["torch_peak_reserved"] = int(stats.get("reserved_bytes.all.peak", 0))
    result["num_alloc_retries"] = int(stats.get("num_alloc_retries", 0))
    result["num_ooms"] = int(stats.get("num_ooms", 0))
    result["nvml_peak_used_minus_baseline"] = poller.peak_used - baseline_used
    result["nvml_end_used_minus_baseline"] = poller.used() - baseline_used
    result["nvml_process_used_end"] = poller.process_used()
    result["nvml_process_peak_used"] = poller.peak_process_used if poller.process_seen else None
    result["nvml_process_source"] = poller.process_source
    # Peaks are reset at every phase boundary; the run's peak is the max over phases.
    phase_peaks = [m["max_allocated"] for m in log.marks.values()]
    phase_peaks += [v for s in readings for k, v in s.items() if k.endswith("_peak")]
    reserved = [m["max_reserved"] for m in log.marks.values()]
    reserved += [v for s in readings for k, v in s.items() if k.endswith("_peak_reserved")]
    result["peak_allocated_bytes"] = max(phase_peaks + [result["torch_peak_allocated"]])
    result["peak_reserved_bytes"] = max(reserved + [result["torch_peak_reserved"]])
    # This process's own NVML reading when NVML lists it (several workers share the
    # device-wide number); device-wide minus the baseline otherwise.
    if poller.process_seen:
        result["peak_device_bytes"] = poller.peak_process_used
    else:
        result["peak_device_bytes"] = result["nvml_peak_used_minus_baseline"]


def _optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Optimizer state tensors, split into device (torch allocator) and paged (managed)."""
    if optimizer is None:
        return {"device": 0, "paged": 0}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    device = paged = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "numel") and value.numel() > 1:
                nbytes = value.numel() * value.element_size()
                if getattr(value, "is_paged", False):
                    paged += nbytes
                else:
                    device += nbytes
    return {"device": device, "paged": paged}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"
