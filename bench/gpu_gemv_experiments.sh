#!/usr/bin/env bash
# One GPU call comparing the INT8 one-token kernel's two widenings, half2 (the default: weights and x
# as float16 pairs, `quantization._int8_half2_dot16`) and float-add (exact): the GPU tests on half2,
# a layer's projections with each (quant_bench --gemv-variants), the widenings per projection and
# tile (quant_bench --int8-gemv), and W1 INT8 with each. About 6 minutes on an H200. Writes 8 files
# under $OUT (default bench-out/; the device returns at most 8). Results: docs/benchmarks.md (seventh
# run), which also has what this script measured before (the lean loop) and after (prefetch).
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
