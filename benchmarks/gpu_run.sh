#!/usr/bin/env bash
# Everything GPU-only, in one call, on a machine with an NVIDIA GPU, this checkout, its own torch, Triton
# and nvcc, and no package registry. The steps, most valuable first:
#   env      environment facts (GPU, driver, nvcc, torch/Triton/CUDA versions, optional packages)
#   build    the extension for this GPU's architecture only (or the one GPU_RUN_PREBUILT names), while
#            the Triton kernel variants of the benchmark suite compile ahead of time in parallel
#   tests-a  the CUDA extension's tests, the block on CUDA (both fused backends), direct and replayed Triton launches' bits
#   bench    benchmarks: eager and the fused backends (each case checked against float64 first)
#   host     host time per block call (tiny blocks): Triton's direct launches, C launches, replays and C++ nodes on and off
#   compile  benchmarks: torch.compile against eager, and each step captured in a CUDA graph (the head
#            shape and the whole models)
#   tune     the Triton tile table for the seed's 3x3 layers (benchmarks/tune_conv.py)
#   tests-b  the rest of the test suite on CUDA
#   ncu      Nsight Compute on one step of the head shape per backend and mode (eager beside)
#   sanitize compute-sanitizer: memcheck on a fused forward+backward, racecheck on one CUDA conv launch
#   autotune benchmarks: torch.compile max-autotune, if time remains
#   report   the results table and plot, and the summary at the end of log.txt
# The tests run in pytest-xdist processes where it is installed (the GPU machine has it): each Triton
# variant JIT-compiles in the process that first needs it, in parallel. The first GPU run (2026-11-26)
# compiled the tests' 579 variants ahead in 12 processes instead, which did not finish in 240 s.
#
# Usage: bash benchmarks/gpu_run.sh OUTDIR
#   GPU_RUN_BUDGET_S  seconds for the whole run (default 510, inside a 9-minute call; with 240 the
#                     steps after the benchmarks are skipped: the most valuable subset)
#   GPU_RUN_DRY=1     run every step on the CPU (Triton interpreter, the quick benchmarks, no sanitizer;
#                     caps and budget x3): CI does, so the script has run end to end before it meets a GPU
#   PYTHON            the interpreter (default python3)
#   GPU_RUN_PREBUILT  a gzipped extension a previous run saved (OUTDIR/extension.so.gz): used instead of
#                     building, when csrc/ has not changed since (a build takes minutes of device time)
#   GPU_RUN_TEST_PROCS  pytest-xdist processes for the tests (default 12; 0: none)
#   GPU_RUN_STEPS     comma-separated steps to run (env, build and report always run): a second call
#                     runs what the first did not reach, e.g. GPU_RUN_STEPS=tests-b,ncu,sanitize
#   GPU_RUN_CAPS      per-step caps in seconds, e.g. GPU_RUN_CAPS=bench=110,compile=150
#   GPU_RUN_SHORT     1/0: force the short budget's subset on or off (default: on under 360 s)
# Each step runs under `timeout -s INT` with a kill grace, so pytest prints its summary and writes its
# XML when cut; a step gets at most its own cap and what is left of the budget after a reserve for the
# report. Output: at most 8 files in OUTDIR (log.txt, results.jsonl, results.md, results.png,
# kernels.md, extension.so.gz, logs.tar.gz with everything else). log.txt alone says what passed, what failed and the
# headline speedups. Then copy OUTDIR to benchmarks/results/<date>-<gpu>/ and run
#   python -m fused_resnet report benchmarks/results/<date>-<gpu>/results.jsonl --readme README.md \
#     --auto-table fused_resnet/backends/auto_table.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
LOG="$OUT/log.txt"
: > "$LOG"
STATUS="$LOGS/steps.tsv"
: > "$STATUS"
PY=${PYTHON:-python3}
DRY=${GPU_RUN_DRY:-0}
# On the CPU every step is slower (the Triton interpreter): the dry run scales the caps and the budget.
SCALE=$([ "$DRY" = 1 ] && echo 3 || echo 1)
BUDGET=${GPU_RUN_BUDGET_S:-$(( 510 * SCALE ))}
# A short budget (under 6 minutes, e.g. 240) runs the most valuable subset: build, the extension and block
# tests, the short benchmark suite (eager and fused), report.
SHORT=${GPU_RUN_SHORT:-$([ "$BUDGET" -lt $(( 360 * SCALE )) ] && echo 1 || echo 0)}
RESERVE=25          # kept for the report
MIN_STEP=20         # a step with less time than this left is skipped
GRACE=15            # seconds between SIGINT and SIGKILL
START=$(date +%s)
export PYTHONUNBUFFERED=1 OUT LOGS PY DRY BUDGET

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

