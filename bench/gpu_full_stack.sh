#!/usr/bin/env bash
# Issue 5: the benchmark suite against the full stack (Truss server -> gRPC -> tritonserver -> portable
# engine) and against the same API code and engine without those layers (`serve --direct`, see
# packages/gemma_serve/direct.py), on Gemma 3 4B shapes with random weights, 128 in / 64 out and
# 512 in / 256 out, in ONE device call of at most 10 minutes, on a machine with no network:
#
#   bash bench/gpu_bundle.sh       # here, once: wheels and the saved truss server into .whl/ (carry it)
#   bash bench/gpu_full_stack.sh   # there: results into $OUT (default out/gpu-full-stack)
#
# Stages run in order of importance, each under `timeout` and inside one overall deadline that keeps
# time back for the stages after it, so a short call still returns the full stack's 128/64 sweep:
# full 128x64, full 512x256, direct 128x64, direct 512x256, then the overhead table (full / direct).
# $OUT gets: results.tgz (every run's JSON, summary.csv/.md, PNG plots, server logs), summary.md (all
# tables), overhead.csv and overhead.png.
#
# BENCH_PROFILE=cpu: the same path with the tiny model's layers (real vocabulary) and tiny sweeps, on
# a CPU in about a minute: a local check of everything but the GPU.
# Other knobs: BENCH_BUDGET_S (the whole script, default 560), BENCH_SWEEP (concurrency levels),
# BENCH_ROUNDS_SHORT / BENCH_ROUNDS_LONG (requests per level = rounds x concurrency, 128/64 and 512/256),
# BENCH_WORKLOADS (default "128x64 512x256"), BENCH_STACKS (default "full direct"), BENCH_PRICE_PER_HOUR,
# PYTHON (default python3).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)
PROFILE=${BENCH_PROFILE:-gpu}
BUDGET=${BENCH_BUDGET_S:-560}
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/out/gpu-full-stack}
WORK=$(mktemp -d /tmp/gpu-full-stack.XXXXXX)
RES=$WORK/results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
# Seconds a stage may take: its cap, or less so that $2 seconds stay for the stages after it; 0: skip it.
stage_time() {
    local t=$((T0 + BUDGET - $(date +%s) - $2))
    ((t > $1)) && t=$1
    ((t < 20)) && t=0
    echo "$t"
}

