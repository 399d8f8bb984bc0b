#!/bin/bash
# Run 38, one device call (calibration/DEVICE.md): the pre-registered h100-kbit3 matrix
# (calibration/design_kbit3.py; predictions in h100-kbit3-predictions.json, committed before
# any run): QLoRA as axolotl and LLaMA-Factory prepare a 4/8-bit base (the worker's `prep`,
# calibrate/run.py _axolotl_prepare / _llama_factory_prepare), each with its kbit-prepared
# twin, 8 full-depth points (llama-3.1-8b nf4, mistral-7b nf4, qwen2.5-3b int8; 34.2 GiB of
# bf16 weights in the cache), at most 3 at once within --gpu-budget-gib 76 (110 on an H200).
# From the repo root with `carry: [".whl/trl"]` (peft 0.21.0, bitsandbytes 0.50.2 with its
# cuda130/132 libraries, pydantic and its parts; trl and datasets ride along unused).
# Phase 1, before it, alone on the GPU: the pre-registered time pairs h100-lorapair
# (calibration/design_time.py matrix_pairs; predictions in h100-lorapair-predictions.json,
# committed before any run; docs/time-model.md "LoRA vs full fine-tuning on a small
# model"), serial, within LP seconds (default 150).
# TOTAL seconds (default 300, phase 1 not counted) bound the kbit3 phase; everything goes
# into $OUT/run38.tar.gz.
set -u
S=$(date +%s)
TOTAL=${TOTAL:-300}
W=${W:-.whl/trl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
# the worker's preparation imports these: fail here, not in 8 workers
python3 -c "import torch, transformers, accelerate, peft, bitsandbytes, pydantic
from peft import prepare_model_for_kbit_training, get_peft_model
from vramcalc.calibrate.run import TRAINER_PREPS
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate',
      accelerate.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'pydantic', pydantic.__version__, 'preps', TRAINER_PREPS)" > $R/versions.txt 2>&1 \
    || { cat $R/versions.txt; exit 1; }
LP=${LP:-150}
echo "lorapair deadline $LP s"
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-lorapair.json --out $R/run38-lorapair.jsonl \
    --weights-cache /tmp/wl --max-parallel 1 --build-parallel 4 --gpu-budget-gib 75 --deadline-s $LP \
    --point-timeout-s 120 > $R/run38-lorapair.log 2>&1
rm -rf /tmp/wl
tail -6 $R/run38-lorapair.log
S=$(date +%s)
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=110; else B=76; fi  # an H200 if one comes instead
DL=$((TOTAL - $(date +%s) + S - 20))
echo "kbit3 deadline $DL s"
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-kbit3.json --out $R/run38-kbit3.jsonl \
    --weights-cache /tmp/w38 --max-parallel 3 --gpu-budget-gib $B --deadline-s $DL --point-timeout-s 200 \
    > $R/run38-kbit3.log 2>&1
rm -rf /tmp/w38
tar -C $R -czf $OUT/run38.tar.gz .
cat $R/gpu.txt $R/versions.txt; tail -12 $R/run38-kbit3.log
