#!/bin/bash
# What run 31 left to measure (calibration/DEVICE.md "Run 31 and what still waits"), in one
# device call on one H100 or H200: run it from the repo root with `carry: [".whl"]`
# (bitsandbytes, peft, pydantic, liger-kernel and cut-cross-entropy wheels, DEVICE.md).
#   1. the three points the worker measured wrongly in run 31, after its fixes:
#      k-g-liger-gemma-2-2b (Liger under trainer-plain) and k010/k021 (offloaded
#      checkpoints that kept their GPU copies);
#   2. the seven pack points run 31 did not reach;
#   3. the il03 generate() trace.
# A call returns at most 8 files: everything goes into one tar under $OUT.
# DL (seconds, default 420) bounds the matrices; the caches are removed at the end.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
R=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then B=100; I=24; else B=52; I=16; fi
DL=${DL:-420}
mkdir -p $R/traces
python3 -m vramcalc.calibrate.matrix calibration/matrices/h200-pack1.json --only k010-qwen2.5-1.5b-ckoff,k021-gemma-2-2b-ckoff,k002-llama-3.2-1b-pf5000,k004-llama-3.2-1b-ckoff,k012-mistral-7b-base4,k013-mistral-7b-pf,k015-mistral-7b-ckoff,k017-mistral-7b-alloff-nogc,k023-gemma-2-2b-alloff-nogc --out $R/pack1.jsonl --weights-cache /tmp/wp --max-parallel 4 --gpu-budget-gib $B --deadline-s $DL --point-timeout-s 240 > $R/pack1.log 2>&1 &
( python3 -m vramcalc.calibrate.matrix calibration/matrices/h100-infer-trace31.json --out $R/infer-trace.jsonl --weights-cache /tmp/wi --max-parallel 1 --gpu-budget-gib $I --deadline-s 120 --point-timeout-s 110 --trace-dir $R/traces > $R/infer-trace.log 2>&1
  python3 -m vramcalc.calibrate.matrix calibration/matrices/h200-loss1.json --only k-g-liger-gemma-2-2b --out $R/loss1.jsonl --weights-cache /tmp/wi --max-parallel 1 --gpu-budget-gib $I --deadline-s $((DL-130)) --point-timeout-s 200 > $R/loss1.log 2>&1 ) &
wait
rm -rf /tmp/wp /tmp/wi
tar -C $R -czf $OUT/waiting.tar.gz .
tail -14 $R/pack1.log; tail -4 $R/loss1.log; tail -3 $R/infer-trace.log; ls -la $R/traces
