#!/usr/bin/env bash
# Every evaluation experiment end to end, at small sizes by default (minutes on a laptop CPU); SCALE=full runs the
# sizes of the committed results (about an hour on 2 CPU cores). Outputs go to OUTPUT_ROOT (default: a temporary
# folder, so the committed results are not touched; OUTPUT_ROOT=results to regenerate them).
set -euo pipefail
source "$(dirname "$0")/common.sh"
case "${SCALE:-small}" in
  full) NUM_TOKENS=20480; DECODE_TOKENS=2048; PREFIX=4096; SAMPLES=32; CONTEXT=2048; CONTINUATION=256; CHUNK_TOKENS=2048 ;;
  small) NUM_TOKENS=3072; DECODE_TOKENS=1280; PREFIX=1536; SAMPLES=4; CONTEXT=1536; CONTINUATION=128; CHUNK_TOKENS=1536 ;;
  *) fail "SCALE must be small (the default) or full, got '$SCALE'" ;;
esac
OUTPUT_ROOT=${OUTPUT_ROOT:-$(mktemp -d -t streaming-llm-experiments.XXXX)}
echo "writing to $OUTPUT_ROOT" >&2
# 1. Every method on one stream, parallel evaluator where exact (the table and the figure).
"${CLI[@]}" eval --num-tokens "$NUM_TOKENS" --decode-tokens "$DECODE_TOKENS" --recompute-samples "$SAMPLES" \
  --methods all --output-dir "$OUTPUT_ROOT/comprehensive" --quiet
"$PYTHON" experiments/summarize_results.py --num-tokens "$NUM_TOKENS" --output-dir "$OUTPUT_ROOT/comprehensive"
# 2. Decode loop vs parallel evaluator on a prefix (same NLLs, speed ratio).
"$PYTHON" experiments/run_decode_perplexity.py --num-tokens "$PREFIX" --output-dir "$OUTPUT_ROOT/comprehensive" --quiet
# 3. kvpress decode loop next to ours, on the same text and cache as the other steps (the script's own DATA, N_SINK
# and WINDOW_SIZE, where set in the environment, reached this step only: one folder held two texts' results).
env -u DATA -u N_SINK -u WINDOW_SIZE NUM_TOKENS="$PREFIX" OUTPUT_DIR="$OUTPUT_ROOT/comprehensive" EXTRA_ARGS=--quiet \
  PYTHON="$PYTHON" bash experiments/run_kvpress_streaming_decode.sh
# 4. kvpress's prefill protocol and the rerotation comparison.
"$PYTHON" experiments/eval_kvpress.py --context-length "$CONTEXT" --continuation-length "$CONTINUATION" --output-dir "$OUTPUT_ROOT/kvpress"
# 5. Chunked evaluation and the strided sliding window against the decode loop.
"$PYTHON" experiments/eval_streaming_llm.py --num-tokens "$CHUNK_TOKENS" --output-dir "$OUTPUT_ROOT/comprehensive/chunked" --quiet
"${CLI[@]}" plot "$OUTPUT_ROOT/comprehensive" -o "$OUTPUT_ROOT/comprehensive/all_curves.png"
echo "done: $OUTPUT_ROOT" >&2
