#!/bin/bash
# Run 35, one device call (calibration/DEVICE.md): TRL's QLoRA preparation
# (h100-trlprep.json, 6 full-depth points, kbit_prep false + bf16 adapters and their
# kbit-prepared twins; predictions in h100-trlprep-predictions.json, committed before any
# run), 4 at a time. From the repo root with `carry: [".whl"]`, timeout 600.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/run35-gpu.txt
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trlprep.json --out $OUT/run35-trlprep.jsonl \
    --weights-cache /tmp/w35 --max-parallel 4 --gpu-budget-gib 70 --deadline-s 300 --point-timeout-s 200 \
    > $OUT/run35-trlprep.log 2>&1
rm -rf /tmp/w35
tail -10 $OUT/run35-trlprep.log
