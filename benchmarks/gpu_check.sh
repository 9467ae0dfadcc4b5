#!/usr/bin/env bash
# The checks of momoe's CUDA kernels that need a GPU (issue 4), for a machine with torch + CUDA, nvcc and
# no network: build the extension with its CUDA kernels, run the op tests on the GPU, run them again under
# compute-sanitizer memcheck, and run the CUDA benchmarks. Logs and tables go to $RESULTS_DIR (default
# benchmarks/results), each headed by the device, the date and the command.
#
#   benchmarks/gpu_check.sh [all|build|test|sanitize|bench]...    (default: all, in that order)
#
# The CUTLASS headers come from the nvidia-cutlass wheel: installed from $WHEELHOUSE (default wheelhouse/,
# e.g. carried next to the source tree) when python3 does not have it yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$RESULTS_DIR"

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '-').lower())")
header() {  # what a results file was measured on
  echo "# device: $("$PY" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)")"
  echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "# command: $*"
}

# Runs "$@", its output teed to $RESULTS_DIR/$name.txt under a header; returns the command's status.
record() {
  local name=$1
  shift
  local file="$RESULTS_DIR/$name.txt"
  { header "$@"; echo; } > "$file"
  set +e
  "$@" 2>&1 | tee -a "$file"
  local status=${PIPESTATUS[0]}
  set -e
  echo "(exit status $status)" >> "$file"
  return "$status"
}

build() {
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
    "$PY" -m pip install --no-index --no-deps --find-links "$WHEELHOUSE" nvidia-cutlass
  fi
  local start=$SECONDS
  record "build_cuda_$gpu" "$PY" -m pip install --no-index --no-deps --no-build-isolation -v -e .
  echo "build took $((SECONDS - start)) s"
  "$PY" -c "import torch, momoe.ops
assert torch._C._dispatch_has_kernel_for_dispatch_key('momoe::grouped_gemm', 'CUDA'), 'momoe._C has no CUDA kernels'"
}

run_tests() {
  echo "== op tests on the GPU"
  record "test_ops_cuda_$gpu" "$PY" -m pytest tests/ops -q -rs
}

# memcheck of every CUDA test case, except those that fail device-side assertions on purpose (in child
# processes) and the torch.compile ones (Triton compiles its own kernels; far too slow under the tool).
sanitize() {
  echo "== compute-sanitizer memcheck"
  record "memcheck_ops_cuda_$gpu" compute-sanitizer --tool memcheck --error-exitcode 1 \
    --target-processes application-only "$PY" -m pytest tests/ops -q -x \
    -k "cuda and not checked_on_the_device and not compile"
}

bench() {
  echo "== benchmarks"
  record "bench_ops_cuda_$gpu" "$PY" -m benchmarks.bench_ops_cuda --json "$RESULTS_DIR/bench_ops_cuda_$gpu.json"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
status=0
for step in "${steps[@]}"; do
  case $step in
    all) build && { run_tests || status=1; sanitize || status=1; bench || status=1; } || status=1 ;;
    build) build || status=1 ;;
    test) run_tests || status=1 ;;
    sanitize) sanitize || status=1 ;;
    bench) bench || status=1 ;;
    *) echo "unknown step: $step (all, build, test, sanitize, bench)"; exit 2 ;;
  esac
done
exit $status
