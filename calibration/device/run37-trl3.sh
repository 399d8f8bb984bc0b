#!/bin/bash
# Run 37, one device call (calibration/DEVICE.md): the pre-registered trl-chunked holdout
# h100-trl3.json (7 full-depth points, predictions in h100-trl3-predictions.json, committed
# before any run), TRL 1.4-1.14's chunked_nll as trl 1.14.0 patches it
# (calibrate/run.py apply_loss_kernel: trl.trainer.sft_trainer._patch_chunked_ce_lm_head,
# gone from trl 1.15). From the repo root with `carry: [".whl/trl14"]` (W=.whl/trl14, the
# default: .whl/trl with trl-1.14.0 in place of trl-1.16.0, about 12 MB; DEVICE.md has the
# recipe). Everything goes into one tar under $OUT; DL (seconds, default 300) bounds the
# matrix.
set -u
W=${W:-.whl/trl14}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
# the worker imports trl 1.14's patch: fail here, not in 7 workers
python3 -c "import torch, transformers, accelerate, trl, peft, bitsandbytes, triton, datasets
from trl.trainer.sft_trainer import _patch_chunked_ce_lm_head, _CHUNKED_LM_HEAD_CHUNK_SIZE
assert trl.__version__ == '1.14.0', trl.__version__
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate',
      accelerate.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes',
      bitsandbytes.__version__, 'triton', triton.__version__, 'datasets', datasets.__version__,
      'chunk', _CHUNKED_LM_HEAD_CHUNK_SIZE)" > $R/versions.txt 2>&1 \
    || { cat $R/gpu.txt $R/versions.txt; tar -C $R -czf $OUT/run37.tar.gz .; exit 1; }
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -lt 100000 ]; then B=38; else B=60; fi
DL=${DL:-300}
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trl3.json --out $R/run37-trl3.jsonl \
    --weights-cache /tmp/w37 --max-parallel 3 --gpu-budget-gib $B --deadline-s $DL --point-timeout-s 200 \
    > $R/run37-trl3.log 2>&1
rm -rf /tmp/w37
tar -C $R -czf $OUT/run37.tar.gz .
cat $R/gpu.txt $R/versions.txt; tail -12 $R/run37-trl3.log
