# Sourced by every experiment script (not run on its own). It
# - makes the folders and files a caller names (OUTPUT_DIR, OUTPUT_ROOT, a DATA file) absolute against the caller's
#   folder (a leading ~ against $HOME), before the script moves to the repository root, where the defaults (results/...) are meant;
# - picks the Python that has the package: $PYTHON if given, else the repository's .venv, else `python`; the CLI
#   runs as "$PYTHON" -m streaming_llm.cli, so no virtual environment needs activating;
# - offers `fail`, `positive_int` and `writable_folder`, which refuse a bad variable in one line before anything runs.
CALLER_DIR=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
from_caller() {  # from_caller NAME...: each variable that is set and holds a relative path is made absolute
  local name value
  for name in "$@"; do
    value=${!name:-}
    if [[ "$value" == "~" || "$value" == "~/"* ]]; then  # quoted (OUTPUT_DIR="~/runs"), so no shell expanded it
      value=$HOME${value:1}
      printf -v "$name" '%s' "$value"
    fi
    if [[ -n "$value" && "$value" != /* ]]; then
      if [[ "$name" != DATA || -e "$CALLER_DIR/$value" ]]; then  # DATA may also be a `datasets` spec
        printf -v "$name" '%s' "$CALLER_DIR/$value"
      fi
    fi
  done
}
fail() {  # fail MESSAGE: the scripts' one-line error (as the Python scripts': "<script>: error: ..."), exit status 2
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}
positive_int() {  # positive_int NAME VALUE: fail unless VALUE, the value of variable NAME, is an integer >= 1. Check before
  # any $(( )) on it: bash arithmetic evaluates a name or an a[$(command)] that a variable holds
  [[ "$2" =~ ^[1-9][0-9]{0,17}$ ]] || fail "$1 must be a positive integer (digits only), got '$2'"
}
writable_folder() {  # writable_folder NAME: fail unless the folder variable NAME holds is one, or can be made (no file
  # in its way), for a script that writes it itself only after its long run
  local path=${!1} probe
  [[ -n "$path" ]] || fail "$1 is empty: give a folder"
  probe=$path
  while [[ ! -e "$probe" ]]; do probe=$(dirname "$probe"); done
  [[ -d "$probe" ]] || fail "$1 $path: $probe is a file, not a folder"
  [[ -w "$probe" ]] || fail "$1 $path: $probe is not writable"
}
from_caller OUTPUT_DIR OUTPUT_ROOT DATA
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
CLI=("$PYTHON" -m streaming_llm.cli)
