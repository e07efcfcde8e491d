#!/usr/bin/env bash
# The second GPU call: the carried extension (built in call 1 from unchanged csrc), the CUDA tests after
# the test fixes (xdist: Triton variants JIT-compile in parallel), torch.compile vs fused at one seed
# shape, and a native backtrace of the torch-2.11 segfault.
export PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda
gunzip -c .gpu/C312.so.gz > fused_resnet/_C.cpython-312-x86_64-linux-gnu.so
python3 -c "from fused_resnet.backends import extension as e; print('ops', e.has_ops(), 'cuda', e.has_kernel('bn_act', 'CUDA'))"
t0=$(date +%s)
timeout -s INT -k 5 150 python3 -m pytest -q -rfE -n 12 -p no:cacheprovider tests/test_block.py tests/test_block_node.py \
  tests/test_torchvision.py tests/test_training.py tests/test_modules.py tests/test_validation.py tests/test_triton.py \
  -k "cuda and not bad_arguments" --junitxml=$OUT/tests.xml > $OUT/tests.log 2>&1
echo "tests exit $? in $(( $(date +%s) - t0 )) s"; tail -n 30 $OUT/tests.log
t0=$(date +%s)
timeout -s INT -k 5 100 python3 -m pytest -q -p no:cacheprovider benchmarks --bench-device cuda --bench-suite default \
  --bench-providers eager,compile,fused-triton,fused-cuda --bench-rows $OUT/compile.jsonl \
  -k "id-64to64-56x56-b32 and (eval or fwdbwd)" --benchmark-json $OUT/compile-bench.json \
  --benchmark-columns=median,iqr > $OUT/compile.log 2>&1
echo "compile bench exit $? in $(( $(date +%s) - t0 )) s"; tail -n 12 $OUT/compile.log
timeout 25 cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider tests/test_block_node.py \
  -k bad_arguments > $OUT/segv.txt 2>&1
echo "segv diag exit $?"; grep -n "^#" $OUT/segv.txt | head -n 25
