#!/usr/bin/env bash
# On a GPU: where the compiled decode step's time goes (experiments/gpu_step_breakdown.py) for the Llama-2-7B shape
# at 4096 and the SmolLM2-135M shape at 1024, after the attention microbenchmark. About 5 minutes on an H100.
# OUTPUT_DIR (default results/latency), PYTHON (default: the repository's .venv, else python), TAG_PREFIX (default gpu), DEVICE (default cuda).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-results/latency}; TAG=${TAG_PREFIX:-gpu}; DEVICE=${DEVICE:-cuda}
"$PYTHON" experiments/gpu_attention_microbench.py --device "$DEVICE" --output "$OUTPUT_DIR/${TAG}_attention_microbench.json" >/dev/null
"$PYTHON" -c "import json, sys
for shape, r in json.load(open(sys.argv[1]))['shapes'].items():
    print(shape, 'best', r['best'], {v: round(x['us_per_layer'] or 0, 1) if 'us_per_layer' in x else x['error'][:40] for v, x in r['variants'].items()})" "$OUTPUT_DIR/${TAG}_attention_microbench.json"
echo "$(date +%T) llama-2-7b" >&2
"$PYTHON" experiments/gpu_step_breakdown.py --device "$DEVICE" --shape llama-2-7b --capacity 4096 \
  --decode-attention "${VARIANTS_7B:-grouped,expanded_masked,matmul}" --output "$OUTPUT_DIR/${TAG}_step_breakdown_llama-2-7b.json"
echo "$(date +%T) smollm2-135m" >&2
"$PYTHON" experiments/gpu_step_breakdown.py --device "$DEVICE" --shape smollm2-135m --capacity 1024 \
  --decode-attention "${VARIANTS_SMOL:-grouped,matmul}" --output "$OUTPUT_DIR/${TAG}_step_breakdown_smollm2-135m.json"
echo "$(date +%T) done" >&2
