#!/usr/bin/env bash
# On a GPU: pick the fastest formulation of the one-token decode attention at each benchmark shape
# (experiments/gpu_attention_microbench.py), then time the compiled streaming step with it next to transformers'
# compiled StaticCache step, mit, kvpress and recompute (Llama-2-7B shape at 4096, SmolLM2-135M shape at 1024).
# OUTPUT_DIR (default results/latency), PYTHON (default python), TAG_PREFIX (default gpu), DEVICE (default cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-results/latency}; PYTHON=${PYTHON:-python}; TAG=${TAG_PREFIX:-gpu}; DEVICE=${DEVICE:-cuda}
MICRO="$OUTPUT_DIR/${TAG}_attention_microbench.json"
"$PYTHON" experiments/gpu_attention_microbench.py --device "$DEVICE" --output "$MICRO"
best() { "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['shapes'][sys.argv[2]]['best'])" "$MICRO" "$1"; }
BEST_7B=$(best llama-2-7b@4096); BEST_SMOL=$(best smollm2-135m@1024)
echo "$(date +%T) decode attention: llama-2-7b $BEST_7B, smollm2-135m $BEST_SMOL" >&2
BENCH=("$PYTHON" -m streaming_llm.cli bench --device "$DEVICE" --dtype bfloat16 --quiet --output-dir "$OUTPUT_DIR")
"${BENCH[@]}" --shape llama-2-7b --cache-sizes 4096 --decode-attention "$BEST_7B" --rounds 3 --steps 10 \
  --methods dense_static_compiled,streaming_compiled,mit,kvpress_decode,recompute --tag "${TAG}_llama-2-7b_bf16_compiled"
echo "$(date +%T) smollm2" >&2
"${BENCH[@]}" --shape smollm2-135m --cache-sizes 1024 --decode-attention "$BEST_SMOL" --rounds 3 --steps 20 \
  --methods dense_static_compiled,streaming_compiled --tag "${TAG}_smollm2-135m_bf16_compiled"
