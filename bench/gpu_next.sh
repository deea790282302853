#!/usr/bin/env bash
# The next session's GPU calls (written at the end of the eleventh run). Each writes under $OUT
# (default bench-out/).
#
#   OUT=/some/dir bash bench/gpu_next.sh 1     (~6 minutes on an H200)
#     1. the whole GPU suite (the eleventh run ran test_decode_kernel, test_cuda_graphs and
#        test_warm_up on its final code, with 512-key decode nodes; the rest ran on the code before);
#     2. the decode attention's tiles at 512-key nodes (`step_profile --decode-sweep-only`).
#
#   OUT=/some/dir bash bench/gpu_next.sh 2     (~7 minutes)
#     3. W1, W2 and W3, bf16 and INT8, in one engine_bench run, W2 three times per engine with new
#        prompts each (W2 sits at 69.8-71.4% of its bound against the 70% target, and one run
#        moves by a few percent under the power cap; W3 was not run again in the eleventh run).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

case "${1:-1}" in
1)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
    tail -3 "$OUT/gpu-tests.log"
    timeout 120 python3 -m gemma_serve.bench.step_profile --decode-sweep-only --out "$OUT/decode-sweep" \
        > "$OUT/decode-sweep.log" 2>&1
    grep "decode attention" "$OUT/decode-sweep.log"
    ;;
2)
    timeout 560 python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 --quantization none,int8 \
        --w2-repeats 3 --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
    grep -v -i warn "$OUT/engine.log" | tail -24
    ;;
*)
    echo "usage: OUT=dir bash bench/gpu_next.sh 1 | 2" >&2
    exit 2
    ;;
esac
