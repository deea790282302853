#!/usr/bin/env bash
# The next session's GPU calls (written at the end of the tenth run, whose device time ran out).
# Each writes under $OUT (default bench-out/).
#
#   OUT=/some/dir bash bench/gpu_next.sh 1          (~6 minutes on an H200)
#     1. the whole GPU suite, with room to finish (the tenth run ran every file on its final code,
#        in two calls; new since: tests/gpu/test_gate_up_gelu.py on the GPU for the first time);
#     2. gate_up with GELU x up in its epilogue (`engine/gate_up_gelu.py`, written without a GPU)
#        against cuBLAS + the GELU kernel at 2,048 and 8,192 rows, per tile shape. The GELU kernel
#        costs 131 us a layer in a W2 mixed step; the fused kernel wins if its matmul stays within
#        that of cuBLAS's.
#
#   OUT=/some/dir bash bench/gpu_next.sh 2 TILES    (~3 minutes; TILES from 2, e.g. 128x128x64x8x3)
#     3. W2 with and without it (from 512 rows), interleaved on one engine, new prompts each run.
#
# If it wins: default GEMMA_GATE_UP_GELU_MIN_ROWS to 512 and DEFAULT_TILES to the winner, then
#   PYTHONPATH=packages python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 \
#       --quantization none,int8 --out engine.json
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

case "${1:-1}" in
1)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
    tail -3 "$OUT/gpu-tests.log"
    timeout 200 python3 -m gemma_serve.bench.quant_bench --gate-up-gelu 2048,8192 --out "$OUT/gate-up-gelu.json" \
        > "$OUT/gate-up-gelu.log" 2>&1
    grep -A4 "gate_up+GELU" "$OUT/gate-up-gelu.log"
    ;;
2)
    tiles=${2:?usage: bash bench/gpu_next.sh 2 BMxBNxBKxWxS}
    timeout 240 python3 -m gemma_serve.bench.w2_variants --repeats 2 --out "$OUT/w2-gate-up-gelu.json" \
        --variants "base;gate_up_gelu=512,gate_up_tiles=$tiles" > "$OUT/w2-gate-up-gelu.log" 2>&1
    grep -v -i warn "$OUT/w2-gate-up-gelu.log" | tail -8
    ;;
*)
    echo "usage: OUT=dir bash bench/gpu_next.sh 1 | 2 TILES" >&2
    exit 2
    ;;
esac
