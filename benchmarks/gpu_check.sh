#!/usr/bin/env bash
# The GPU checks for a session with a device (one H200: under 6 minutes, the timeouts sum to 330 s). Run from the repository root:
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# The device machine has torch, Triton, torchvision and no network: the project runs from the copied
# tree (PYTHONPATH=.), nothing is installed. Every step runs under a timeout; the script goes on after a
# failure and ends with one line per step and its exit code.
set -u
export PYTHONPATH=.
declare -a SUMMARY

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($(date -u +%H:%M:%S) UTC) ==="
    timeout "$limit" "$@"
    local rc=$?
    SUMMARY+=("$name: exit $rc")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Correctness at full size, float64 reference, both layouts and dtypes (the channels_last fp32
# fused-ReLU backward was reported wrong at these sizes).
step "bench_kernels --check" 90 python benchmarks/bench_kernels.py --check \
    --shapes 256,64,56,56 256,256,56,56 64,64,112,112 8,256,7,7 --dtypes fp32 bf16 --layouts nchw nhwc
# Timing vs eager (no torch.compile column: each compilation costs ~40 s): the host cost of a small
# shape (8x256x7x7) and the table's large NCHW / NHWC rows.
step "bench_kernels timing" 70 python benchmarks/bench_kernels.py --no-compile \
    --shapes 8,256,7,7 32,64,56,56 256,64,112,112 256,256,56,56 --dtypes bf16 fp32 --layouts nchw nhwc
# Whole model: ResNet-50 b128 bf16 channels_last, torch.nn vs bnkit; syncs; CUDA-graph capture.
step "bench_model" 70 python benchmarks/bench_model.py --steps 10
# The CUDA tests (AMP against float64) and the kernels' interpreter tests.
step "pytest" 100 python -m pytest tests/ecosystem/test_ecosystem_amp.py tests/ops/test_triton_kernels.py -q -x

echo
printf '%s\n' "${SUMMARY[@]}"