# run_step NAME CAP COMMAND...: run under the budget; record ok / FAILED / timed out / skipped.
run_step() {
  local name=$1 cap=$2; shift 2
  case ",env,build,report,${GPU_RUN_STEPS:-$name}," in
    *",$name,"*) ;;
    *) say "=== $name: skipped (not in GPU_RUN_STEPS)"; printf '%s\tskipped (not selected)\t0\t0\n' "$name" >> "$STATUS"
       return 0 ;;
  esac
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  if [ "$left" -lt "$MIN_STEP" ]; then
    say "=== $name: skipped (out of time: ${left} s left of the budget)"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$STATUS"
    return 0
  fi
  # GPU_RUN_CAPS="bench=110,compile=150" overrides a step's cap (seconds, before the dry run's scaling)
  local over
  over=$(tr ',' '\n' <<< "${GPU_RUN_CAPS:-}" | sed -n "s/^$name=\([0-9][0-9]*\)$/\1/p" | head -n 1)
  [ -n "$over" ] && cap=$over
  cap=$(( cap * SCALE ))
  local lim=$(( cap < left ? cap : left ))
  say "=== $name (limit ${lim} s, $(elapsed) s in)"
  local t0=$(date +%s)
  # Shell functions run in a child bash (exported with export -f), so timeout can signal them.
  timeout -s INT -k "$GRACE" "$lim" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - t0 )) verdict
  case $rc in
    0) verdict=ok ;;
    124) verdict="timed out after ${lim} s" ;;
    137) verdict="killed ${GRACE} s after its ${lim} s limit" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  tail -n "${TAIL_LINES:-15}" "$LOGS/$name.log" >> "$LOG"
  say "--- $name: $verdict in ${took} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$took" "$rc" >> "$STATUS"
  return 0
}

# ------------------------------------------------------------------------------------------- environment
env_facts() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry run: $DRY  budget: $BUDGET s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  $PY - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: MISSING (", exc, ")")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
else:
    print("gpu: none (CPU run)")
for name, role in (("ninja", "parallel extension build"), ("pytest_benchmark", "benchmark statistics"),
                   ("matplotlib", "results plot"), ("numpy", "Triton interpreter")):
    try:
        importlib.import_module(name)
        print(f"{name}: ok")
    except ImportError:
        print(f"{name}: missing ({role} degrades)")
EOF
}
export -f env_facts
TAIL_LINES=40 run_step env 30 env_facts

# ------------------------------------------------------------------------------------------------- build
if [ "$DRY" = 1 ]; then
  ARCH=""   # CPU: the default architectures, as CI built them (ninja rebuilds nothing)
  KARCH=90
  WARM_TESTS="tests/test_triton.py"   # the mechanics only: CI compiles every test variant in its own step
  WARM_SUITES="quick"
else
  ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  KARCH=$(echo "$ARCH" | tr -d .)
  WARM_TESTS=""   # the tests compile their variants in parallel themselves (xdist processes)
  WARM_SUITES="default"
  if [ "$SHORT" = 1 ]; then WARM_SUITES="short"; fi
  # a call that runs no benchmark step needs no benchmark variants compiled ahead
  case ",${GPU_RUN_STEPS:-bench}," in *,bench,*|*,compile,*|*,autotune,*) ;; *) WARM_SUITES="" ;; esac
