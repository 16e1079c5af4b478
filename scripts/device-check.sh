#!/usr/bin/env bash
# Every CUDA check in one run, on a machine that has a GPU and PyTorch already installed (the
# system python3 and this source tree; nothing is installed). On the lent device machine:
# run `bash scripts/device-check.sh` from the repository root. Logs and JSON reports go to $OUT
# (or ./device-check). Exit status 0 only if every step passed.
set -uo pipefail
out=${OUT:-device-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RINGATTN_TIMEOUT=120
failed=()

step() {
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@" 2>&1 | tee "$out/$name.log"; then
        echo "=== $name passed in $((SECONDS - start)) s"
    else
        echo "=== $name FAILED after $((SECONDS - start)) s"
        failed+=("$name")
    fi
}

step environment "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name(), \
torch.cuda.get_device_capability(), 'GPUs', torch.cuda.device_count())"
step cuda-tests "$py" -m pytest -m cuda -q -p no:cacheprovider --maxfail=25 tests/test_cuda.py
step demo-1rank "$py" -m ringattn demo --device cuda --world-size 1 --seq-len 131072 \
    --heads 16 --kv-heads 4 --head-dim 128 --dtype bfloat16 --repeats 3 \
    --json "$out/demo-1rank.json"
step demo-4ranks "$py" -m ringattn demo --device cuda --world-size 4 --seq-len 65536 \
    --heads 16 --kv-heads 4 --head-dim 128 --dtype bfloat16 --json "$out/demo-4ranks.json"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all device checks passed"
