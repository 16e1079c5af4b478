#!/usr/bin/env bash
# Every CUDA check in one run, on a machine that has a GPU and PyTorch already installed (the
# system python3 and this source tree; nothing is installed). On the lent device machine:
# run `bash scripts/device-check.sh` from the repository root (expected: a few minutes; give the
# command a 540 s limit). Results go to $OUT (or
# ./device-check): device-check.log, demo-1rank.json, demo-4ranks.json, bench.json, bench.md.
# Exit status 0 only if every step passed.
set -uo pipefail
out=${OUT:-device-check}
mkdir -p "$out"
log="$out/device-check.log"
: >"$log"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RINGATTN_TIMEOUT=120
failed=()

step() {
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "$log"; then
        echo "=== $name passed in $((SECONDS - start)) s" | tee -a "$log"
    else
        echo "=== $name FAILED after $((SECONDS - start)) s" | tee -a "$log"
        failed+=("$name")
    fi
}

step environment "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name(), \
torch.cuda.get_device_capability(), 'GPUs', torch.cuda.device_count())"
# kernels against fp64, then the CPU suite's exactness jobs on CUDA tensors (1-3 ranks)
cuda_tests() {  # fails rather than skipping everything when torch sees no GPU
    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU')" &&
        "$py" -m pytest -m cuda -q -rs -p no:cacheprovider --maxfail=25 tests/test_cuda.py
}
step cuda-tests cuda_tests
# the main job on one GPU, and 4 ranks sharing it over gloo (exactness, not speed)
step demo-1rank "$py" -m ringattn demo --device cuda --world-size 1 --seq-len 65536 \
    --heads 16 --kv-heads 4 --head-dim 128 --dtype bfloat16 --repeats 3 \
    --json "$out/demo-1rank.json"
step demo-4ranks "$py" -m ringattn demo --device cuda --world-size 4 --seq-len 65536 \
    --heads 16 --kv-heads 4 --head-dim 128 --dtype bfloat16 --json "$out/demo-4ranks.json"
# the engine's overhead on one GPU: ring at p=1 against one kernel call (efficiency ~1.0)
bench_dir=$(mktemp -d)
step bench "$py" -m ringattn bench --device cuda --world-sizes 1 --seq-lens 16K,64K \
    --layouts zigzag --mask both --heads 16:4 --head-dim 128 --dtypes bfloat16 \
    --repeats 3 --out "$bench_dir"
cp "$bench_dir"/bench.json "$bench_dir"/bench.md "$out"/ 2>/dev/null

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" | tee -a "$log"
    exit 1
fi
echo "all device checks passed" | tee -a "$log"
