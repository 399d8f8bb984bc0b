#!/usr/bin/env bash
# CI: build the wheel from this checkout, install it (and only its light dependencies, no
# torch) into a fresh virtual environment, and run the commands a user runs first from a
# folder outside the source tree. Each must exit as expected and print no traceback.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/qlora_vramcalc-*.whl)
echo "CI: built $(basename "$wheel")"
"$work/venv/bin/python" -m pip install -q "$wheel"
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "CI: torch got installed with the wheel; the light install must not need it" >&2
    exit 1
fi

mkdir "$work/outside" && cd "$work/outside"
export PATH="$work/venv/bin:$PATH" VRAMCALC_DATA_DIR="$work/user-data"
unset VRAMCALC_CORRECTIONS PYTHONPATH
fail=0
smoke() {  # smoke "ALLOWED EXIT CODES" COMMAND...
    local allowed=$1; shift
    local rc=0
    "$@" >"$work/out" 2>"$work/err" || rc=$?
    if [[ " $allowed " != *" $rc "* ]] || grep -q "Traceback" "$work/out" "$work/err"; then
        echo "CI: FAILED (exit $rc, allowed $allowed): $*" >&2
        sed 's/^/    /' "$work/out" "$work/err" | tail -20 >&2
        fail=1
    else
        echo "CI: ok (exit $rc): $*"
    fi
}
smoke 0 vramcalc --version
smoke 0 vramcalc --help
smoke 0 vramcalc models
smoke 0 vramcalc plan --model llama-7b --rank 16 --batch 4
smoke 0 vramcalc plan -m llama-3.1-8b --json
smoke "0 3" vramcalc check --model llama-3.1-8b --gpu rtx-4090
smoke 0 vramcalc calibrate report
smoke 0 vramcalc gpus
smoke 0 vramcalc compare -m llama-3.1-8b
smoke 0 vramcalc fit --gpu rtx-4090
smoke "0 3" vramcalc sweep -m llama-3.1-8b --over seq-len=512:8192 --gpu rtx-4090
smoke "0 3" vramcalc plan -m llama-3.1-8b --task infer --batch 4 --prompt-len 1024 --new-tokens 256
smoke "0 3" vramcalc plan -m llama-2-70b --gpus 2 --strategy fsdp --gpu rtx-4090
smoke "0 3" vramcalc check --gpu h100 -m qwen2.5-7b --batch 8
smoke 0 python -c "from vramcalc import plan; print(plan('llama-3.1-8b', batch_size=2))"
smoke 0 python -m vramcalc --version
# the catalog comes from the build-time JSON index: a cold plan imports no PyYAML
smoke 0 python -c "
import sys
from vramcalc.models.spec import catalog, get_spec
get_spec('llama-7b'); catalog()
assert 'yaml' not in sys.modules, 'the wheel parsed YAML: model_specs/_catalog.json missing'
"
# the JSON is one object, and the installed package read its data from the wheel
smoke 0 python -c "
import json, subprocess, vramcalc
assert 'site-packages' in vramcalc.__file__, vramcalc.__file__
out = subprocess.run(['vramcalc', 'plan', '-m', 'llama-3.1-8b', '--json'], check=True,
                     capture_output=True, text=True).stdout
assert json.loads(out)['peak_device_bytes'] > 0
from vramcalc.corrections.factors import shipped_entries
assert shipped_entries(), 'shipped corrections missing from the wheel'
"
# the page of `vramcalc serve` ships in the wheel and is served from it
smoke 0 python -c "
import subprocess, sys, urllib.request, re
p = subprocess.Popen(['vramcalc', 'serve', '--port', '0', '--no-browser'],
                     stdout=subprocess.PIPE, text=True)
try:
    url = re.search(r'http://127\.0\.0\.1:\d+/', p.stdout.readline()).group(0)
    for path in ('', 'static/app.js', 'static/style.css', 'api/plan?model=llama-7b'):
        assert urllib.request.urlopen(url + path, timeout=60).status == 200, path
finally:
    p.terminate(); p.wait(timeout=30)
"
exit $fail
