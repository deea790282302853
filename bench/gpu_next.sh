#!/usr/bin/env bash
# GPU calls of the eleventh to seventeenth runs, and the next session's. Each writes under $OUT (default
# bench-out/; the device returns at most 8 files a call); docs/benchmarks.md names the call behind
# every figure.
#
#   OUT=/some/dir bash bench/gpu_next.sh 11    (fourteenth run, ~3 minutes on an H200)
#     every unsplit one-token tile per projection, bf16 and INT8 (quant_bench --one-token-tiles), then
#     W1 with the engine's tiles against the fastest (bench/tile_override.py), A B A B.
#   OUT=/some/dir bash bench/gpu_next.sh 12    (~6 minutes)
#     the whole GPU suite, the 1-4-token layers, W1 (on f446122: INT8 tiles changed too).
#   OUT=/some/dir bash bench/gpu_next.sh 13    (~4 minutes)
#     INT8 o / gate_up tiles new and old: the 1-4-token layers and W1 INT8 (bench/tile_override.py).
#   OUT=/some/dir bash bench/gpu_next.sh 14    (~3 minutes)
#     the final code's W1 and its kernel / engine GPU tests.
#   OUT=/some/dir bash bench/gpu_next.sh 17    (fifteenth run, ~7 minutes)
#     W1, W2 and W3, bf16 and INT8, in one engine_bench run (the README table), then a bf16 W1 step's
#     kernels (step_profile).
#   OUT=/some/dir bash bench/gpu_next.sh 21    (sixteenth run, ~3 minutes)
#     the batch-1 megakernel: GPU tests, bench/megakernel_probe.py with its switches, compute-sanitizer,
#     and the engine's W1 (bf16 and INT8) beside it.
#   OUT=/some/dir bash bench/gpu_next.sh 22    (seventeenth run, ~6 minutes)
#     the one-token GEMV on bulk-copy rings, INT8 and bf16: GPU tests, memcheck, eight ring shapes
#     against the Triton one-token kernel (tma_gemv_probe), W1 with GEMMA_CUDA_GEMV=1 against 0.
#   OUT=/some/dir bash bench/gpu_next.sh 23 / 24    (seventeenth run, ~3 minutes each)
#     the same INT8 GEMV with float16-pair products and with none (the stream alone); 24: ring shapes
#     small enough for the next kernel's block to sit beside. All slower than Triton on W1.
#   OUT=/some/dir bash bench/gpu_next.sh 6     (~8 minutes)
#     the whole GPU suite, then W2 with the default (1024-key) decode nodes against 512, one engine
#     per run (the thirteenth run's A/B: 15,988 against 15,854 tok/s).
#   OUT=/some/dir bash bench/gpu_next.sh 2     (~5 minutes)
#     W1, W2 and W3, bf16 and INT8, in one engine_bench run, W2 three times per engine; then the
#     linear layers at 1-4 tokens with INT8's 2048-wide K steps on and off (quant_bench).
#
#   1: the whole suite and the decode attention's tiles (twelfth run, on 27ee770)
#   4: the 2048-wide INT8 K steps: tests, INT8 one-token tile sweep, W1 A/B (twelfth run)
#   5: the final code's INT8 GPU tests and W1 (twelfth run)
#   7: INT8 one-token kernel with 3-5 weight tiles in flight (GEMMA_GEMV_PREFETCH_TILES): tests, a
#      per-projection sweep, W1 A/B (thirteenth run: slower than 2, dropped)
#   8: the final code's INT8/FP8 GPU tests, the 1-4-token layers, W1 and an INT8 step profile
#      (thirteenth run)
#   15, 16 (fifteenth run, on branches gemv-early-tiles and pdl-trigger-first): 1-4 weight tiles
#      read before the PDL wait (GEMMA_GEMV_EARLY_TILES), and every kernel letting the next be
#      scheduled before its own wait (GEMMA_PDL_TRIGGER_FIRST): both slower on W1, not merged
#   18, 19 (fifteenth run, on branch gemv-early-read-per-shape): one projection at a time waiting
#      before its first weight tile (GEMMA_GEMV_LATE_SHAPES), and down alone reading 2-4 tiles early
#      (GEMMA_GEMV_EARLY_TILES_SHAPES): every projection gains from its one early tile, none from more
#   20 (fifteenth run, on branch norm-lead): the residual add + norm run by program 0 of the
#      projection after it, the other programs waiting on a flag (GEMMA_NORM_LEAD): W1 17% slower
#   9, 10 (fourteenth run, on branch gemv-splits): K splits added by the kernel after the GEMV
#      (GEMMA_GEMV_SPLITS): 1-2% slower on W1, removed
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

