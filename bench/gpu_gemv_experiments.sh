#!/usr/bin/env bash
# One GPU call for what the seventh run left unmeasured (run in the eighth: docs/benchmarks.md):
# 16-bit weights at 2-4 tokens on the one-token kernel (GEMMA_BF16_FEW_TOKEN_ROWS) against cuBLAS; the
# GPU tests of the one-token / few-token paths, including the GELU epilogue at 2-4 rows
# (`projected_gelu_mul`) and the start-up check of the half2 path (`check_half2`); and W3 with
# transformers' generate() run three times, its best counting (engine_bench --baseline-repeats).
# About 4 minutes on an H200. Writes 6 files under $OUT (default bench-out/; the device returns at
# most 8).
#
#   OUT=/some/dir bash bench/gpu_gemv_experiments.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

timeout 150 python3 -m pytest -q -s -p no:cacheprovider -rf tests/gpu/test_quantization.py \
    -k "one_token or few_token or kernel_matches or projections or engine_logits or half2" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 90 python3 -m gemma_serve.bench.quant_bench --batch 1,2,3,4 --methods bf16,bf16-gemv,int8 \
    --out "$OUT/few-token.json" > "$OUT/few-token.log" 2>&1
cat "$OUT/few-token.log"
timeout 240 python3 -m gemma_serve.bench.engine_bench --workloads W3 --quantization none \
    --out "$OUT/w3.json" > "$OUT/w3.log" 2>&1
grep -E "^W3" "$OUT/w3.log"
