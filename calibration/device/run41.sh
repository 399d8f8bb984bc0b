#!/bin/bash
# Runs 39, 41 and 40 in one device call (calibration/DEVICE.md "Session of 2026-12-08"):
#   1. run 39, the pre-registered inference holdout 8 (h100-infer-holdout8.json, 8 generate()
#      points, 4 at a time), alone on the GPU within DL1 seconds (a process beside it that
#      fills the GPU makes the allocator free its cache and retry, and reserved is then no
#      reading: DEVICE.md, run 39); then run 41, the allocator traces of m031, a007 and ip06
#      (h100-trace41.json, serial, --trace-dir; not a holdout), within DL2 seconds;
#   2. run 40, the pre-registered Unsloth matrix (run40-unsloth.sh, TOTAL seconds; RUN40=0 skips it).
# From the repo root with `carry: [".whl/unsloth"]` (bitsandbytes 0.50.2, peft 0.21.0 and
# pydantic serve phase 1 too). Output: $OUT/run39.tar.gz (unpack into calibration/h100/run39/),
# $OUT/run41.tar.gz (calibration/h100/run41/), $OUT/run40.tar.gz (calibration/h100/run40/).
set -u
W=${W:-.whl/unsloth}
DL1=${DL1:-130}
DL2=${DL2:-110}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d); T=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
cp $R/gpu.txt $T/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=90; else B=60; fi
python3 -c "import torch, transformers, peft, bitsandbytes
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" > $R/versions.txt 2>&1 || { cat $R/versions.txt; exit 1; }
cp $R/versions.txt $T/versions.txt
mkdir -p $T/traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-infer-holdout8.json --out $R/run39-infer8.jsonl \
    --weights-cache /tmp/wi --max-parallel 4 --gpu-budget-gib $B --deadline-s $DL1 --point-timeout-s 150 \
    > $R/run39-infer8.log 2>&1
rm -rf /tmp/wi
tar -C $R -czf $OUT/run39.tar.gz .  # kept if the call is cut in the traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trace41.json --out $T/run41-trace.jsonl \
    --weights-cache /tmp/wt --max-parallel 1 --gpu-budget-gib 70 --deadline-s $DL2 --point-timeout-s 100 \
    --trace-dir $T/traces > $T/run41-trace.log 2>&1
rm -rf /tmp/wt
tar -C $T -czf $OUT/run41.tar.gz .
cat $R/gpu.txt $R/versions.txt; tail -12 $R/run39-infer8.log; tail -5 $T/run41-trace.log; ls -la $T/traces
# RUN40=0: phase 1 only (run 40 in a later call: TOTAL=100 bash calibration/device/run40-unsloth.sh)
[ "${RUN40:-1}" = 1 ] && TOTAL=${TOTAL:-100} bash calibration/device/run40-unsloth.sh
