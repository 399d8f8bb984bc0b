#!/bin/bash
# Runs 39, 41 and 40 in one device call (calibration/DEVICE.md "Session of 2026-12-08"):
#   1. run 39, the pre-registered inference holdout 8 (run39.sh, with W and DL=DL1), alone on
#      the GPU (a process beside it that fills the GPU makes the allocator free its cache and
#      retry, and reserved is then no reading: DEVICE.md, run 39); run39.sh writes its tar
#      before anything else starts;
#   2. run 41, the allocator traces of m031, a007 and ip06 (h100-trace41.json, serial,
#      --trace-dir; not a holdout), within DL2 seconds, on the packages run39.sh installed
#      (their versions are in run 39's versions.txt);
#   3. run 40, the pre-registered Unsloth matrix (run40-unsloth.sh, TOTAL seconds; RUN40=0
#      skips it).
# From the repo root with `carry: [".whl/unsloth"]` (bitsandbytes 0.50.2, peft 0.21.0 and
# pydantic serve runs 39 and 41 too). Output: $OUT/run39.tar.gz (unpack into
# calibration/h100/run39/), $OUT/run41.tar.gz (calibration/h100/run41/), $OUT/run40.tar.gz
# (calibration/h100/run40/).
set -u
W=${W:-.whl/unsloth}
DL1=${DL1:-130}
DL2=${DL2:-110}
W=$W DL=$DL1 bash calibration/device/run39.sh || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
T=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $T/gpu.txt
mkdir -p $T/traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trace41.json --out $T/run41-trace.jsonl \
    --weights-cache /tmp/wt --max-parallel 1 --gpu-budget-gib 70 --deadline-s $DL2 --point-timeout-s 100 \
    --trace-dir $T/traces > $T/run41-trace.log 2>&1
rm -rf /tmp/wt
tar -C $T -czf $OUT/run41.tar.gz .
tail -5 $T/run41-trace.log; ls -la $T/traces
# RUN40=0: runs 39 and 41 only (run 40 in a later call: TOTAL=100 bash calibration/device/run40-unsloth.sh)
[ "${RUN40:-1}" = 1 ] && TOTAL=${TOTAL:-100} bash calibration/device/run40-unsloth.sh
