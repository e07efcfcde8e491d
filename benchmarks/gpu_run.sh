#!/usr/bin/env bash
# Everything GPU-only, in one call, on a machine with an NVIDIA GPU, this checkout, its own
# torch/Triton/nvcc and no package registry (about 8 minutes on an H100):
#   1. build the extension in place for this GPU's architecture
#   2. the whole test suite on CUDA, every dtype
#   3. compute-sanitizer memcheck on a small fused forward and backward
#   4. the GPU benchmark suite (pytest-benchmark JSON), then its markdown table and PNG plot
# Usage: bash benchmarks/gpu_run.sh OUTDIR, then copy OUTDIR to benchmarks/results/<date>-<gpu>/ and run
#   python -m fused_resnet report benchmarks/results/<date>-<gpu>/results.jsonl --readme README.md \
#     --auto-table fused_resnet/backends/auto_table.py
# The whole run keeps to BUDGET_S seconds (default 530, under the 9 minutes a lent GPU call allows): each
# step gets at most its own cap and what is left of the budget, keeping a reserve for the report, so a
# slow step shortens the ones after it instead of losing the run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_run.sh OUTDIR}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
status=0
START=$(date +%s)
BUDGET=${BUDGET_S:-530}
step() { echo; echo "=== $* ($(date +%T), $(( $(date +%s) - START )) s in)" | tee -a "$LOG"; }
# seconds for a step: min(cap, what is left of the budget minus a reserve), at least 1
limit() { local left=$(( BUDGET - ($(date +%s) - START) - $2 )); [ "$left" -lt "$1" ] || left=$1; \
  [ "$left" -gt 0 ] || left=1; echo "$left"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

step "build (this GPU's architecture only)"
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} timeout "$(limit 240 300)" $PY setup.py build_ext --inplace \
  > "$OUT/build.log" 2>&1 || { echo "build FAILED (see build.log)" | tee -a "$LOG"; status=1; }
grep -E "ptxas info|spill|stack frame" "$OUT/build.log" | sort | uniq | tail -n 40 >> "$LOG"

step "tests on CUDA (every dtype)"
# --maxfail rather than -x: a first run on a new GPU should show how far a problem reaches.
timeout "$(limit 210 240)" $PY -m pytest -q --maxfail=25 -p no:cacheprovider tests --junitxml="$OUT/tests.xml" \
  2>&1 | tail -n 60 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  timeout "$(limit 90 150)" compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/sanitize_case.py \
    > "$OUT/sanitizer.log" 2>&1; rc=$?
  tail -n 15 "$OUT/sanitizer.log" | tee -a "$LOG"
  [ $rc -eq 0 ] || { echo "memcheck FAILED (rc $rc)" | tee -a "$LOG"; status=1; }
else
  echo "compute-sanitizer not found" | tee -a "$LOG"
fi

step "benchmarks"
# Rows are appended to results.jsonl as they are measured: a run cut short by the time limit keeps them.
timeout "$(limit 330 25)" $PY -m pytest -q -p no:cacheprovider benchmarks --bench-device cuda --bench-suite default \
  --bench-rows "$OUT/results.jsonl" --benchmark-json "$OUT/pytest-benchmark.json" \
  --benchmark-columns=median,iqr 2>&1 | tail -n 5 | tee -a "$LOG"
if [ -s "$OUT/results.jsonl" ]; then
  $PY -m fused_resnet report "$OUT/results.jsonl" 2>&1 | tail -n 60 | tee -a "$LOG"
else
  echo "no benchmark results" | tee -a "$LOG"; status=1
fi

step "done: status $status"
exit $status