few_token_layers() {  # the four projections of the 34 layers at 1-4 tokens, bf16 / INT8 / FP8
    timeout 60 python3 -m gemma_serve.bench.quant_bench --batch 1,2,3,4 --methods bf16,int8,fp8 \
        --out "$OUT/few-token-final.json" > "$OUT/few-token-final.log" 2>&1
    grep -E "^(bf16|int8|fp8) " "$OUT/few-token-final.log"
}

w1_final() {  # W1, bf16 and INT8, on the code as it is
    timeout 70 python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization none,int8 \
        --out "$OUT/w1-final.json" > "$OUT/w1-final.log" 2>&1
    grep -h '^W1' "$OUT/w1-final.log"
}

int8_ring_probe() {  # label, tests (-k), probe timeout, maths, ring shapes: the INT8 ring GEMV, then W1 INT8 A B A B
    local label=$1 tests=$2 limit=$3 maths=$4 variants=$5 shape math
    export PYTHONPATH=packages:.
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_one_token_gemv.py -k "$tests" \
        > "$OUT/gpu-tests-$label.log" 2>&1
    tail -2 "$OUT/gpu-tests-$label.log"
    timeout "$limit" python3 bench/tma_gemv_probe.py --methods int8 --maths "$maths" --variants "$variants" \
        --out "$OUT/tma-gemv-$label.json" > "$OUT/tma-gemv-$label.log" 2>&1
    tail -20 "$OUT/tma-gemv-$label.log"
    read -r shape math <<< "$(sed -n 's/^best int8 //p' "$OUT/tma-gemv-$label.log")"
    for flag in 1 0 1 0; do
        GEMMA_CUDA_GEMV=$flag GEMMA_CUDA_GEMV_SHAPE=${shape:-8,2,5120,2} GEMMA_CUDA_GEMV_MATH=${math:-half2} timeout 70 \
            python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization int8 \
            --out "$OUT/w1-int8-$label-cuda-gemv$flag.json" 2>&1 | grep -h '^W1' | sed "s/^/GEMMA_CUDA_GEMV=$flag $shape $math /"
    done | tee "$OUT/w1-$label.log"
}

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
    # The linear layers at 1-4 tokens with 8-bit weights on 2048-wide K steps (the default since the
    # twelfth run) and on 1024-wide ones: the 2-4-token speed was not measured with the wide steps.
    for w in 8 0; do
        GEMMA_GEMV_WIDE_K=$w timeout 60 python3 -m gemma_serve.bench.quant_bench --batch 1,2,3,4 --methods bf16,int8 \
            --out "$OUT/few-token-wide-k$w.json" > "$OUT/few-token-wide-k$w.log" 2>&1
        echo "GEMMA_GEMV_WIDE_K=$w"; grep -E "^(bf16|int8) " "$OUT/few-token-wide-k$w.log"
    done
    ;;
4)
    # The one-token kernel with 2048-wide K steps where 2048 divides K (o, down; GEMMA_GEMV_WIDE_K =
    # warps): the INT8 GPU tests on it, the INT8 one-token tile sweep (half2), then W1 bf16 + INT8
    # with it off / on 8 warps / on 4 warps, A B C B A. (On main the setting covers 8-bit weights only;
    # in the twelfth run's A/B it reached 16-bit weights too, through `one_token_config`.)
    GEMMA_GEMV_WIDE_K=8 timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quantization.py \
        > "$OUT/gpu-tests-wide-k8.log" 2>&1
    tail -2 "$OUT/gpu-tests-wide-k8.log"
    timeout 120 python3 -m gemma_serve.bench.quant_bench --int8-gemv --int8-widenings half2 \
        --out "$OUT/int8-gemv.json" > "$OUT/int8-gemv.log" 2>&1
    grep "int8 one token" "$OUT/int8-gemv.log"
    for w in 0 8 4 8 0; do
        GEMMA_GEMV_WIDE_K=$w timeout 60 python3 -m gemma_serve.bench.engine_bench --workloads W1 \
            --quantization none,int8 --out "$OUT/w1-wide-k$w-$SECONDS.json" > "$OUT/w1-wide-k$w-$SECONDS.log" 2>&1
        echo "wide_k=$w: $(ls -t "$OUT"/w1-wide-k$w-*.log | head -1 | xargs grep -h '^W1' | awk '{print $5, $6}' | tr '\n' ' ')"
    done
    ;;
