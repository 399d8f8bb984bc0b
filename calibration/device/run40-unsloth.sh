#!/bin/bash
# Run 40, one device call (calibration/DEVICE.md "Run 40"): the pre-registered h100-unsloth
# matrix (calibration/design_unsloth.py; predictions in h100-unsloth-predictions.json,
# committed before any run): Unsloth itself prepares each point (the worker's prep
# "unsloth", calibrate/unsloth_prep.py: FastLanguageModel.from_pretrained load_in_4bit,
# get_peft_model use_gradient_checkpointing="unsloth"), 5 full-depth points (llama-3.2-1b
# b4 / b8, qwen2.5-1.5b b4, gemma-2-2b b2, mistral-7b b4, x 2048; 23.6 GiB of bf16 weights
# in the cache), 3 at once.
# From the repo root with `carry: [".whl/unsloth"]` (unsloth 2026.10.9 and unsloth_zoo
# 2026.10.9 repacked without studio/ and unsloth_cli/ (calibration/device/strip_wheel.py),
# trl 1.15.0 (unsloth pins trl <= 1.15.0), peft 0.21.0, bitsandbytes 0.50.2 (cuda130/132),
# pydantic and parts, datasets 5.2.0, dill, multiprocess, pillow, requests, urllib3,
# certifi). No xformers (Unsloth falls back to torch SDPA), no torchvision / torchao.
# It stops within seconds, with one line, if unsloth cannot import here.
# TOTAL seconds (default 150) bound the matrix (from after the import check; the wheels and
# the check take ~30 s before it); everything goes into $OUT/run40.tar.gz.
set -u
TOTAL=${TOTAL:-150}
W=${W:-.whl/unsloth}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
# nothing may reach the network (calibrate/unsloth_prep.py OFFLINE_ENV sets them again)
# (each worker compiles into its own folder: calibrate/worker.py import_unsloth_first)
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
# fail here, in one line, not in 5 workers
UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache timeout 180 python3 -c "
import unsloth
from unsloth import FastLanguageModel
import torch, transformers, trl, peft, bitsandbytes, accelerate, triton
from importlib.metadata import version
print('unsloth', unsloth.__version__, 'unsloth_zoo', version('unsloth_zoo'), 'torch', torch.__version__,
      'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'accelerate', accelerate.__version__,
      'triton', triton.__version__)" > $R/versions.txt 2> $R/import.err
rc=$?
if [ $rc -ne 0 ]; then
    echo "Error: import unsloth failed on the device (exit $rc): $(grep -E '^[A-Za-z_.]*(Error|Exception)' $R/import.err | tail -1)"
    tail -25 $R/import.err; tar -C $R -czf $OUT/run40.tar.gz .; exit 1
fi
cat $R/versions.txt; grep -i "xformers\|sdpa\|warn" $R/import.err | head -5
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=110; else B=76; fi  # an H200 if one comes instead
DL=$TOTAL
echo "unsloth deadline $DL s"
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-unsloth.json --out $R/run40-unsloth.jsonl \
    --weights-cache /tmp/w40 --max-parallel 3 --build-parallel 4 --gpu-budget-gib $B --deadline-s $DL \
    --point-timeout-s 120 > $R/run40-unsloth.log 2>&1
rm -rf /tmp/w40 /tmp/unsloth_compiled_cache
tar -C $R -czf $OUT/run40.tar.gz .
cat $R/gpu.txt; tail -12 $R/run40-unsloth.log
