"""`python -m vramcalc.calibrate.infer_worker JOB_JSON`: measure one inference or merge point.

One point per fresh process (peaks are only clean there); prints one JSON object on the
last line of stdout. The job carries everything:

    {"task": "infer" | "merge",
     "spec": {ModelSpec fields}, "layers": 4 | null,        # null: the spec's depth
     "plan": {InferPlan or MergePlan fields},
     "weights_dir": "/path" | null,   # save_random_weights() of the (depth-cut) spec;
                                      # null: built here into a temporary folder
     "device": "cuda" | "cpu"}

Inference follows the real path: a LoRA adapter with random (non-zero) weights is created
once from a throwaway copy of the base (`get_peft_model(init_lora_weights=False)`) and
saved; the measured model is `from_pretrained(quantization_config=...)` +
`PeftModel.from_pretrained(adapter)` (+ `merge_and_unload()` for a merged plan), then
`generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` on random prompt ids.
Merges: base in 16-bit (or 4-bit), adapter attached, `merge_and_unload()`, then
`save_pretrained` to a temporary folder whose size is recorded.

Recorded: torch peak allocated / reserved, NVML peak of this process (polled in a
thread, nvmlDeviceGetComputeRunningProcesses filtered by our pid) and of the device,
allocated after load, the cache's tensor bytes; an out-of-memory error is a result.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vramcalc.calibrate.run import NvmlPoller, quant_config, torch_dtype
from vramcalc.memory.effective import attention_impl
from vramcalc.models.spec import ModelSpec
from vramcalc.plans import InferPlan, MergePlan


def job_spec(job: dict[str, Any]) -> ModelSpec:
    """The job's spec, cut to job["layers"] decoder layers when given."""
    spec = ModelSpec.model_validate(job["spec"])
    layers = job.get("layers")
    if layers:
        spec = spec.model_copy(update={"num_hidden_layers": int(layers), "expected_params": None})
    return spec