# --- 1. What the machine lacks: carried wheels (there is no package index there) ---------------------
if [ -d .whl ] && ! "$PY" -c 'import tritonclient.grpc, fastapi, uvicorn, pytriton' 2>/dev/null; then
    wheels=(.whl/*.whl)
    log "installing ${#wheels[@]} wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/packages${PYTHONPATH:+:$PYTHONPATH}
# No truss package there: the saved truss server stands in, and its requirements came as wheels.
if [ -z "${GEMMA_SERVE_TRUSS_SERVER:-}" ] && ! "$PY" -c 'import truss' 2>/dev/null; then
    export GEMMA_SERVE_TRUSS_SERVER=$ROOT/.whl/truss-server GEMMA_SERVE_SKIP_SERVER_REQUIREMENTS=1
fi

# --- 2. The model and the workloads -------------------------------------------------------------------
# Gemma 3 4B IT's published config with random weights; the tokenizer is the tiny model's, padded to the
# real vocabulary (gemma_serve/bench/shapes_checkpoint.py): Gemma's own is gated and cannot be fetched there.
CONFIG=bench/configs/gemma-3-4b-it
MODEL=$WORK/model
if [ "$PROFILE" = cpu ]; then
    # The same path with the tiny model's layers and the real vocabulary size, so it runs on a CPU.
    "$PY" -m gemma_serve make-tiny-model "$WORK/tiny" >/dev/null || exit 1
    CONFIG=$WORK/tiny-layers
    mkdir -p "$CONFIG"
    "$PY" - "$WORK/tiny/config.json" bench/configs/gemma-3-4b-it/config.json "$CONFIG/config.json" <<'EOF'
import json, sys
tiny, real = (json.load(open(p)) for p in sys.argv[1:3])
tiny["text_config"]["vocab_size"] = real["text_config"]["vocab_size"]
json.dump(tiny, open(sys.argv[3], "w"), indent=1)
EOF
    export GEMMA_SERVE_DEVICE=cpu
    SWEEP=${BENCH_SWEEP:-1,4}
    SHORT=(32 16) LONG=(64 32)
    STARTUP_CAP=240 STARTUP_RESERVE=90 SWEEP_CAP=90 SWEEP_MIN=40
    MONITOR=--no-gpu-monitor
else
    export GEMMA_SERVE_DEVICE=cuda
    SWEEP=${BENCH_SWEEP:-1,8,32,64,128}
    SHORT=(128 64) LONG=(512 256)
    STARTUP_CAP=300 STARTUP_RESERVE=150 SWEEP_CAP=150 SWEEP_MIN=75
    MONITOR=--gpu-monitor
fi
"$PY" -m gemma_serve.bench.shapes_checkpoint "$CONFIG" "$MODEL" >/dev/null || exit 1
export GEMMA_SERVE_LOAD_FORMAT=random
ROUNDS_SHORT=${BENCH_ROUNDS_SHORT:-4}
# Which workloads run (e.g. BENCH_WORKLOADS=512x256 for a second call when one call ran out of time).
WORKLOADS=${BENCH_WORKLOADS:-${SHORT[0]}x${SHORT[1]} ${LONG[0]}x${LONG[1]}}
ROUNDS_LONG=${BENCH_ROUNDS_LONG:-2}
PRICE=()
[ -n "${BENCH_PRICE_PER_HOUR:-}" ] && PRICE=(--price-per-hour "$BENCH_PRICE_PER_HOUR")
# Identical serving settings for both stacks; only `backend` differs (serve --direct sets inprocess).
export GEMMA_SERVE_MAX_MODEL_LEN=2048 GEMMA_SERVE_MAX_IMAGES_PER_REQUEST=0 \
    GEMMA_SERVE_SERVED_MODEL_NAME=gemma-3-4b-shapes GEMMA_SERVE_TRITON_GRPC_PORT=0 \
    GEMMA_SERVE_TRITON_HTTP_PORT=0 GEMMA_SERVE_TRITON_METRICS_PORT=0
"$PY" - >"$RES/environment.txt" 2>&1 <<'EOF'
import os, platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; python {platform.python_version()}; torch {torch.__version__}; transformers {transformers.__version__}")
print({k: v for k, v in sorted(os.environ.items()) if k.startswith(("GEMMA_SERVE_", "BENCH_"))})
EOF
log "$(head -1 "$RES/environment.txt")"

# --- 3. Serving and measuring -------------------------------------------------------------------------
SERVER_PID=
SERVER_PORT=

url_ok() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }

start_server() {  # NAME PORT [serve options]: start, wait until ready; 1 if it failed or ran out of time
    local name=$1 port=$2 t deadline
    shift 2
    t=$(stage_time "$STARTUP_CAP" "$SWEEP_MIN")
    ((t == 0)) && { log "skip $name: no time left"; return 1; }
    log "starting $name on :$port (at most ${t}s)"
    "$PY" -m gemma_serve serve --port "$port" --model "$MODEL" "$@" >"$RES/$name-server.log" 2>&1 &
    SERVER_PID=$! SERVER_PORT=$port
    deadline=$(($(date +%s) + t))
    while (($(date +%s) < deadline)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$name exited while starting; log tail:"
            tail -n 30 "$RES/$name-server.log"
            SERVER_PID=
            return 1
        fi
        if url_ok "http://127.0.0.1:$port/v1/models/model"; then
            log "$name ready"
            return 0
        fi
        sleep 1
    done
    log "$name not ready after ${t}s; log tail:"
    tail -n 30 "$RES/$name-server.log"
    stop_server
    return 1
}

stop_server() {  # SIGTERM (serve stops the Truss server and tritonserver, --direct the engine), then wait
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    # A tritonserver whose owner died keeps its GPU memory: stop it by the pid file dev_server keeps.
    "$PY" -c 'import sys; from pathlib import Path; from gemma_serve.triton.server import stop_recorded_server
stop_recorded_server(Path(sys.argv[1]))' "$ROOT/build/triton-$SERVER_PORT/tritonserver.pid" 2>/dev/null
    [ -f "$ROOT/build/triton-$SERVER_PORT/tritonserver.log" ] &&
        cp "$ROOT/build/triton-$SERVER_PORT/tritonserver.log" "$RES/tritonserver-$SERVER_PORT.log"
    SERVER_PID=
}
trap stop_server EXIT

bench() {  # NAME INPUT OUTPUT ROUNDS RESERVE [FIRST]: one sweep against the running server
    local name=$1 t
    [[ " $WORKLOADS " == *" $2x$3 "* ]] || return 0
    t=$(stage_time "$SWEEP_CAP" "$5")
    # The first sweep of the run matters most: it may eat into the reserve rather than not run.
    ((t == 0)) && [ -n "${6:-}" ] && t=$(stage_time "$SWEEP_MIN" 10)
    ((t == 0)) && { log "skip $name: no time left"; return 1; }
    log "sweep $name: concurrency $SWEEP, $2 in / $3 out (at most ${t}s)"
    timeout -s INT -k 10 "$t" "$PY" -m gemma_serve bench --base-url "http://127.0.0.1:$SERVER_PORT" \
        --endpoint chat --mode sweep --sweep "$SWEEP" --num-requests 4 --rounds "$4" --input-len "$2" \
        --output-len "$3" --ignore-eos --tokenizer "$MODEL" --model "$GEMMA_SERVE_SERVED_MODEL_NAME" \
        --no-progress "$MONITOR" "${PRICE[@]}" --out "$RES/$name" >"$RES/$name.log" 2>&1
    local rc=$? levels=0
    [ -f "$RES/$name/summary.csv" ] && levels=$(($(wc -l <"$RES/$name/summary.csv") - 1))
    log "sweep $name: exit $rc, $levels levels measured"
}

warm_up() {  # NAME: a few requests first (one-time costs), and one greedy answer kept to eyeball the text
    timeout 60 "$PY" -m gemma_serve bench --base-url "http://127.0.0.1:$SERVER_PORT" --endpoint chat \
        --mode concurrency --concurrency 4 --num-requests 8 --input-len "${SHORT[0]}" --output-len 8 \
        --ignore-eos --no-progress --no-gpu-monitor --no-plots --out "$WORK/warmup" >/dev/null 2>&1
    timeout 30 "$PY" - "http://127.0.0.1:$SERVER_PORT/v1/completions" >"$RES/$1-sample.json" 2>&1 <<'PYEOF'
import json, sys, urllib.request
body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
req = urllib.request.Request(sys.argv[1], json.dumps(body).encode(), {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=25).read().decode())
PYEOF
}

# Keep for the direct stack: its start and its 128/64 sweep.
STACKS=" ${BENCH_STACKS:-full direct} "
DIRECT_RESERVE=$((STARTUP_RESERVE + SWEEP_MIN + 30))
[[ $STACKS == *" direct "* ]] || DIRECT_RESERVE=0
if [[ $STACKS == *" full "* ]] && start_server full 8080; then
    warm_up full
    bench full-"${SHORT[0]}x${SHORT[1]}" "${SHORT[@]}" "$ROUNDS_SHORT" "$DIRECT_RESERVE" first
    bench full-"${LONG[0]}x${LONG[1]}" "${LONG[@]}" "$ROUNDS_LONG" "$DIRECT_RESERVE"
    stop_server
fi
if [[ $STACKS == *" direct "* ]] && start_server direct 8081 --direct; then
    warm_up direct
    bench direct-"${SHORT[0]}x${SHORT[1]}" "${SHORT[@]}" "$ROUNDS_SHORT" 15
    bench direct-"${LONG[0]}x${LONG[1]}" "${LONG[@]}" "$ROUNDS_LONG" 10
    stop_server
fi

# --- 4. Results ---------------------------------------------------------------------------------------
"$PY" -m gemma_serve.bench.overhead --out "$RES/overhead" \
    --pair "${SHORT[0]}x${SHORT[1]}" "$RES/full-${SHORT[0]}x${SHORT[1]}" "$RES/direct-${SHORT[0]}x${SHORT[1]}" \
    --pair "${LONG[0]}x${LONG[1]}" "$RES/full-${LONG[0]}x${LONG[1]}" "$RES/direct-${LONG[0]}x${LONG[1]}" \
    >/dev/null 2>"$RES/overhead.log"
{
    echo "# Full stack vs direct ($(head -1 "$RES/environment.txt"))"
    echo
    echo "## Overhead: full stack / direct, by concurrency"
    echo
    cat "$RES/overhead/overhead.md" 2>/dev/null
    printf '\n## One greedy completion from each (random weights: the text is gibberish)\n\n'
    for f in "$RES"/*-sample.json; do
        [ -f "$f" ] && printf -- '- %s: %s\n' "$(basename "$f" -sample.json)" "$(head -c 600 "$f")"
    done
    for d in "$RES"/full-*/ "$RES"/direct-*/; do
        [ -f "$d/summary.md" ] || continue
        printf '\n## %s\n\n' "$(basename "$d")"
        cat "$d/summary.md"
    done
} >"$OUT/summary.md"
cp "$RES/overhead/overhead.csv" "$RES/overhead/overhead.png" "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$WORK" results
cp "$RES/overhead/overhead.csv" "$WORK/overhead.csv" 2>/dev/null
rm -rf "$RES" "$MODEL" "$WORK/tiny" "$WORK/tiny-layers" "$WORK/warmup"
log "wrote $(find "$OUT" -maxdepth 1 -type f | wc -l) files to $OUT"
# The table that matters, compact: throughput and TTFT, full vs direct.
"$PY" - "$WORK/overhead.csv" <<'EOF'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no overhead table: a sweep is missing (see results.tgz)")
f = lambda v, d=0: "-" if v in ("", None) else f"{float(v):,.{d}f}"
print(f"{'workload':>9} {'conc':>5} {'full tok/s':>11} {'direct tok/s':>13} {'ratio':>6} "
      f"{'TTFT full':>10} {'TTFT direct':>12} {'ITL full':>9} {'ITL direct':>11}")
for r in rows:
    print(f"{r['workload']:>9} {r['concurrency']:>5} {f(r['full_output_throughput']):>11} "
          f"{f(r['direct_output_throughput']):>13} {f(r['ratio_output_throughput'], 2):>6} "
          f"{f(r['full_ttft_ms_mean']):>10} {f(r['direct_ttft_ms_mean']):>12} "
          f"{f(r['full_itl_ms_mean'], 1):>9} {f(r['direct_itl_ms_mean'], 1):>11}")
EOF
rm -rf "$WORK"
