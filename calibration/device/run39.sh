#!/bin/bash
# Run 39, one device call (calibration/DEVICE.md): pre-registered inference holdout 8
# (h100-infer-holdout8.json, 8 generate() points, 6 of them int8, predictions committed with
# the matrix after run 36's int8 trace; calibration/design_infer.py holdout8), 4 at a time,
# within DL seconds (default 170; the call's limit ~200 s). Weights caches: 28.2 GiB of bf16
# checkpoints (7 model / depth pairs), removed at the end.
# From the repo root with `carry: [".whl/trl14"]` or `[".whl/trl"]` (W, default .whl/trl14:
# bitsandbytes 0.50.2, peft 0.21.0 and pydantic for the infer worker). Output: one tar
# under $OUT, to unpack into calibration/h100/run39/ (copy run39-infer8.jsonl to
# calibration/h100/).
set -u
W=${W:-.whl/trl14}
DL=${DL:-170}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=90; else B=60; fi
python3 -c "import torch, transformers, peft, bitsandbytes
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" > $R/versions.txt 2>&1 || { cat $R/versions.txt; exit 1; }
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-infer-holdout8.json --out $R/run39-infer8.jsonl \
    --weights-cache /tmp/wi --max-parallel 4 --gpu-budget-gib $B --deadline-s $DL --point-timeout-s 150 \
    > $R/run39-infer8.log 2>&1
rm -rf /tmp/wi
tar -C $R -czf $OUT/run39.tar.gz .
cat $R/gpu.txt $R/versions.txt; tail -12 $R/run39-infer8.log