fi
if [ "$DRY" != 1 ] && [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
build_and_warm() {
  # The build uses a few cores (one nvcc per .cu file); meanwhile the Triton variants the later steps
  # need are listed and compiled ahead on the others, into Triton's cache (a test run on a new GPU would
  # otherwise JIT-compile some 300 variants one after another).
  ( if [ -n "${GPU_RUN_PREBUILT:-}" ]; then
      so=$($PY -c "import sysconfig; print('fused_resnet/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
      gunzip -c "$GPU_RUN_PREBUILT" > "$so" && echo "prebuilt extension: $GPU_RUN_PREBUILT -> $so"
    else
      if [ -n "$ARCH" ]; then export TORCH_CUDA_ARCH_LIST=$ARCH; fi
      MAX_JOBS=${MAX_JOBS:-4} $PY setup.py build_ext --inplace > "$LOGS/build-full.log" 2>&1
      echo "build exit $?"
    fi ) &
  local build_pid=$!
  # The tests' variants: the test suite with every launch listed and none run (results are garbage and
  # failures expected; torch.compile tests left out: they would compile Inductor's kernels for nothing).
  if [ -n "$WARM_TESTS" ]; then
    FUSED_RESNET_NO_EXTENSION=1 FUSED_RESNET_RECORD_LAUNCHES="$LOGS/test-variants.jsonl" FUSED_RESNET_DRY_LAUNCHES=1 \
      $PY -m pytest -q -p no:cacheprovider $WARM_TESTS -k "not compile" > "$LOGS/warm-tests.log" 2>&1
    echo "test variants listed: $(wc -l < "$LOGS/test-variants.jsonl" 2>/dev/null || echo none)"
    $PY -m fused_resnet kernels --arch "$KARCH" --variants "$LOGS/test-variants.jsonl" --jobs "${WARM_JOBS:-12}" \
      --quiet || echo "warm tests: some variants failed to compile"
  fi
  for s in $WARM_SUITES; do
    $PY -m fused_resnet kernels --arch "$KARCH" --suite "$s" --jobs "${WARM_JOBS:-12}" --quiet \
      --json "$LOGS/kernels-$s.json" || echo "warm $s: some variants failed to compile"
  done
  wait $build_pid
  if [ -f "$LOGS/build-full.log" ]; then
    grep -E "error|Error" "$LOGS/build-full.log" | head -n 20
    grep -E "spill|stack frame" "$LOGS/build-full.log" | sort | uniq -c | sort -rn | head -n 5
    # saved for a later call to carry (GPU_RUN_PREBUILT), skipping the build
    [ "$DRY" != 1 ] && gzip -c fused_resnet/_C*$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))") \
      > "$OUT/extension.so.gz" 2>/dev/null
  fi
  $PY -c "from fused_resnet.backends import extension as e; import sys; \
print('extension:', 'CPU' if e.has_kernel('bn_act', 'CPU') else 'none', '+ CUDA' if e.has_kernel('bn_act', 'CUDA') \
else '(no CUDA kernels)'); sys.exit(0 if e.has_ops() else 1)"
}
export ARCH KARCH WARM_SUITES WARM_TESTS
export -f build_and_warm
run_step build $([ "$SHORT" = 1 ] && echo 150 || echo 240) build_and_warm

# ------------------------------------------------------------------------------------------------- tests
PYTEST=($PY -m pytest -q -rfE --maxfail=25 -p no:cacheprovider)
PROCS=${GPU_RUN_TEST_PROCS:-12}
TEST_PROCS=()
if [ "$PROCS" -gt 0 ] && $PY -c "import xdist" 2>/dev/null; then TEST_PROCS=(-n "$PROCS"); fi
A_FILES="tests/test_ops.py tests/test_primitives.py tests/test_block.py"
A_EXPR="(cuda and (test_ops or test_primitives or test_block)) or test_direct_and_jit or test_replayed_and_python"
run_step tests-a 150 "${PYTEST[@]}" "${TEST_PROCS[@]}" tests -k "$A_EXPR" --junitxml="$LOGS/tests-a.xml"
skip() { say "=== $1: skipped ($2)"; printf '%s\tskipped (%s)\t0\t0\n' "$1" "$2" >> "$STATUS"; }

# ------------------------------------------------------------------------------------------- benchmarks
if [ "$DRY" = 1 ]; then BENCH=(--bench-device cpu --bench-suite quick --bench-iters 3); \
  FUSED="eager,fused-cpp,fused-torch"; else BENCH=(--bench-device cuda --bench-suite "${WARM_SUITES}"); \
  FUSED="eager,fused-triton,fused-cuda"; fi
