#!/usr/bin/env bash
# kvpress's DecodingPress(StreamingLLMPress) in the decode loop, as shipped and corrected, next to ours.
#
#   DATA        text source: a .txt file, a datasets spec (pg19, wikitext:wikitext-2-raw-v1), or empty for the
#               embedded text (default)
#   NUM_TOKENS  stream length (default 2048); N_SINK (4), WINDOW_SIZE (1020); OUTPUT_DIR (results/comprehensive)
set -euo pipefail
source "$(dirname "$0")/common.sh"
NUM_TOKENS=${NUM_TOKENS:-2048}
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data "$DATA"); fi
"${CLI[@]}" eval --num-tokens "$NUM_TOKENS" --n-sink "${N_SINK:-4}" --window-size "${WINDOW_SIZE:-1020}" \
  --methods kvpress_decode_shipped,kvpress_decode_corrected,streaming_absolute,streaming_pos_shift \
  --output-dir "${OUTPUT_DIR:-results/comprehensive}" "${DATA_ARGS[@]}" ${EXTRA_ARGS:-}
