#!/bin/bash
# Run 35, one device call (calibration/DEVICE.md): TRL >= 1.15's fused LM head against
# the torch loss (h100-trl2.json, 10 full-depth points, 4 at a time, predictions in
# h100-trl2-predictions.json committed before any run). From the repo root with
# `carry: [".whl/trl"]` (trl 1.16.0 and what trl.trainer.utils imports that the image lacks:
# datasets, dill, multiprocess; peft and bitsandbytes for the QLoRA points; pydantic). The
# image's pandas and pyarrow serve: with their wheels .whl/trl is over a call's 64 MiB.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/trl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
# the worker imports trl.trainer.utils (add_fused_lm_head): fail here, not in 10 workers
python3 -c "import torch, transformers, trl, peft, bitsandbytes, triton, pandas, pyarrow
from trl.trainer.utils import add_fused_lm_head
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__,
      'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'triton', triton.__version__,
      'pandas', pandas.__version__, 'pyarrow', pyarrow.__version__)" \
    > $OUT/versions.txt 2>&1 || { cat $OUT/versions.txt; exit 1; }
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trl2.json --out $OUT/run35-trl2.jsonl \
    --weights-cache /tmp/w35 --max-parallel 4 --gpu-budget-gib 75 --deadline-s 300 --point-timeout-s 200 \
    > $OUT/run35-trl2.log 2>&1
rm -rf /tmp/w35
cat $OUT/versions.txt; tail -14 $OUT/run35-trl2.log