5)
    # The INT8 GPU tests and W1 with 2048-wide K steps for 8-bit weights by default (GEMMA_GEMV_WIDE_K=8).
    timeout 170 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quantization.py > "$OUT/gpu-tests-quant.log" 2>&1
    tail -2 "$OUT/gpu-tests-quant.log"
    timeout 70 python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization none,int8 \
        --out "$OUT/w1-final.json" > "$OUT/w1-final.log" 2>&1
    grep -v -i warn "$OUT/w1-final.log" | tail -4
    ;;
6)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
    tail -3 "$OUT/gpu-tests.log"
    timeout 270 python3 -m gemma_serve.bench.w2_variants --fresh-engines --repeats 2 \
        --variants "base;node_len=512" --out "$OUT/w2-node-len.json" > "$OUT/w2-node-len.log" 2>&1
    grep -v -i warn "$OUT/w2-node-len.log" | tail -8
    ;;
7)
    # Several INT8 weight tiles in flight per program of the one-token kernel (GEMMA_GEMV_PREFETCH_TILES,
    # written after the twelfth run's device time ran out): its GPU tests, each projection with 1-5
    # tiles in flight, then W1 INT8 with 2 (the default) and 5 tiles, for qkv only or for o and down
    # too, A B C B A (16-bit weights never take this loop).
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quantization.py -k "several_tiles" \
        > "$OUT/gpu-tests-prefetch-tiles.log" 2>&1
    tail -2 "$OUT/gpu-tests-prefetch-tiles.log"
    timeout 90 python3 -m gemma_serve.bench.quant_bench --prefetch-tiles --out "$OUT/prefetch-tiles.json" \
        > "$OUT/prefetch-tiles.log" 2>&1
    grep "int8 one token" "$OUT/prefetch-tiles.log"
    # tiles:programs-per-SM threshold (8 takes o's and down's 640 programs in too).
    # One log for all runs: the device returns at most 8 files.
    for v in 2:4 5:4 5:8 5:4 2:4; do
        t=${v%:*}; p=${v#*:}
        echo "== GEMMA_GEMV_PREFETCH_TILES=$t GEMMA_GEMV_PREFETCH_PER_SM=$p" >> "$OUT/w1-tiles.log"
        GEMMA_GEMV_PREFETCH_TILES=$t GEMMA_GEMV_PREFETCH_PER_SM=$p timeout 60 python3 -m gemma_serve.bench.engine_bench \
            --workloads W1 --quantization int8 > "$OUT/w1-run.log" 2>&1
        grep -v -i warn "$OUT/w1-run.log" >> "$OUT/w1-tiles.log"
        echo "tiles=$t per_sm=$p: $(grep -h '^W1' "$OUT/w1-run.log" | awk '{print $5, $6}')"
    done
    rm -f "$OUT/w1-run.log"
    ;;
8)
    # Thirteenth run's last call, on its final code (1024-key decode nodes; FP8 back on 1024-wide K
    # steps): the INT8/FP8 GPU tests, the 1-4-token layers, W1, and where an INT8 W1 step's time goes.
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quantization.py > "$OUT/gpu-tests-quant.log" 2>&1
    tail -2 "$OUT/gpu-tests-quant.log"
    few_token_layers
    w1_final
    timeout 120 python3 -m gemma_serve.bench.step_profile --decode-only --decode 1:128:64 --quantization int8 \
        --out "$OUT/int8-profile" > "$OUT/int8-profile.log" 2>&1
    tail -30 "$OUT/int8-profile.log"
    tar -C "$OUT" -czf "$OUT/int8-profile.tgz" int8-profile && rm -rf "$OUT/int8-profile"  # one file back
    ;;
