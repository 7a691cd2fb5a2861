#!/usr/bin/env bash
# The endless-generation table of docs/generation.md: `streaming-llm generate --ignore-eos` for LENGTHS new tokens
# (default 2000 and 100000) through a capacity of 4 + 1020, on a 2-layer random Llama with the embedded SmolLM2
# tokenizer and chat template (streaming_llm.bench.soak.save_tiny_chat_llama: the CLI's code path, ~25x faster
# than the embedded model, whose 100,000 tokens would take hours on a CPU). One JSON per length under OUTPUT_DIR
# (default results/generation): generate's --json record without the text, plus the command that produced it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-results/generation}
writable_folder OUTPUT_DIR  # (written after the generation: a file in the way failed there, with a traceback)
read -ra lengths <<< "${LENGTHS:-2000 100000}"
(( ${#lengths[@]} )) || fail "LENGTHS is empty: give one or more token counts, e.g. LENGTHS='2000 100000'"
for n in "${lengths[@]}"; do positive_int "each of LENGTHS" "$n"; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -c "import sys; from streaming_llm.bench.soak import save_tiny_chat_llama; save_tiny_chat_llama(sys.argv[1])" "$work/model"
for n in "${lengths[@]}"; do
  command=(generate --model "$work/model" --prompt "Tell me a story that never ends." --n-sink 4 --window-size 1020
           --ignore-eos --threads 1 --max-new-tokens "$n" --json --quiet)
  echo "$(date +%T) generate --max-new-tokens $n" >&2
  "$PYTHON" -m streaming_llm.cli "${command[@]}" > "$work/record.json"
  "$PYTHON" - "$work/record.json" "$OUTPUT_DIR/endless_tiny_${n}.json" "$(printf "%q " "${command[@]}")" <<'PY'
import json, sys
from streaming_llm.eval.results import git_commit, versions, write_json_atomically
record = json.load(open(sys.argv[1]))
record["text_head"] = record.pop("text")[:200]
record["model"] = "tiny random Llama (2 layers, hidden 64) with the SmolLM2-135M-Instruct tokenizer"
record.update(command="streaming-llm " + sys.argv[3].strip().replace(sys.argv[1].rsplit("/", 1)[0], "$TMP"),
              versions=versions(), git_commit=git_commit())
print(write_json_atomically(sys.argv[2], record))
PY
done
