"""Measure one QLoRA training point for real: the canonical recipe, under HF Trainer.

The recipe (../shared/QLORA_MEMORY.md): `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...), dtype=bf16)`, `prepare_model_for_kbit_training`, `get_peft_model`,
then `Trainer(bf16=True, optim=..., gradient_checkpointing=...)` steps on full-length random
token sequences. Memory is read at every phase boundary: torch allocator statistics
(allocated / reserved, current and peak), NVML device memory (a polling thread keeps its
peak) and the exact bytes of every static tensor by category.

This is the only module, with `weights.py`, that imports torch, transformers,
bitsandbytes and peft; it is imported inside command bodies only. It runs one point per
process (see `worker.py`): peaks are only clean in a fresh process.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vramcalc.plan_settings import TrainPlan
from vramcalc.specs import ModelSpec

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
    """Polls NVML device 'used' memory in a thread and keeps the maximum (bytes)."""

    def __init__(self, index: int = 0, period_s: float = 0.002) -> None:
        self.peak_used = 0
        self.last_used = 0
        self._stop = threading.Event()
        self._period = period_s
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # NVML missing (CPU runs): the poller stays silent
            self._nvml = None

    def used(self) -> int:
        if self._nvml is None:
            return 0
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used(self) -> int:
        """This process's memory as NVML lists it (nvidia-smi's per-process column)."""
        if self._nvml is None:
            return 0
        pid = os.getpid()
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return 0
        return sum(int(p.usedGpuMemory or 0) for p in procs if p.pid == pid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            used = self.used()
            self.last_used = used
            self.peak_used = max(self.peak_used, used)
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


def _bnb_config(plan: TrainPlan) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, _TORCH_DTYPES[plan.compute_dtype])
    if plan.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if plan.quant == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def lora_target_modules(spec: ModelSpec, plan: TrainPlan) -> Any:
    return "all-linear" if plan.targets == "all-linear" else plan.target_list()


def measure_point(
    spec: ModelSpec,
    plan: TrainPlan,
    weights_dir: str | None,
    steps: int = 3,
    device: str = "cuda",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run the canonical recipe for `steps` optimizer steps and return every reading.

    `weights_dir` holds a saved checkpoint (random or real weights); None builds the model
    from `spec` (CPU tests of tiny models only: a 4-bit load needs a checkpoint on disk,
    so one is written to a temporary folder first).
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    on_gpu = device == "cuda"
    log = PhaseLog()
    poller = NvmlPoller()
    baseline_used = poller.used()
    result: dict[str, Any] = {"oom": False, "oom_phase": None}
    readings: list[dict[str, int]] = []
    t0 = time.perf_counter()

    if on_gpu:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        result["context_bytes"] = poller.used() - baseline_used - torch.cuda.memory_reserved()
    poller.start()
    phase = "load"
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if weights_dir is None:
            from vramcalc.calibrate.weights import save_random_weights

            tmp = tempfile.TemporaryDirectory(prefix="vramcalc-weights-")
            save_random_weights(spec, tmp.name, device="cpu")
            weights_dir = tmp.name
        dtype = getattr(torch, _TORCH_DTYPES[plan.compute_dtype])
        model = AutoModelForCausalLM.from_pretrained(
            weights_dir,
            quantization_config=_bnb_config(plan),
            dtype=dtype,
            device_map={"": 0} if on_gpu else {"": "cpu"},
            attn_implementation=plan.attn,
            trust_remote_code=trust_remote_code,  # off unless --trust-remote-code
        )
        log.mark("after_load")
        result["static_after_load"] = static_tensor_bytes(model)
        phase = "prepare"
        if plan.quant != "none":
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=plan.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        log.mark("after_prepare")
        phase = "peft"
        lora = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.alpha,
            lora_dropout=plan.lora_dropout,
            target_modules=lora_target_modules(spec, plan),
            use_dora=plan.use_dora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        log.mark("after_peft")
        result["static_after_peft"] = static_tensor_bytes(model)

        phase = "train"

        class Recorder(TrainerCallback):  # type: ignore[misc]  # phases of each optimizer step
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    readings.append({"step_begin": torch.cuda.memory_allocated()})

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if on_gpu:
                    torch.cuda.synchronize()
                    readings[-1]["fwd_bwd_peak"] = torch.cuda.max_memory_allocated()
                    readings[-1]["fwd_bwd_peak_reserved"] = torch.cuda.max_memory_reserved()
                    readings[-1]["after_backward"] = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if on_gpu:
                    torch.cuda.synchronize()
                    readings[-1]["optimizer_peak"] = torch.cuda.max_memory_allocated()
                    readings[-1]["optimizer_peak_reserved"] = torch.cuda.max_memory_reserved()
                    readings[-1]["after_optimizer"] = torch.cuda.memory_allocated()

        forward_marks: list[dict[str, int]] = []

        def after_forward(module: Any, inputs: Any, output: Any) -> None:
            if on_gpu:
                forward_marks.append(
                    {
                        "fwd_peak": torch.cuda.max_memory_allocated(),
                        "after_forward": torch.cuda.memory_allocated(),
                    }
                )

        model.register_forward_hook(after_forward)

        ids = torch.randint(0, spec.vocab_size, (plan.batch_size * steps * 2, plan.seq_len))
        dataset = [{"input_ids": row, "labels": row} for row in ids]
        out_dir = tempfile.mkdtemp(prefix="vramcalc-trainer-")
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=plan.batch_size,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=2e-4,
            bf16=on_gpu and plan.compute_dtype == "bf16",
            fp16=on_gpu and plan.compute_dtype == "fp16",
            optim=plan.optimizer,
            gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            use_cpu=not on_gpu,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Recorder()])
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        log.mark("before_train")
        trainer.train()
        if on_gpu:
            torch.cuda.synchronize()
        log.mark("after_train")
        result["steps"] = readings
        result["forward_marks"] = forward_marks
        result["static_after_train"] = static_tensor_bytes(model)
        result["optimizer_state_bytes"] = _optimizer_state_bytes(trainer.optimizer)
    except torch.cuda.OutOfMemoryError as err:
        result["oom"] = True
        result["oom_phase"] = phase
        result["oom_message"] = str(err).splitlines()[0][:300]
    finally:
        poller.stop()
        if tmp is not None:
            tmp.cleanup()

    if on_gpu:
        stats = torch.cuda.memory_stats()
        result["torch_peak_allocated"] = int(stats.get("allocated_bytes.all.peak", 0))
        result["torch_peak_reserved"] = int(stats.get("reserved_bytes.all.peak", 0))
        result["num_alloc_retries"] = int(stats.get("num_alloc_retries", 0))
        result["num_ooms"] = int(stats.get("num_ooms", 0))
        result["nvml_peak_used_minus_baseline"] = poller.peak_used - baseline_used
        result["nvml_end_used_minus_baseline"] = poller.used() - baseline_used
        result["nvml_process_used_end"] = poller.process_used()
        # Peaks are reset at every phase boundary; the run's peak is the max over phases.
        phase_peaks = [m["max_allocated"] for m in log.marks.values()]
        phase_peaks += [v for s in readings for k, v in s.items() if k.endswith("_peak")]
        reserved = [m["max_reserved"] for m in log.marks.values()]
        reserved += [v for s in readings for k, v in s.items() if k.endswith("_peak_reserved")]
        result["peak_allocated_bytes"] = max(phase_peaks + [result["torch_peak_allocated"]])
        result["peak_reserved_bytes"] = max(reserved + [result["torch_peak_reserved"]])
        result["peak_device_bytes"] = result["nvml_peak_used_minus_baseline"]
    result["marks"] = log.marks
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "cuda": torch.version.cuda,
    }
    return result


def _optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Optimizer state tensors, split into device (torch allocator) and paged (managed)."""
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
