#!/bin/bash
# Run 42, one device call (calibration/DEVICE.md): time holdout 6 in run 37's end-to-end
# protocol (docs/time-model.md "Time holdout 6 (run 42)"; calibration/design_hostcal.py
# RUN42). From the repo root with `carry: [".whl/trl", ".whl/cli"]`, W=.whl/trl (the
# default; .whl/cli: typer, rich and what they import, for the CLI, if the image lacks them):
#   a. `vramcalc calibrate run` as a user runs it (VRAMCALC_DATA_DIR=DATA, the folder
#      `plan` reads too) on qwen2.5-0.5b, two plans (calibration/matrices/
#      time6-cal-qwen2.5-0.5b.json, run 37's first two), at most CAL seconds (default 65;
#      SIGINT at the limit: calibrate keeps the points it saved);
#   b. before any test point is measured: `vramcalc plan --json` for the 32 test points
#      (calibration/matrices/h100-time6.json) on the detected card, with DATA's
#      calibration (pred-cal.json) and --no-calibration (pred-nocal.json); their sha256
#      and the times go to prereg.txt and stdout;
#   c. the test matrix by the time worker, serially, in what is left of TOTAL (default
#      400) seconds, at most 300 (`design_hostcal.py budget` says 241 s for it, 324 s for
#      the whole call, at host factor 1 on an H100).
# Everything into $OUT/run42.tar.gz (weights caches removed); then the scoring
# (bench/host_calibration_e2e.py). A failed step is one `Error:` line and exit 1, with
# what was made so far still in the tar.
# DRY=1 (no GPU, tests): no install, no calibrate, no matrix: DATA and the measured jsonl
# come from `design_hostcal.py fake` at host factor DRY_H (default 1.5) on GPU (default
# h100-sxm).
set -u
S=$(date +%s)
TOTAL=${TOTAL:-400}
CAL=${CAL:-65}
PY=${PY:-python3}
R=$(mktemp -d)
DATA=$R/data
M=calibration/matrices/h100-time6.json
SPECS=calibration/matrices/time6-specs
J=time6.jsonl
WC=/tmp/w42
pack() { rm -rf "$WC"; tar -C "$R" -czf "$OUT/run42.tar.gz" . ; }
fail() { echo "Error: $*" >&2; pack; rm -rf "$R"; exit 1; }
stamp() { echo "$1 $(date -u +%Y-%m-%dT%H:%M:%SZ) t+$(( $(date +%s) - S ))s" | tee -a "$R/prereg.txt"; }

if [ "${DRY:-0}" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site ${W:-.whl/trl}/*.whl $(ls .whl/cli/*.whl 2> /dev/null) > "$R/pip.log" 2>&1 || fail "pip install failed ($(tail -1 "$R/pip.log"))"
    export PYTHONPATH=/tmp/site:$PWD/src
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt"
    GPU=$($PY -c "from vramcalc.hardware.devices import query_devices as q
from vramcalc.hardware.catalog import match_detected as m
d = q()[0]; g = m(d.name, d.total_bytes); print(g.name if g else '')" 2>> "$R/gpu.txt")
else
    export PYTHONPATH=$PWD/src
    GPU=${GPU:-h100-sxm}
    echo "dry run on $GPU" > "$R/gpu.txt"
fi
export PYTHONUNBUFFERED=1 VRAMCALC_DATA_DIR=$DATA
[ -n "$GPU" ] || fail "the card is not in the catalog: $(head -2 "$R/gpu.txt" | tail -1)"
echo "catalog gpu: $GPU" | tee -a "$R/gpu.txt"
# the CLI itself (typer, rich) before anything is spent on it
$PY -m vramcalc plan -m qwen2.5-0.5b --gpu "$GPU" --json --no-calibration > /dev/null 2> "$R/preflight.err" \
    || fail "vramcalc plan does not run here: $(tail -1 "$R/preflight.err")"

# a. the user's calibration
stamp "calibrate-start"
if [ "${DRY:-0}" != 1 ]; then
    END=$(( $(date +%s) + CAL ))
    for MODEL in qwen2.5-0.5b; do
        LEFT=$((END - $(date +%s)))
        if [ "$LEFT" -lt 20 ]; then echo "no time left to calibrate $MODEL" | tee -a "$R/cal.log"; continue; fi
        echo "== $MODEL ($LEFT s left)" >> "$R/cal.log"
        timeout -s INT -k 15 "$LEFT" $PY -m vramcalc calibrate run -m "$MODEL" \
            --matrix "calibration/matrices/time6-cal-$MODEL.json" >> "$R/cal.log" 2>&1
        echo "exit $?" >> "$R/cal.log"
    done
else
    $PY calibration/design_hostcal.py fake "$DATA" "$R/$J" "$GPU" "${DRY_H:-1.5}" $M \
        > "$R/cal.log" 2>&1 || fail "fake data: $(tail -1 "$R/cal.log")"
fi
stamp "calibrate-end"
grep -v '^\s*$' "$R/cal.log" | grep -iv "━" | tail -12
ls "$DATA"/runs/*.json > /dev/null 2>&1 || fail "calibrate run saved no run file ($(tail -1 "$R/cal.log"))"

# b. the pre-registration: both predictions before any test point runs
$PY calibration/design_hostcal.py predict $M $SPECS "$GPU" "$R/pred-cal.json" \
    2> "$R/pred.err" || fail "calibrated plan: $(tail -1 "$R/pred.err")"
$PY calibration/design_hostcal.py predict $M $SPECS "$GPU" "$R/pred-nocal.json" --no-calibration \
    2>> "$R/pred.err" || fail "uncalibrated plan: $(tail -1 "$R/pred.err")"
stamp "predictions-written"
(cd "$R" && sha256sum pred-cal.json pred-nocal.json data/runs/*.json) | tee -a "$R/prereg.txt"

# c. the test points
if [ "${DRY:-0}" != 1 ]; then
    DL=$((TOTAL - 15 - $(date +%s) + S))
    [ "$DL" -gt 300 ] && DL=300
    [ "$DL" -gt 60 ] || fail "only $DL s left for the test matrix"
    stamp "matrix-start (deadline $DL s)"
    $PY -m vramcalc.calibrate.matrix $M --out "$R/$J" --weights-cache "$WC" \
        --max-parallel 1 --build-parallel 4 --gpu-budget-gib 75 --deadline-s "$DL" \
        --point-timeout-s 240 > "$R/time6.log" 2>&1
    echo "matrix exit $?" >> "$R/time6.log"
    stamp "matrix-end"
    tail -6 "$R/time6.log"
fi
pack
$PY bench/host_calibration_e2e.py "$R" --points || fail "scoring failed"
rm -rf "$R"
echo "total $(( $(date +%s) - S )) s; $OUT/run42.tar.gz"