bench() {  # bench NAME PROVIDERS: rows append to results.jsonl as they are measured
  $PYTEST_ARGS benchmarks $BENCH_ARGS --bench-providers "$2" --bench-rows "$OUT/results.jsonl" \
    --benchmark-json "$LOGS/pytest-benchmark-$1.json" --benchmark-columns=median,iqr --junitxml="$LOGS/$1.xml"
}
export BENCH_ARGS="${BENCH[*]}" PYTEST_ARGS="${PYTEST[*]}"
export -f bench
run_step bench 200 bench bench "$FUSED"

# Host time per block call (tiny blocks, one thread): Triton's direct launches against its own launch path,
# training's Triton calls replayed from C++ against their Python launchers (FUSED_RESNET_TRITON_REPLAY=0), and
# training composed in C++ nodes against the Python autograd Functions (FUSED_RESNET_BLOCK_NODE=0).
host_times() {
  local dev=cuda triton=fused-triton
  [ "$DRY" = 1 ] && dev=cpu triton=fused-triton-offline   # the CPU times the Triton path offline (interpreter off)
  for setting in "direct1 1 1 1 1 " "direct0 0 1 1 1 " "claunch0 1 1 1 0 $triton" "replay0 1 1 0 1 $triton" \
      "node0 1 0 1 1 $triton"; do
    # log name, FUSED_RESNET_TRITON_DIRECT, FUSED_RESNET_BLOCK_NODE, FUSED_RESNET_TRITON_REPLAY,
    # FUSED_RESNET_TRITON_C_LAUNCH, providers (all: empty)
    set -- $setting
    echo "--- FUSED_RESNET_TRITON_DIRECT=$2 FUSED_RESNET_BLOCK_NODE=$3 FUSED_RESNET_TRITON_REPLAY=$4 FUSED_RESNET_TRITON_C_LAUNCH=$5"
    TRITON_INTERPRET=0 FUSED_RESNET_TRITON_DIRECT=$2 FUSED_RESNET_BLOCK_NODE=$3 FUSED_RESNET_TRITON_REPLAY=$4 \
      FUSED_RESNET_TRITON_C_LAUNCH=$5 \
      $PY -m fused_resnet bench --device $dev --suite host --threads 1 --iters 40 --rounds 10 --providers "${6:-}" \
      --json "$LOGS/host-$1.json" | grep -E "^\| [a-z0-9]" | cut -d'|' -f2-9
  done
}
export -f host_times
if [ "$SHORT" = 1 ]; then skip host "short budget"; else TAIL_LINES=50 run_step host 120 host_times; fi

# torch.compile, and every provider's step captured in a CUDA graph (a host-bound caller's remedy), beside eager
if [ "$SHORT" = 1 ]; then skip compile "short budget"; else
  run_step compile 200 bench compile "eager,compile,eager+graph,fused-triton+graph,fused-cuda+graph"; fi

# The Triton tile table: each seed 3x3 layer (bf16, batch 32) under every no-spill candidate against the current
# choice; the entries that beat it are printed for configs.TUNED_CONV (commit them with the GPU's name).
tune() {
  if [ "$DRY" = 1 ]; then TRITON_INTERPRET=1 $PY -m benchmarks.tune_conv --smoke --jobs 2 --rounds 1
  else
    $PY -m benchmarks.tune_conv --dtype bfloat16 --batch 32 --budget-s 60 --json "$LOGS/tune-bf16.json"
    $PY -m benchmarks.tune_conv --dtype bfloat16 --batch 32 --budget-s 50 --mode train --json "$LOGS/tune-bf16-train.json"
  fi
}
export -f tune
if [ "$SHORT" = 1 ]; then skip tune "short budget"; else TAIL_LINES=45 run_step tune 140 tune; fi

if [ "$SHORT" = 1 ]; then skip tests-b "short budget"; else
  # The dry run (CI, on the CPU) proves the step, on one file: CI's own test run covers the whole suite.
  # On the GPU the CPU-only checks are left to CI: the ahead-of-time machine-code report (hundreds of
  # compiles, minutes) and the report formatting. The second GPU run's tests-b did not finish in 120 s.
  B_FILES=(tests --ignore=tests/test_kernel_quality.py --ignore=tests/test_reporting.py)
  [ "$DRY" = 1 ] && B_FILES=(tests/test_block.py -m "not slow")
  run_step tests-b 150 "${PYTEST[@]}" "${TEST_PROCS[@]}" "${B_FILES[@]}" -k "not ($A_EXPR)" --junitxml="$LOGS/tests-b.xml"
