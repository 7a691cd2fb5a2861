#!/usr/bin/env bash
# Every method on one long stream of the embedded text with the embedded model (the committed result).
#
#   NUM_TOKENS       stream length (default 20480)
#   DECODE_TOKENS    prefix scored by the decode-loop-only kvpress methods (default 2048)
#   RECOMPUTE_SAMPLES steps at which the recompute oracle is run (default 32, spread over the stream)
#   DATA             text source (default: embedded text; not - : two commands read it); OUTPUT_DIR (default
#                    results/comprehensive)
#   EXTRA_ARGS       passed on to `streaming-llm eval` and run_decode_perplexity.py: options both take (--force, --quiet,
#                    --model, --dtype, --device, --threads)
#   PYTHON           the Python with the package (default: the repository's .venv); relative paths are the caller's
#
# Each method's result is written as soon as it finishes; a finished configuration is skipped when the
# script runs again, so an interrupted run resumes at the next method.
set -euo pipefail
source "$(dirname "$0")/common.sh"
NUM_TOKENS=${NUM_TOKENS:-20480}
positive_int NUM_TOKENS "$NUM_TOKENS"
DECODE_TOKENS=${DECODE_TOKENS:-$(( NUM_TOKENS < 2048 ? NUM_TOKENS : 2048 ))}  # a prefix: at most the stream
RECOMPUTE_SAMPLES=${RECOMPUTE_SAMPLES:-32}
positive_int DECODE_TOKENS "$DECODE_TOKENS"
positive_int RECOMPUTE_SAMPLES "$RECOMPUTE_SAMPLES"
OUTPUT_DIR=${OUTPUT_DIR:-results/comprehensive}
# Two commands read DATA: standard input would reach the first whole and the second empty.
[[ "${DATA:-}" != - ]] || fail "DATA=- (standard input) is read by two commands here (eval, then run_decode_perplexity.py): save the text to a file and give DATA=that file"
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data "$DATA"); fi

# One torch thread: on a shared machine, several threads spin while they wait for each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The exact methods on the whole stream (blocks of 256), recompute at sampled steps, kvpress's decode loop on a prefix.
"${CLI[@]}" eval --num-tokens "$NUM_TOKENS" --n-sink 4 --window-size 1020 --block-size 256 \
  --recompute-samples "$RECOMPUTE_SAMPLES" --decode-tokens "$DECODE_TOKENS" \
  --methods streaming_pos_shift,dense,window,streaming_absolute,mit,streaming_rerotate,recompute,kvpress_decode_corrected,kvpress_decode_shipped \
  --output-dir "$OUTPUT_DIR" "${DATA_ARGS[@]}" ${EXTRA_ARGS:-}
# Decode loop vs the parallel evaluator on a 4,096-token prefix.
"$PYTHON" experiments/run_decode_perplexity.py --num-tokens "$(( NUM_TOKENS < 4096 ? NUM_TOKENS : 4096 ))" \
  --methods streaming_pos_shift --output-dir "$OUTPUT_DIR" "${DATA_ARGS[@]}" ${EXTRA_ARGS:-}
# Summary table (docs/evaluation.md) and figure, of this run's model, text and dtype: the folder may hold others'
# (results/comprehensive holds SmolLM2's float32 results on the embedded text; the summary refuses a folder of several
# unless told which). summarize_results.py takes --model as eval does (a path or hub id names the model by its last part).
MODEL=SmolLM2-135M-Instruct  # eval's default, the embedded model (streaming_llm.loading.EMBEDDED_MODEL)
DTYPE_ARGS=()
read -ra extra <<< "${EXTRA_ARGS:-}"
for i in "${!extra[@]}"; do
  case "${extra[$i]}" in
    --model=*) MODEL=${extra[$i]#--model=} ;;
    --model) MODEL=${extra[$((i + 1))]:-} ;;
    --dtype=*) DTYPE_ARGS=(--dtype "${extra[$i]#--dtype=}") ;;
    --dtype) DTYPE_ARGS=(--dtype "${extra[$((i + 1))]:-}") ;;
  esac
done
# eval's default text is the embedded one (streaming_llm.data.EMBEDDED_NAME)
"$PYTHON" experiments/summarize_results.py --num-tokens "$NUM_TOKENS" --output-dir "$OUTPUT_DIR" --model "$MODEL" \
  --data "${DATA:-shakespeare}" "${DTYPE_ARGS[@]}"
