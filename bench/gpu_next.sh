#!/usr/bin/env bash
# The next session's GPU calls, prepared in the tenth run (which had no GPU). Each call takes at
# most ~9 minutes on an H200 and writes under $OUT (default bench-out/).
#
#   OUT=/some/dir bash bench/gpu_next.sh 1
#     1. the whole GPU suite (the ninth run's final code ran only parts of it; new: the split prefill
#        key loop's bit-equality test, the matrix-unit kernel on bf16 weights without scales and
#        the GEMMA_BF16_MATRIX_TABLE routing);
#     2. the prefill attention sweep: tiles x key loop masked throughout / split, against SDPA;
#     3. W2 under the settings prepared without a GPU, interleaved on one engine, with SM clocks:
#        qkv_heads=4 (the QK-norm/RoPE/cache-write kernel took 5.4 ms of a 95 ms mixed step as 131K
#        one-head programs; with 2 or 4 warps), prefill_split=1 (with the others; step 2 times it
#        alone), and smaller token budgets (engine_bench runs W2 at
#        8192 tokens a step; serving's default is 4096): in a mixed step the ~240 decode rows cost
#        their attention plus a share of a large, efficient matmul, against a 10.5 ms decode-only
#        step, so more, smaller mixed steps may finish W2 sooner.
#
#   OUT=/some/dir bash bench/gpu_next.sh 2 [VARIANTS]
#     4. bf16 weights on the Triton matrix-unit kernel against cuBLAS at 128 and 256 rows, per
#        projection and tile shape (W3's and W2's decode steps);
#     5. W2: base against the projections that won in 4 (bf16_matrix=, the decode graphs captured
#        again), plus VARIANTS (e.g. the winners of call 1: "qkv_heads=4,budget=2048").
#
# Then set the defaults that won (GEMMA_BF16_MATRIX_TABLE: commit the JSON of 4 and point the
# default at it, or keep cuBLAS), and run the full engine benchmark on them:
#   PYTHONPATH=packages python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 \
#       --quantization none,int8 --out engine.json
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

case "${1:-1}" in
1)
    timeout 180 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
    tail -3 "$OUT/gpu-tests.log"
    timeout 60 python3 -m gemma_serve.bench.step_profile --prefill-sweep-only --out "$OUT/prefill-sweep" \
        > "$OUT/prefill-sweep.log" 2>&1
    grep "prefill attention" "$OUT/prefill-sweep.log"
    timeout 330 python3 -m gemma_serve.bench.w2_variants --repeats 2 --out "$OUT/w2-variants.json" \
        --variants "base;qkv_heads=4;qkv_heads=4,qkv_warps=4;budget=4096;budget=2048;qkv_heads=4,prefill_split=1,budget=2048" \
        > "$OUT/w2-variants.log" 2>&1
    grep -v -i warn "$OUT/w2-variants.log" | tail -22
    ;;
2)
    timeout 300 python3 -m gemma_serve.bench.quant_bench --bf16-matrix 128,256 --out "$OUT/bf16-matrix.json" \
        > "$OUT/bf16-matrix.log" 2>&1
    grep "bf16 matrix" "$OUT/bf16-matrix.log"
    variants="base;bf16_matrix=$OUT/bf16-matrix.json${2:+;$2}"
    timeout 240 python3 -m gemma_serve.bench.w2_variants --repeats 2 --out "$OUT/w2-bf16-matrix.json" \
        --variants "$variants" > "$OUT/w2-bf16-matrix.log" 2>&1
    grep -v -i warn "$OUT/w2-bf16-matrix.log" | tail -12
    ;;
*)
    echo "usage: OUT=dir bash bench/gpu_next.sh 1 | 2 [VARIANTS]" >&2
    exit 2
    ;;
esac