fi

# Nsight Compute on one step of the head shape per backend and mode (eager's kernels beside the fused
# ones): duration, throughput against the SM's and memory's peaks, occupancy, registers per kernel.
ncu_profile() {
  if [ "$DRY" = 1 ]; then $PY -m benchmarks.profile_case --device cpu --backends eager,cpp; return; fi
  ncu --clock-control none --profile-from-start off --set basic --print-summary per-kernel \
    $PY -m benchmarks.profile_case --backends eager,triton,cuda > "$LOGS/ncu-summary.txt" 2>&1
  local rc=$?
  grep -E "^  [A-Za-z_].*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" \
    "$LOGS/ncu-summary.txt" | head -n 200
  grep -E "ok$|NOT FINITE|==ERROR==|==WARNING==" "$LOGS/ncu-summary.txt" | head -n 20
  return $rc
}
export -f ncu_profile
if [ "$SHORT" = 1 ]; then skip ncu "short budget"
elif [ "$DRY" != 1 ] && ! command -v ncu >/dev/null; then skip ncu "ncu not found"
else TAIL_LINES=60 run_step ncu 120 ncu_profile
fi

sanitize() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=0 $PY -m benchmarks.sanitize_case --backends cuda,triton  # warm the Triton cache
  echo "--- memcheck: fused forward+backward, cuda and triton backends"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT 100 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m benchmarks.sanitize_case --backends cuda,triton
  local mem=$?
  [ $mem -eq 124 ] && echo "memcheck: TIMED OUT after 100 s"
  echo "--- racecheck: one CUDA conv launch"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT 60 compute-sanitizer --tool racecheck --error-exitcode 3 \
    $PY -m benchmarks.sanitize_case --backends cuda --one-conv
  local race=$?
  [ $race -eq 124 ] && echo "racecheck: TIMED OUT after 60 s"
  echo "memcheck exit $mem, racecheck exit $race"
  [ $mem -eq 0 ] && [ $race -eq 0 ]
}
export -f sanitize
if [ "$DRY" = 1 ]; then  # the script without the sanitizer, on the CPU backend: it runs, its blocks are finite
  run_step sanitize 60 $PY -m benchmarks.sanitize_case --device cpu --backends cpp
elif [ "$SHORT" = 1 ]; then skip sanitize "short budget"
elif ! command -v compute-sanitizer >/dev/null; then skip sanitize "compute-sanitizer not found"
else run_step sanitize 180 sanitize
fi

if [ "$DRY" = 1 ]; then skip autotune "dry run: max-autotune is a GPU provider"
elif [ "$SHORT" = 1 ]; then skip autotune "short budget"
else run_step autotune 240 bench autotune "eager,compile-max-autotune"
fi

# ----------------------------------------------------------------------------------------------- report
KJSON="$LOGS/kernels-${WARM_SUITES%% *}.json"
if [ -s "$OUT/results.jsonl" ]; then
  RESERVE=0 MIN_STEP=5 TAIL_LINES=3 run_step report 60 \
    $PY -m fused_resnet report "$OUT/results.jsonl" --out "$OUT/results" $([ -s "$KJSON" ] && echo --kernels "$KJSON")
else skip report "no benchmark rows"
fi
# kernels.md: what the sm_<arch> compiler made of the benchmark suite's Triton variants (the warm step)
$PY benchmarks/gpu_run_summary.py "$OUT" --kernels "$KJSON" > "$OUT/kernels.md" \
  2>/dev/null || rm -f "$OUT/kernels.md"
$PY benchmarks/gpu_run_summary.py "$OUT" --status "$STATUS" --junit "$LOGS" >> "$LOG" 2>&1 || say "summary FAILED"
bad=$(awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/' "$STATUS" | wc -l)
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
say "done in $(elapsed) s: $bad steps failed or timed out; files: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$bad" -eq 0 ]
