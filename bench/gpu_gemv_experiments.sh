#!/usr/bin/env bash
# One GPU call for the one-token kernel's experimental loops (docs/benchmarks.md, sixth run: weight
# loads matched to x's layout, the row stride compiled in, INT8 widened by PTX byte permutes), all
# off by default until this has been run: the GPU tests with them on, a layer's projections with
# each added in turn (quant_bench --gemv-variants), and W1 bf16 / INT8 without and with them.
# About 4 minutes on an H200. Writes 7 files under $OUT (default bench-out/).
#
#   OUT=/some/dir bash bench/gpu_gemv_experiments.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages
LEAN=(GEMMA_GEMV_MATCHED_LOADS=1 GEMMA_GEMV_STATIC_ROWS=1 GEMMA_INT8_GEMV_WIDEN=subnormal-ptx)

env "${LEAN[@]}" timeout 240 python3 -m pytest -q -s -p no:cacheprovider -rf tests/gpu/test_quantization.py \
    tests/gpu/test_cuda_graphs.py -k "one_token or engine_logits or bf16_graph or programmatic" \
    > "$OUT/gpu-tests-lean.log" 2>&1
tail -3 "$OUT/gpu-tests-lean.log"
timeout 120 python3 -m gemma_serve.bench.quant_bench --gemv-variants --out "$OUT/gemv-variants.json" \
    > "$OUT/gemv-variants.log" 2>&1
grep -E "layer of 4|matched" "$OUT/gemv-variants.log"
for variant in base lean; do
    extra=()
    [ "$variant" = lean ] && extra=("${LEAN[@]}")
    env "${extra[@]}" timeout 150 python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization none,int8 \
        --out "$OUT/w1-$variant.json" > "$OUT/w1-$variant.log" 2>&1
    echo "== $variant"
    grep -E "^W1 " "$OUT/w1-$variant.log"
done
