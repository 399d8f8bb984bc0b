#!/bin/bash
# Run 35, one device call (calibration/DEVICE.md), two pre-registered matrices side by side
# (each within half the GPU), predictions committed before any run:
# - h100-trl2.json: TRL >= 1.15's fused LM head against the torch loss (10 full-depth points,
#   h100-trl2-predictions.json);
# - h100-trlprep.json: TRL's QLoRA preparation, kbit_prep false + bf16 adapters, and their
#   kbit-prepared twins (6 full-depth points, h100-trlprep-predictions.json).
# From the repo root with `carry: [".whl/trl"]` (trl 1.16.0 and what trl.trainer.utils imports
# that the image lacks: datasets, dill, multiprocess; peft, bitsandbytes (the cuda130/132
# libraries only) and pydantic). The image's pandas and pyarrow serve: with their wheels the
# call is over its 64 MiB. TOTAL seconds (default 380) bound both matrices.
S=$(date +%s)
TOTAL=${TOTAL:-380}
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
DL=$((TOTAL - $(date +%s) + S - 20))
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trl2.json --out $OUT/run35-trl2.jsonl \
    --weights-cache /tmp/w35a --max-parallel 3 --gpu-budget-gib 38 --deadline-s $DL --point-timeout-s 200 \
    > $OUT/run35-trl2.log 2>&1 &
python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-trlprep.json --out $OUT/run35-trlprep.jsonl \
    --weights-cache /tmp/w35b --max-parallel 3 --gpu-budget-gib 37 --deadline-s $DL --point-timeout-s 200 \
    > $OUT/run35-trlprep.log 2>&1 &
wait
rm -rf /tmp/w35a /tmp/w35b
cat $OUT/versions.txt; tail -14 $OUT/run35-trl2.log; tail -9 $OUT/run35-trlprep.log
