#!/usr/bin/env bash
# The engine core in its own process against on a thread, and both against the offline engine, on
# one workload in one call (issue 15): bench_throughput offline, then for each server mode
# bench_serving at request rate inf (1024/128 x 500 by default) and at rates 1, 4, 16 (TTFT, ITL),
# with GET /health probes every 0.1 s. Results (JSON and logs) go to $RESULTS (default: $OUT, else
# ./bench-engine-process).
#
#   scripts/bench_engine_process.sh                    # Llama-3.1-8B dummy bf16, the GPU plan
#   ENGINE_FLAGS="--dtype float32 --max-num-seqs 16 --max-num-batched-tokens 512" INPUT_LEN=128 \
#       OUTPUT_LEN=64 NUM_PROMPTS=64 RATES="" scripts/bench_engine_process.sh   # SmolLM2 on a CPU
# Needs what the server needs (starlette, uvicorn, pydantic, pyzmq, msgspec, httpx) beside JAX.
set -euo pipefail
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:-bench-engine-process}}
ENGINE_FLAGS=${ENGINE_FLAGS:---model llama-3.1-8b --load-format dummy --dtype bfloat16 --max-num-seqs 256 --max-num-batched-tokens 2048 --max-model-len 4096 --row-bucket-growth 0}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-128}
NUM_PROMPTS=${NUM_PROMPTS:-500}
RATES=${RATES:-"1:16 4:40 16:100"}  # rate:prompts
PORT=${PORT:-8011}
MODES=${MODES:-"offline process thread"}  # a subset splits the work over several calls
CLIENT_FLAGS=${CLIENT_FLAGS:-}  # more bench_serving flags, e.g. "--tokenizer FOLDER" for a preset without one
mkdir -p "$RESULTS"

offline() {
    # shellcheck disable=SC2086
    $PYTHON scripts/bench_throughput.py $ENGINE_FLAGS --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$NUM_PROMPTS" --output-json "$RESULTS/offline.json" | tee "$RESULTS/offline.txt"
}

serve_and_bench() {  # $1: process | thread
    local mode=$1 flag=--no-engine-in-process
    [ "$mode" = thread ] && flag=--engine-in-process
    # shellcheck disable=SC2086
    $PYTHON -m jaxserve serve $ENGINE_FLAGS --port "$PORT" $flag --uvicorn-log-level warning \
        >"$RESULTS/server-$mode.log" 2>&1 &
    local server=$!
    until $PYTHON -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$PORT/health" 2>/dev/null; do
        kill -0 $server 2>/dev/null || { tail -50 "$RESULTS/server-$mode.log"; return 1; }
        sleep 1
    done
    local common=(--base-url "http://127.0.0.1:$PORT" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
        --ignore-eos --probe-interval 0.1 --disable-tqdm --percentile-metrics ttft,tpot,itl,e2el
        --metric-percentiles 50,99 --save-result --result-dir "$RESULTS")
    # shellcheck disable=SC2206
    common+=($CLIENT_FLAGS)
    $PYTHON scripts/bench_serving.py "${common[@]}" --num-prompts "$NUM_PROMPTS" --request-rate inf \
        --result-filename "serving-$mode-rate-inf.json" | tee "$RESULTS/serving-$mode-rate-inf.txt"
    for pair in $RATES; do
        $PYTHON scripts/bench_serving.py "${common[@]}" --num-prompts "${pair#*:}" --request-rate "${pair%:*}" \
            --result-filename "serving-$mode-rate-${pair%:*}.json" | tee "$RESULTS/serving-$mode-rate-${pair%:*}.txt"
    done
    kill -TERM $server
    wait $server || true
}

for mode in $MODES; do
    if [ "$mode" = offline ]; then offline; else serve_and_bench "$mode"; fi
done
grep -H "output tokens/s\|Output token throughput\|GET /health" "$RESULTS"/*.txt