11)
    # Every unsplit one-token tile per projection (bf16, INT8), then W1 with the engine's tiles (A)
    # against the fastest ones (B, bench/tile_override.py), A B A B in one log.
    timeout 240 python3 -m gemma_serve.bench.quant_bench --one-token-tiles --out "$OUT/one-token-tiles.json" \
        > "$OUT/one-token-tiles.log" 2>&1
    grep "one token" "$OUT/one-token-tiles.log"
    for v in A B A B; do
        echo "== $v" >> "$OUT/w1-tiles.log"
        if [ "$v" = A ]; then
            timeout 80 python3 -m gemma_serve.bench.engine_bench --workloads W1 --quantization none,int8 > "$OUT/w1-run.log" 2>&1
        else
            timeout 80 python3 bench/tile_override.py --tiles "$OUT/one-token-tiles.json" -- --workloads W1 \
                --quantization none,int8 > "$OUT/w1-run.log" 2>&1
        fi
        grep -v -i warn "$OUT/w1-run.log" >> "$OUT/w1-tiles.log"
        echo "$v: $(grep -h '^tile override' "$OUT/w1-run.log" | tr '\n' ';') $(grep -h '^W1' "$OUT/w1-run.log" | awk '{print $5, $6}' | tr '\n' ' ')"
    done
    rm -f "$OUT/w1-run.log"
    ;;
12)
    timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
    tail -3 "$OUT/gpu-tests.log"
    few_token_layers
    w1_final
    ;;
13)
    # Which INT8 tile change costs the 2-4-token layers (fourteenth run: +4-6% there, -2.4% at one):
    # the 1-4-token layers, then W1 INT8, with the new o and gate_up tiles, either one back on its
    # old tile, or both (bench/tile_override.py).
    declare -A tiles=([new]="" [old-o]="--tile int8:2560x2048=4x2048w8s2" [old-gu]="--tile int8:20480x2560=8x512w4s2"
                      [old]="--tile int8:2560x2048=4x2048w8s2 --tile int8:20480x2560=8x512w4s2")
    for v in new old-o old-gu old; do
        timeout 60 python3 bench/tile_override.py ${tiles[$v]} --tool quant -- --batch 1,2,3,4 --methods int8 \
            > "$OUT/run.log" 2>&1
        echo "== $v" >> "$OUT/few-token-tiles.log"; cat "$OUT/run.log" >> "$OUT/few-token-tiles.log"
        echo "$v: $(grep -E '^int8 ' "$OUT/run.log" | awk '{print $3}' | tr '\n' ' ')"
    done
    for v in new old-o old-gu old old old-gu old-o new; do
        timeout 60 python3 bench/tile_override.py ${tiles[$v]} -- --workloads W1 --quantization int8 > "$OUT/run.log" 2>&1
        echo "== $v" >> "$OUT/w1-int8-tiles.log"; grep -v -i warn "$OUT/run.log" >> "$OUT/w1-int8-tiles.log"
        echo "W1 $v: $(grep -h '^W1' "$OUT/run.log" | awk '{print $5, $6}')"
    done
    rm -f "$OUT/run.log"
    ;;
14)
    # The fourteenth run's final code (bf16 tiles per shape, INT8 tiles as before): W1, then the
    # kernel and engine tests on those tiles.
    w1_final
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quantization.py \
        -k "kernel_matches or one_token_linear or few_token or engine_logits or gelu" > "$OUT/gpu-tests-final.log" 2>&1
    tail -2 "$OUT/gpu-tests-final.log"
    ;;
17)
    # The fifteenth run's refresh of the README table on the final code: W1, W2 (three runs per
    # engine) and W3, bf16 and INT8, in one engine_bench run; then where a bf16 W1 step's time goes
    # (batch 1 at W1's mean context, 384 keys).
    timeout 450 python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 --quantization none,int8 \
        --w2-repeats 3 --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
    grep -v -i warn "$OUT/engine.log" | tail -24
    timeout 120 python3 -m gemma_serve.bench.step_profile --decode-only --decode 1:384:64 \
        --out "$OUT/bf16-profile" > "$OUT/bf16-profile.log" 2>&1
    tail -16 "$OUT/bf16-profile.log"
    tar -C "$OUT" -czf "$OUT/bf16-profile.tgz" bf16-profile && rm -rf "$OUT/bf16-profile"  # one file back
    ;;
