#!/usr/bin/env bash
# The GPU checks for a session with a device (one H200: about 6 minutes, the step timeouts sum to 340 s).
# Run from the repository root, with a device-tool timeout of about 420 s:
#   bash benchmarks/gpu_check.sh
# The device machine has torch, Triton, torchvision and no network: the project runs from the copied
# tree (PYTHONPATH=.), nothing is installed. Everything printed also goes to $OUT/gpu_check.log (the
# device tool brings $OUT back; the reply's output tail is only 12,000 characters), or to
# ./gpu_check.log without $OUT. Every step runs under a timeout; the script goes on after a failure and
# ends with one line per step: its exit code (124/137: timed out) and seconds.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1  # unbuffered: a step killed at its timeout keeps what it printed
declare -a SUMMARY

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo
    echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s) ==="
    timeout -k 10 "$limit" "$@"
    local rc=$?
    SUMMARY+=("$name: exit $rc, $((SECONDS - start)) s")
}

main() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'GPUs', torch.cuda.device_count())"

# The CUDA tests: AMP against float64, host reads / CUDA-graph capture / every float dtype of the default
# training step, no synchronization in a step of any option, and the compiled Triton path (cached
# launcher, graphs, strides, a second GPU if any).
# TRITON_INTERPRET=0: tests/conftest.py turns the interpreter on otherwise. The interpreter tests
# (tests/ops/test_triton_kernels.py) are CPU tests and do not run here: Triton 3.6's interpreter fails
# on them with NumPy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars").
step "pytest CUDA" 100 env TRITON_INTERPRET=0 python -m pytest -q -rs -p no:cacheprovider \
    tests/ops/test_triton_cuda.py tests/nn/test_host_reads.py tests/nn/test_cuda_syncs.py \
    tests/ecosystem/test_ecosystem_amp.py
# Correctness at full size, float64 reference, both layouts and dtypes (the channels_last fp32
# fused-ReLU backward was reported wrong at these sizes), the eval kernel, and a second call through
# the cached launcher bit for bit.
step "bench_kernels --check" 100 python benchmarks/bench_kernels.py --check \
    --shapes 256,64,56,56 256,256,56,56 64,64,112,112 8,256,7,7 --dtypes fp32 bf16 --layouts nchw nhwc
# Timing vs eager (no torch.compile column: each compilation costs ~40 s): the host cost of a small
# shape (8x256x7x7) and the table's large NCHW / NHWC rows.
step "bench_kernels timing" 80 python benchmarks/bench_kernels.py --no-compile \
    --shapes 8,256,7,7 32,64,56,56 256,64,112,112 256,256,56,56 --dtypes bf16 fp32 --layouts nchw nhwc
# Whole model: ResNet-50 b128 bf16 channels_last, torch.nn vs bnkit; syncs; CUDA-graph capture.
step "bench_model" 60 python benchmarks/bench_model.py --steps 10

echo
printf '%s\n' "${SUMMARY[@]}"
}

main 2>&1 | tee -a "${OUT:-.}/gpu_check.log"
