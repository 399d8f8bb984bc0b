#!/bin/bash
# Run 33, one device call (calibration/DEVICE.md): switch holdout 2 (h100-switch2.json,
# 9 full-depth points, 4 at a time), then time holdout 5 (h200-time5.json, serial) in what
# is left of TOTAL seconds (default 500). From the repo root with `carry: [".whl"]`.
S=$(date +%s)
TOTAL=${TOTAL:-500}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-switch2.json --out $OUT/h100-switch2.jsonl \
    --weights-cache /tmp/w2 --max-parallel 4 --gpu-budget-gib 75 --deadline-s 190 --point-timeout-s 170 \
    > $OUT/h100-switch2.log 2>&1
rm -rf /tmp/w2
DL=$((TOTAL - $(date +%s) + S))
echo "time5 deadline $DL s"
python3 -m vramcalc.calibrate.matrix calibration/matrices/h200-time5.json --out $OUT/h100-time5.jsonl \
    --weights-cache /tmp/w --max-parallel 1 --build-parallel 4 --gpu-budget-gib 75 --deadline-s $DL \
    --point-timeout-s 240 > $OUT/h100-time5.log 2>&1
rm -rf /tmp/w
tail -14 $OUT/h100-switch2.log; tail -9 $OUT/h100-time5.log
