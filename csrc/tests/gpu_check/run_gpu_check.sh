#!/usr/bin/env bash
# `make gpu-check` (README, "First run on a GPU"): builds the harness with nvcc for sm_90 and runs its
# one-process checks (R fake ranks on one GPU, tests/gpu_check/); with two GPUs or more it then runs the
# multi-process Python suite on backend="cuda" (EPCOMM_TEST_BACKENDS=cuda, one GPU per rank).
#
#   run_gpu_check.sh [--one-process]    --one-process: stop after the harness (make -C csrc gpu-check)
#
# Exit status: 0 every check passed, 1 a check failed, 2 the harness or the suite could not be built or
# run, 3 no GPU or no nvcc on this machine (one line says which; nothing was checked).
set -u
here=$(cd "$(dirname "$0")" && pwd)
csrc=$(cd "$here/../.." && pwd)
repo=$(cd "$csrc/.." && pwd)
one_process=0
[[ "${1:-}" == "--one-process" ]] && one_process=1

binary="$csrc/tests/build/gpu_check_cuda/gpu_check"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
  # Built quietly: a machine without a GPU should see one line, not a compiler log
  if ! make -s -C "$csrc" -j"$(nproc)" gpu-check-build >"$log" 2>&1; then
    echo "gpu-check: the harness did not build (nvcc, sm_90); the last lines of the build:"
    tail -n 40 "$log"
    exit 2
  fi
elif [[ -x "$binary" ]]; then
  # A GPU machine without the toolkit: the binary needs only the driver (cudart is linked statically)
  echo "gpu-check: nvcc is not on PATH: running the harness built earlier ($(date -r "$binary" '+%F %T'))"
else
  echo "gpu-check: no CUDA toolkit on this machine (nvcc is not on PATH) and no harness built earlier: nothing was checked"
  exit 3
fi

"$binary"
status=$?
# 3: no GPU (the harness said why in one line); 1 or 2: a check failed or the harness could not run
if [[ $status -ne 0 || $one_process -eq 1 ]]; then exit $status; fi

gpus=$("$binary" --count-gpus)
if (( gpus < 2 )); then
  echo "[SKIP] python_suite_on_cuda: $gpus GPU: the multi-process suite needs one GPU per rank (2 or more)"
  exit 0
fi
echo "gpu-check: $gpus GPUs: the multi-process Python suite on backend='cuda' (EPCOMM_TEST_BACKENDS=cuda)"
if ! make -s -C "$repo" venv >"$log" 2>&1; then
  echo "gpu-check: could not set up .venv for the Python suite (make venv); the last lines:"
  tail -n 40 "$log"
  exit 2
fi
start=$(date +%s)
EPCOMM_TEST_BACKENDS=cuda "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$repo" "$repo/tests"
status=$?
# pytest: 0 passed, 1 some failed, 5 nothing selected (no test could run on this many GPUs)
if [[ $status -eq 0 ]]; then
  echo "[PASS] python_suite_on_cuda: the selected tests passed on $gpus GPUs ($(( $(date +%s) - start )) s)"
  exit 0
fi
echo "[FAIL] python_suite_on_cuda: pytest exited with $status ($(( $(date +%s) - start )) s)"
exit 1
