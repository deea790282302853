#!/usr/bin/env bash
# One GPU call for the one-token kernel's experimental loops (docs/benchmarks.md, sixth run: weight
# loads matched to x's layout, the row stride compiled in, INT8 widened by PTX byte permutes), all
# off by default until this has been run: the GPU tests with them on, a layer's projections with
# each added in turn (quant_bench --gemv-variants), and W1 bf16 / INT8 without and with them (and
# with 8-bit weights read before the PDL wait too). About 5 minutes on an H200. Writes 7 files under
# $OUT (default bench-out/; the device returns at most 8).
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
# W1 with the engine's loop, with the lean one, and with the lean one reading 8-bit weights early too.
for variant in base lean lean-early; do
    extra=()
    [ "$variant" != base ] && extra=("${LEAN[@]}")
    [ "$variant" = lean-early ] && extra+=(GEMMA_GEMV_EARLY_WEIGHTS=all)
    echo "== $variant: ${extra[*]}" >> "$OUT/w1.log"
    env "${extra[@]}" timeout 150 python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization none,int8 \
        --out "$OUT/w1-$variant.json" >> "$OUT/w1.log" 2>&1
done
grep -E "^==|^W1 " "$OUT/w1.log"
