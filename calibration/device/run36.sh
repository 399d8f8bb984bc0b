#!/bin/bash
# Run 36, one device call (calibration/DEVICE.md), in two phases so that the weights caches
# stay under the disk (infer7 ~23 GiB + traces ~6 GiB, then trl3 ~45 GiB):
#   1. inference holdout 7 (h100-infer-holdout7.json, 12 generate() points, 4 at a time,
#      predictions committed at 9aac1c5) beside the traces of p009 and ik09
#      (h100-trace36.json, serial, --trace-dir), both within DL1 seconds (default 250);
#   2. the trl-chunked holdout (h100-trl3.json, 7 full-depth points, 3 at a time,
#      predictions committed at f92dd2b) in what is left of TOTAL (default 560).
# From the repo root with `carry: [".whl/trl14"]` (W, default .whl/trl14: .whl/trl with
# trl 1.14.0, whose _patch_chunked_ce_lm_head trl-chunked needs; bitsandbytes, peft and
# pydantic serve phase 1 too). Everything goes into one tar under $OUT.
set -u
S=$(date +%s)
TOTAL=${TOTAL:-560}
W=${W:-.whl/trl14}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=90; B3=60; else B=40; B3=38; fi
DL1=${DL1:-250}
mkdir -p $R/traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-infer-holdout7.json --out $R/run36-infer7.jsonl \
    --weights-cache /tmp/wi --max-parallel 4 --gpu-budget-gib $B --deadline-s $DL1 --point-timeout-s 200 \
    > $R/run36-infer7.log 2>&1 &
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trace36.json --out $R/run36-trace.jsonl \
    --weights-cache /tmp/wt --max-parallel 1 --gpu-budget-gib 37 --deadline-s $((DL1-30)) --point-timeout-s 200 \
    --trace-dir $R/traces > $R/run36-trace.log 2>&1 &
wait
rm -rf /tmp/wi /tmp/wt
tar -C $R -czf $OUT/run36.tar.gz .
tail -16 $R/run36-infer7.log; tail -4 $R/run36-trace.log
# 2. trl 1.14's patch imports here, or phase 2 is skipped
python3 -c "import torch, transformers, accelerate, trl, peft, bitsandbytes, triton, datasets
from trl.trainer.sft_trainer import _patch_chunked_ce_lm_head, _CHUNKED_LM_HEAD_CHUNK_SIZE
assert trl.__version__ == '1.14.0', trl.__version__
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate',
      accelerate.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes',
      bitsandbytes.__version__, 'triton', triton.__version__, 'datasets', datasets.__version__,
      'chunk', _CHUNKED_LM_HEAD_CHUNK_SIZE)" > $R/versions.txt 2>&1 || { cat $R/versions.txt; exit 1; }
DL=$((TOTAL - $(date +%s) + S - 25))
echo "trl3 deadline $DL s"
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trl3.json --out $R/run36-trl3.jsonl \
    --weights-cache /tmp/w3 --max-parallel 3 --gpu-budget-gib $B3 --deadline-s $DL --point-timeout-s 200 \
    > $R/run36-trl3.log 2>&1
rm -rf /tmp/w3
tar -C $R -czf $OUT/run36.tar.gz .
cat $R/gpu.txt $R/versions.txt; tail -10 $R/run36-trl3.log; ls -la $R/traces
