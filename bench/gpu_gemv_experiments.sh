#!/usr/bin/env bash
# One GPU call for the one-token kernel's experimental loop, GEMMA_GEMV_PREFETCH=1 (two tiles' loads
# issued before either is summed, so a program keeps two tiles in flight): the GPU tests with it on,
# a layer's projections and each projection with and without it, bf16 and INT8 (quant_bench
# --gemv-variants), and W1 bf16 / INT8 without and with it. About 5 minutes on an H200. Writes 6
# files under $OUT (default bench-out/; the device returns at most 8). What this script measured
# before (the lean loop, half2) is in docs/benchmarks.md (seventh run).
#
#   OUT=/some/dir bash bench/gpu_gemv_experiments.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

GEMMA_GEMV_PREFETCH=1 timeout 120 python3 -m pytest -q -s -p no:cacheprovider -rf tests/gpu/test_quantization.py \
    -k "widenings or half2 or one_token or engine_logits" > "$OUT/gpu-tests-prefetch.log" 2>&1
tail -3 "$OUT/gpu-tests-prefetch.log"
timeout 90 python3 -m gemma_serve.bench.quant_bench --gemv-variants --out "$OUT/gemv-variants.json" \
    > "$OUT/gemv-variants.log" 2>&1
grep -E "layer of 4|prefetch" "$OUT/gemv-variants.log"
for prefetch in 0 1; do
    echo "== GEMMA_GEMV_PREFETCH=$prefetch" >> "$OUT/w1.log"
    GEMMA_GEMV_PREFETCH=$prefetch timeout 100 python3 -m gemma_serve.bench.engine_bench --workloads W1 \
        --quantization none,int8 --out "$OUT/w1-prefetch$prefetch.json" >> "$OUT/w1.log" 2>&1
done
grep -E "^==|^W1 " "$OUT/w1.log"
