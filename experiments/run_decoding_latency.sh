#!/usr/bin/env bash
# Per-token decode latency of every KV-cache method side by side (the seed's run_decoding_latency.sh, issue #4).
#   CPU (default): the embedded SmolLM2-135M, fp32, real weights, cache sizes 256..4096, plus a profile and a
#                  100,000-token stream (latency and memory along the way).
#   DEVICE=cuda:   random-weight shapes at the paper's scale in bf16: Llama-2-7B at 4096 and SmolLM2-135M at 1024
#                  (eager and CUDA-graph-compiled dense and streaming steps, mit, kvpress, recompute), a 100,000-token
#                  stream, and the fast path's fp32/bf16 check (experiments/check_fast_path.py).
# DEVICE (cpu, the default, or cuda / cuda:N), OUTPUT_DIR (default results/latency), PYTHON (default: the repository's
# .venv, else python), TAG_PREFIX (default cpu / gpu), METHODS (default: all on CUDA, on CPU bench's default: all but the
# compiled ones), STREAM_TOKENS (default 100000; 0 skips the stream); on CUDA also FAST_PATH_CHECK (default 1; 0 skips
# the fp32/bf16 check, ~1.5 min on an H100, when only the latency table is wanted).
set -euo pipefail
source "$(dirname "$0")/common.sh"
DEVICE=${DEVICE:-cpu}
[[ "$DEVICE" =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || fail "DEVICE must be cpu (the default), cuda or cuda:N, got '$DEVICE'"
OUTPUT_DIR=${OUTPUT_DIR:-results/latency}
BENCH=("$PYTHON" -m streaming_llm.cli bench --output-dir "$OUTPUT_DIR")
if [[ "$DEVICE" == cuda* ]]; then
  TAG=${TAG_PREFIX:-gpu}
  if [[ "${FAST_PATH_CHECK:-1}" != 0 ]]; then
    echo "$(date +%T) fast path check" >&2
    "$PYTHON" experiments/check_fast_path.py --device "$DEVICE" --output "$OUTPUT_DIR/${TAG}_fast_path_check.json"
  fi
  echo "$(date +%T) bench ${BIG_SHAPE:-llama-2-7b}" >&2
  "${BENCH[@]}" --device "$DEVICE" --dtype bfloat16 --shape "${BIG_SHAPE:-llama-2-7b}" --cache-sizes "${BIG_SIZES:-4096}" \
    --methods "${METHODS:-all}" --rounds 4 --steps 8 --quiet --tag "${TAG}_${BIG_SHAPE:-llama-2-7b}_bf16"
  echo "$(date +%T) bench smollm2-135m" >&2
  "${BENCH[@]}" --device "$DEVICE" --dtype bfloat16 --shape smollm2-135m --cache-sizes "${SMALL_SIZES:-1024}" \
    --methods "${METHODS:-all}" --rounds 4 --steps 20 --quiet --stream-tokens "${STREAM_TOKENS:-100000}" --tag "${TAG}_smollm2-135m_bf16"
else
  TAG=${TAG_PREFIX:-cpu}
  "${BENCH[@]}" --device cpu --shape embedded --cache-sizes "${SIZES:-256,512,1024,2048,4096}" --methods "${METHODS:-default}" \
    --rounds 2 --steps 3 --threads 1 --profile --stream-tokens "${STREAM_TOKENS:-100000}" --tag "${TAG}_embedded_fp32"
fi
