#!/usr/bin/env bash
# The first GPU call of the next session. In the tenth run the whole GPU suite did not finish within
# its 180 s, and on the final code only test_fused_kernels, test_prefill_kernel, test_cuda_graphs and
# test_warm_up ran (65 passed). So: the whole suite with room to finish, then the full engine
# benchmark as a fresh baseline. About 8 minutes on an H200; writes 3 files under $OUT (default bench-out/).
#
#   OUT=/some/dir bash bench/gpu_next.sh
#
# To compare engine settings on W2 (one engine, round-robin runs with new prompts each, SM clock
# sampled), e.g.:
#   PYTHONPATH=packages python3 -m gemma_serve.bench.w2_variants --repeats 2 \
#       --variants "base;qkv_heads=1" --out w2-variants.json
# The tenth run's first script (prefill sweep, W2 variants, the bf16 matrix-unit sweep) is in git
# history under this name.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 280 python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 --quantization none,int8 \
    --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
grep -vi warn "$OUT/engine.log" | tail -18
