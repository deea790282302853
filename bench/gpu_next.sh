#!/usr/bin/env bash
# The first GPU call of the next session: what the eighth run left unrun on a GPU, then the full engine
# benchmark on the final code.
# - tests/gpu/test_quantization.py -k two_tiles: the two-tiles-in-flight loop (GEMMA_GEMV_PREFETCH,
#   on for INT8 half2 qkv) forced on every tile shape, against the one-tile loop (bit-equal) and the
#   float64 product; with the one-token and engine-logits tests around it;
# - engine_bench W1-W3, bf16 and INT8: W2 and W3 now print the time of steps with prompt rows
#   against the prompts' FLOPs time, and of decode-only steps.
# About 6 minutes on an H200. Writes 3 files under $OUT (default bench-out/). The eighth run's script
# (W3's baseline, 16-bit weights at 2-4 tokens) is in git history as bench/gpu_gemv_experiments.sh.
#
#   OUT=/some/dir bash bench/gpu_next.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

timeout 150 python3 -m pytest -q -s -p no:cacheprovider -rf tests/gpu/test_quantization.py \
    -k "two_tiles or one_token or kernel_matches or engine_logits" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 420 python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 --quantization none,int8 \
    --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
grep -vi warn "$OUT/engine.log" | tail -16