def make_adapter(weights_dir: str, rank: int, targets: str, out_dir: str) -> None:
    """Save a LoRA adapter with random weights (B non-zero) for the checkpoint, built on a
    throwaway CPU copy of the base, so the measured run loads it the real way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.bfloat16,
                                                device_map={"": "cpu"})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules="all-linear" if targets == "all-linear"
                        else targets.split(","),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(out_dir)
    del base


def load_with_adapter(weights_dir: str, adapter_dir: str | None, *, quant: str,
                      compute_dtype: str, double_quant: bool, device: str, attn: str = "sdpa",
                      adapter_dtype: str = "fp32") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        weights_dir, quantization_config=quant_config(quant, compute_dtype, double_quant),
        dtype=torch_dtype(compute_dtype),
        device_map={"": 0} if device == "cuda" else {"": "cpu"},
        attn_implementation=attn,
    )
    if adapter_dir is None:
        return model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir,
                                           autocast_adapter_dtype=adapter_dtype == "fp32")
    if adapter_dtype != "fp32":
        wanted = torch_dtype(adapter_dtype)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(wanted)
    return peft_model


def cache_tensor_bytes(cache: Any, round_to: int = 1) -> int:
    """Bytes of the storages behind a transformers Cache's keys and values (each rounded
    up to `round_to`: 512 is what the CUDA caching allocator counts)."""
    seen: set[int] = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or not hasattr(t, "untyped_storage"):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += -(-storage.nbytes() // round_to) * round_to
    return total


def generate(model: Any, spec: ModelSpec, plan: InferPlan, device: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (plan.batch_size, plan.prompt_len), generator=gen)
    ids = ids.to("cuda" if device == "cuda" else "cpu")
    kwargs: dict[str, Any] = {}
    if plan.cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens,
                              do_sample=False, return_dict_in_generate=True,
                              pad_token_id=0, **kwargs)


def _cuda_stats(result: dict[str, Any]) -> None:
    import torch

    stats = torch.cuda.memory_stats()
    result["torch_peak_allocated"] = int(stats.get("allocated_bytes.all.peak", 0))
    result["torch_peak_reserved"] = int(stats.get("reserved_bytes.all.peak", 0))
    result["num_alloc_retries"] = int(stats.get("num_alloc_retries", 0))
    result["num_ooms"] = int(stats.get("num_ooms", 0))


def _prepare(job: dict[str, Any], spec: ModelSpec, tmp: Path) -> str:
    weights_dir = job.get("weights_dir")
    if weights_dir:
        return str(weights_dir)
    from vramcalc.calibrate.weights import save_random_weights

    out = tmp / "weights"
    save_random_weights(spec, str(out), device=job["device"])
    return str(out)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    task = job.get("task", "infer")
    spec = job_spec(job)
    device = job["device"]
    on_gpu = device == "cuda"
    result: dict[str, Any] = {"task": task, "model": spec.name, "layers": spec.num_hidden_layers,
                              "plan": job["plan"], "oom": False, "oom_phase": None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vramcalc-infer-") as tmpname:
        tmp = Path(tmpname)
        weights_dir = _prepare(job, spec, tmp)
        plan: InferPlan | MergePlan
        if task == "merge":
            plan = MergePlan.model_validate(job["plan"])
        else:
            plan = InferPlan.model_validate(job["plan"])
        adapter_dir = str(tmp / "adapter")
        make_adapter(weights_dir, plan.rank, plan.targets, adapter_dir)
        if on_gpu:
            torch.cuda.init()
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        poller = NvmlPoller(period_s=0.002)  # this process's and the device's peaks
        baseline_device = poller.used()
        poller.start()
        trace_file = job.get("trace_file") if on_gpu else None
        if trace_file:  # the whole allocator trace, load included (matrix `snapshot` points)
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        phase = "load"
        try:
            if task == "merge":
                _run_merge(plan, weights_dir, adapter_dir, tmp, device, result)  # type: ignore[arg-type]
            else:
                assert isinstance(plan, InferPlan)
                model = load_with_adapter(
                    weights_dir, adapter_dir, quant=plan.quant, compute_dtype=plan.compute_dtype,
                    double_quant=plan.double_quant, device=device,
                    attn=attention_impl(spec, plan.attn),
                    adapter_dtype=plan.adapter_dtype)
                if plan.merged:
                    model = model.merge_and_unload()
                model.eval()
                if on_gpu:
                    torch.cuda.synchronize()
                    result["allocated_after_load"] = torch.cuda.memory_allocated()
                    result["reserved_after_load"] = torch.cuda.memory_reserved()
                phase = "generate"
                out = generate(model, spec, plan, device)
                if on_gpu:
                    torch.cuda.synchronize()
                result["cache_bytes"] = cache_tensor_bytes(out.past_key_values)
                result["cache_allocated_bytes"] = cache_tensor_bytes(out.past_key_values, 512)
                result["sequence_len"] = int(out.sequences.shape[1])
        except torch.cuda.OutOfMemoryError as err:
            result["oom"] = True
            result["oom_phase"] = phase
            result["oom_message"] = str(err).splitlines()[0][:300]
        finally:
            poller.stop()
        if trace_file:
            _write_trace(trace_file, result)
        if on_gpu:
            _cuda_stats(result)
            result["peak_allocated_bytes"] = result["torch_peak_allocated"]
            result["peak_reserved_bytes"] = result["torch_peak_reserved"]
            result["nvml_process_peak"] = poller.peak_process_used
            result["nvml_device_peak_minus_baseline"] = poller.peak_used - baseline_device
            result["peak_device_bytes"] = poller.peak_process_used
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    from vramcalc.calibrate.run import _version

    result["versions"] = {d: _version(d) for d in ("torch", "transformers", "peft",
                                                   "bitsandbytes")}
    return result


def _write_trace(trace_file: str, result: dict[str, Any]) -> None:
    """Stop recording and write the compact allocator trace (calibrate.trace.compact_trace);
    a trace must never cost the measurement."""
    import torch

    from vramcalc.calibrate.trace import compact_trace
    from vramcalc.corrections.factors import write_json_atomic

    try:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        write_json_atomic(Path(trace_file), compact_trace(snap))
        result["trace_file"] = Path(trace_file).name
    except Exception as err:
        result["trace_error"] = str(err).splitlines()[0][:300] if str(err) else repr(err)


def dir_tensor_bytes(path: Path) -> tuple[int, int]:
    """(total bytes of *.safetensors files, bytes of their headers: 8 + JSON length)."""
    total = header = 0
    for f in sorted(path.glob("*.safetensors")):
        total += f.stat().st_size
        with f.open("rb") as fh:
            header += 8 + int.from_bytes(fh.read(8), "little")
    return total, header


def _run_merge(plan: MergePlan, weights_dir: str, adapter_dir: str, tmp: Path, device: str,
               result: dict[str, Any]) -> None:
    import torch

    model = load_with_adapter(
        weights_dir, adapter_dir, quant=plan.base_quant, compute_dtype=plan.dtype,
        double_quant=plan.double_quant, device=device, adapter_dtype=plan.adapter_dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        result["allocated_after_attach"] = torch.cuda.memory_allocated()
    merged = model.merge_and_unload()
    if device == "cuda":
        torch.cuda.synchronize()
        result["allocated_after_merge"] = torch.cuda.memory_allocated()
    out = tmp / "merged"
    merged.save_pretrained(str(out))
    total, header = dir_tensor_bytes(out)
    result["disk_bytes"] = total
    result["disk_header_bytes"] = header
    if device == "cpu":
        import resource

        result["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m vramcalc.calibrate.infer_worker JOB_JSON\n")
        return 2
    from vramcalc.calibrate.worker import read_job

    job = read_job(argv[0])  # the JSON itself, or @FILE / a path as the matrix driver passes
    result = measure(job)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of CUDA state; the result is printed


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
