# Sourced by every experiment script (not run on its own). It
# - makes the folders and files a caller names (OUTPUT_DIR, OUTPUT_ROOT, a DATA file) absolute against the caller's
#   folder, before the script moves to the repository root, where the defaults (results/...) are meant;
# - picks the Python that has the package: $PYTHON if given, else the repository's .venv, else `python`; the CLI
#   runs as "$PYTHON" -m streaming_llm.cli, so no virtual environment needs activating.
CALLER_DIR=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
from_caller() {  # from_caller NAME...: each variable that is set and holds a relative path is made absolute
  local name value
  for name in "$@"; do
    value=${!name:-}
    if [[ -n "$value" && "$value" != /* ]]; then
      if [[ "$name" != DATA || -e "$CALLER_DIR/$value" ]]; then  # DATA may also be a `datasets` spec
        printf -v "$name" '%s' "$CALLER_DIR/$value"
      fi
    fi
  done
}
from_caller OUTPUT_DIR OUTPUT_ROOT DATA
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
CLI=("$PYTHON" -m streaming_llm.cli)
