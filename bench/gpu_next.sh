#!/usr/bin/env bash
# The first GPU call of the next session: the whole GPU suite on the ninth run's final code (eager
# steps overlapped, the wider warm-up, the frozen collector: only parts of the suite ran on it), then
# the full engine benchmark, bf16 and INT8 (INT8 did not run with the frozen collector).
# At most ~10 minutes on an H200 (the engine run took ~2.5 min in the ninth run). Writes 3 files
# under $OUT (default bench-out/). The ninth run's first call (the two-tiles test, the full run on
# 0cd1aa2) is in git history under this name.
#
#   OUT=/some/dir bash bench/gpu_next.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=packages

timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 260 python3 -m gemma_serve.bench.engine_bench --workloads W1,W2,W3 --quantization none,int8 \
    --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
grep -vi warn "$OUT/engine.log" | tail -16