21)
    # The sixteenth run's batch-1 megakernel (engine/csrc/decode_megakernel.cu): its GPU tests, the
    # probe (check, timing at three contexts, one traced launch, the switches that take each part
    # out), compute-sanitizer on a small check, and the engine's W1 bf16 in the same call.
    export PYTHONPATH=packages:.
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_decode_megakernel.py > "$OUT/gpu-tests.log" 2>&1
    tail -1 "$OUT/gpu-tests.log"
    timeout 240 python3 bench/megakernel_probe.py --variants "base;SKIP_ATTENTION=1;NO_GRID_BARRIER=1,SKIP_ATTENTION=1;STREAM_ONLY=1,NO_GRID_BARRIER=1,SKIP_ATTENTION=1" \
        --out "$OUT/megakernel.json" > "$OUT/megakernel.log" 2>&1
    grep -v "^check 6" "$OUT/megakernel.log" | tail -14
    timeout 100 compute-sanitizer --tool memcheck --print-limit 3 python3 bench/megakernel_probe.py --quick base \
        > "$OUT/sanitizer.log" 2>&1
    grep "ERROR SUMMARY" "$OUT/sanitizer.log"
    w1_final
    ;;
22)
    # The one-token GEMV on bulk-copy rings (engine/csrc/one_token_gemv.cu), INT8 and bf16 weights,
    # whole rows a chunk (seventeenth run): its GPU tests and a memcheck of its odd shapes, then
    # bench/tma_gemv_probe.py against the engine's Triton one-token kernel (34 layers' projections in a
    # CUDA graph, and each projection alone) for eight ring shapes, then W1 with the engine's one-token
    # projections on the fastest shape (GEMMA_CUDA_GEMV=1) against Triton, A B A B, INT8 then bf16.
    export PYTHONPATH=packages:.
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_one_token_gemv.py > "$OUT/gpu-tests-gemv.log" 2>&1
    tail -3 "$OUT/gpu-tests-gemv.log"
    timeout 120 compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider -x \
        tests/gpu/test_one_token_gemv.py -k "odd or gelu or 1024" >> "$OUT/gpu-tests-gemv.log" 2>&1
    grep -h "ERROR SUMMARY\|passed\|failed" "$OUT/gpu-tests-gemv.log" | tail -3
    timeout 240 python3 bench/tma_gemv_probe.py --out "$OUT/tma-gemv.json" > "$OUT/tma-gemv.log" 2>&1
    grep -v "^\[" "$OUT/tma-gemv.log" | tail -4; grep "^\[" "$OUT/tma-gemv.log"
    for method in int8 bf16; do
        shape=$(sed -n "s/^best $method //p" "$OUT/tma-gemv.log")
        quantization=$([ "$method" = bf16 ] && echo none || echo int8)
        for flag in 1 0 1 0; do
            GEMMA_CUDA_GEMV=$flag GEMMA_CUDA_GEMV_SHAPE=${shape:-16,2,5120,1} timeout 70 python3 -m gemma_serve.bench.engine_bench \
                --workloads W1 --quantization $quantization --out "$OUT/w1-$method-cuda-gemv$flag.json" 2>&1 \
                | grep -h '^W1' | sed "s/^/GEMMA_CUDA_GEMV=$flag shape=$shape /"
        done
    done | tee "$OUT/w1-cuda-gemv.log"
    ;;
23)
    # Seventeenth run, second look at the INT8 ring GEMV: its INT8 products in float16 pairs (half2,
    # as the Triton path), and with no products at all (the weight stream alone), against exact, on
    # the three fastest ring shapes of case 22; then W1 INT8 on the fastest, A B A B.
    int8_ring_probe half2 half2 240 exact,half2,none "8,2,5120,2,1;16,2,5120,1,1;16,2,6144,1,1"
    ;;
24)
    # Seventeenth run, third look: ring shapes of <= 114 KB a block, with all of L1 as shared memory,
    # so that the next kernel's block fits beside this one's and asks for its weights while this one
    # streams; INT8 products exact, half2 and none; then W1 INT8 on the fastest, A B A B.
    int8_ring_probe coresident "half2 or switch" 300 half2,none,exact \
        "8,2,5120,1,1;4,2,10240,1,1;16,1,5120,1,1;8,2,4096,1,1;8,2,5120,2,1"
    ;;
*)
    echo "usage: OUT=dir bash bench/gpu_next.sh 1 | 2 | 4 | 5 | 6 | 7 | 8 | 11 | 12 | 13 | 14 | 17 | 21 | 22 | 23 | 24" >&2
    exit 2
    ;;
esac
