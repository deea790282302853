#!/usr/bin/env bash
# One GPU call for the one-token kernel's experimental INT8 path, half2 (GEMMA_INT8_GEMV_WIDEN=half2:
# weights and x as float16 pairs, multiplied two at a time; `quantization._int8_half2_dot16`): the GPU
# tests with it on, a layer's projections with and without it (quant_bench --gemv-variants), the
# widenings per projection and tile (quant_bench --int8-gemv), and W1 INT8 without and with it.
# About 6 minutes on an H200. Writes 7 files under $OUT (default bench-out/; the device returns at
# most 8). The lean-loop switches this script measured before are in docs/benchmarks.md (seventh run).
#
#   OUT=/some/dir bash bench/gpu_gemv_experiments.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

GEMMA_INT8_GEMV_WIDEN=half2 timeout 200 python3 -m pytest -q -s -p no:cacheprovider -rf tests/gpu/test_quantization.py \
    -k "widenings or half2 or one_token or engine_logits" > "$OUT/gpu-tests-half2.log" 2>&1
tail -3 "$OUT/gpu-tests-half2.log"
timeout 150 python3 -m gemma_serve.bench.quant_bench --gemv-variants --out "$OUT/gemv-variants.json" \
    > "$OUT/gemv-variants.log" 2>&1
grep -E "layer of 4|half2" "$OUT/gemv-variants.log"
for widen in float-add half2; do
    echo "== GEMMA_INT8_GEMV_WIDEN=$widen" >> "$OUT/w1.log"
    GEMMA_INT8_GEMV_WIDEN=$widen timeout 120 python3 -m gemma_serve.bench.engine_bench --workloads W1 \
        --quantization int8 --out "$OUT/w1-$widen.json" >> "$OUT/w1.log" 2>&1
done
grep -E "^==|^W1 " "$OUT/w1.log"
timeout 240 python3 -m gemma_serve.bench.quant_bench --int8-gemv --out "$OUT/int8-gemv.json" \
    > "$OUT/int8-gemv.log" 2>&1
grep -E "int8 one token" "$OUT/int8-gemv.log"
