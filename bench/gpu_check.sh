#!/usr/bin/env bash
# The CUDA checks, in one go, on a GPU machine (no internet needed):
#   bash bench/gpu_check.sh            (from anywhere; it runs from the repo root)
# 1. the GPU and the versions; 2. tests/test_cuda.py (pytest -m cuda); 3. bench/overhead_gpu.py;
# 4. a summary. It never stops at the first failure. Exit status: 0 when every test passed
# and the benchmark ran, 1 otherwise. Logs go to $GPU_CHECK_LOGS (default: /tmp/nanofit_gpu_check).
# Worst case about 3.7 minutes: the tests are cut at $TEST_TIMEOUT s (170), the benchmark at
# $BENCH_TIMEOUT s (50); normally both take well under a minute.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
LOGS=${GPU_CHECK_LOGS:-${TMPDIR:-/tmp}/nanofit_gpu_check}
TEST_TIMEOUT=${TEST_TIMEOUT:-170}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-50}
mkdir -p "$LOGS"
# The package from this checkout (src/ layout), whether or not it is pip-installed there.
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# The interpreter that has torch ('python3' on some images, 'python' on others).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python with torch found (set PYTHON=...)"
    exit 1
fi

echo "=== machine ==="
nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"
"$PY" - <<'EOF' 2>&1
import sys, torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version()}; NCCL "
      f"{torch.cuda.nccl.version() if torch.cuda.is_available() else '-'}")
print(f"cuda available: {torch.cuda.is_available()}; devices: "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
import nanofit
print(f"nanofit from {nanofit.__file__}")
EOF

echo
echo "=== tests/test_cuda.py (timeout ${TEST_TIMEOUT}s) ==="
# pytest-timeout, where installed, stops one hung test instead of the whole run.
PER_TEST=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PER_TEST=(--timeout 130)
fi
timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -m cuda -rA --durations=0 \
    -p no:cacheprovider "${PER_TEST[@]}" tests/test_cuda.py 2>&1 | tee "$LOGS/tests.log"
TEST_RC=${PIPESTATUS[0]}

echo
echo "=== bench/overhead_gpu.py (timeout ${BENCH_TIMEOUT}s) ==="
timeout -k 5 "$BENCH_TIMEOUT" "$PY" bench/overhead_gpu.py 2>&1 | tee "$LOGS/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo
echo "=== summary ==="
if [ "$TEST_RC" = 124 ] || [ "$TEST_RC" = 137 ]; then
    echo "tests: TIMED OUT after ${TEST_TIMEOUT}s (see $LOGS/tests.log for the ones that ran)"
fi
echo "tests (rc $TEST_RC): $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$LOGS/tests.log" | tail -1)"
FAILED=$(grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log")
if [ -n "$FAILED" ]; then
    echo "$FAILED"
fi
PASSED=$(grep -cE '^PASSED ' "$LOGS/tests.log")
echo "passed: $PASSED; failed/errors: $(printf '%s' "$FAILED" | grep -c .)"
if [ "$BENCH_RC" = 0 ]; then
    grep -E '^(torch |RATIO )' "$LOGS/bench.log"
else
    echo "benchmark: FAILED (rc $BENCH_RC; 124 = timed out); last lines:"
    tail -5 "$LOGS/bench.log"
fi
echo "logs: $LOGS"

[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
