#!/bin/bash
# Run 36, one device call (calibration/DEVICE.md): inference holdout 7
# (h100-infer-holdout7.json, 12 generate() points, 4 at a time) beside the traces of p009 and
# ik09 (h100-trace36.json, serial, --trace-dir). From the repo root with `carry: [".whl/trl"]` and W=.whl/trl (its bitsandbytes keeps only the cuda130/132 libraries, so the call stays under 64 MiB).
# Everything goes into one tar under $OUT; DL (seconds, default 420) bounds the holdout.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${W:-.whl}/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=90; else B=40; fi
DL=${DL:-420}
mkdir -p $R/traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-infer-holdout7.json --out $R/infer7.jsonl \
    --weights-cache /tmp/wi --max-parallel 4 --gpu-budget-gib $B --deadline-s $DL --point-timeout-s 200 \
    > $R/infer7.log 2>&1 &
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trace36.json --out $R/trace36.jsonl \
    --weights-cache /tmp/wt --max-parallel 1 --gpu-budget-gib 37 --deadline-s $((DL-60)) --point-timeout-s 200 \
    --trace-dir $R/traces > $R/trace36.log 2>&1 &
wait
rm -rf /tmp/wi /tmp/wt
tar -C $R -czf $OUT/run36.tar.gz .
cat $R/gpu.txt; tail -16 $R/infer7.log; tail -5 $R/trace36.log; ls -la $R/traces
