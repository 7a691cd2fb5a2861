"""What every `streaming-llm` subcommand shares: the common options, their early validation, and
loading the model + StreamingLLMWrapper they describe.

This module imports neither torch nor transformers at import time, so `streaming-llm --help` and
option errors are instant; the loaders import them when called.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

EMBEDDED_ALIAS = "embedded"
POSITION_MODES = ("pos_shift", "rerotate", "absolute")
STREAMING_MODES = ("ours", "mit")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEFAULT_N_SINK = 4
DEFAULT_WINDOW_SIZE = 1020
# More torch threads than cores only adds waiting; far more cannot even be started (100,000 crashed the process).
MAX_THREADS = 4 * (os.cpu_count() or 1)


def common_parent() -> argparse.ArgumentParser:
    """The parent parser holding the options of every subcommand (pass it as `parents=[...]`)."""
    parent = argparse.ArgumentParser(add_help=False)
    model = parent.add_argument_group("model and cache (common to every subcommand)")
    model.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help=(
            "the model: omit (or 'embedded') for the embedded SmolLM2-135M-Instruct (GGUF, no download); a Hugging "
            "Face hub id such as EleutherAI/pythia-70m (needs network or a local HF cache); a local model folder; "
            "or a .gguf file. Supported: RoPE decoder-only models of the Llama, Mistral, Qwen, Gemma, Phi, OLMo, "
            "Granite, Cohere, GLM, GPT-NeoX families and more (README, 'Supported models'; `info` names the model's "
            "type and refuses one it cannot stream)"
        ),
    )
    model.add_argument(
        "--n-sink",
        type=int,
        default=DEFAULT_N_SINK,
        metavar="N",
        help=f"attention sinks: the first N tokens of the stream, kept for ever (default {DEFAULT_N_SINK}; 0 = window attention)",
    )
    model.add_argument(
        "--window-size",
        type=int,
        default=DEFAULT_WINDOW_SIZE,
        metavar="N",
        help=(
            f"the most recent N tokens kept next to the sinks (default {DEFAULT_WINDOW_SIZE}); the cache holds at "
            "most n-sink + window-size tokens however long the stream runs"
        ),
    )
    model.add_argument(
        "--position-mode",
        choices=POSITION_MODES,
        default="pos_shift",
        help=(
            "positions RoPE sees: pos_shift = positions inside the cache (the paper's method, default); rerotate = "
            "the same math with keys stored rotated and re-rotated on eviction; absolute = original stream "
            "positions (ablation: degrades past the model's trained context)"
        ),
    )
    model.add_argument(
        "--streaming-mode",
        choices=STREAMING_MODES,
        default="ours",
        help="cache storage: ours = preallocated ring buffer written in place (default); mit = MIT's StartRecentKVCache (concatenate, then cut)",
    )
    model.add_argument(
        "--device",
        default="auto",
        metavar="{cpu,cuda,cuda:N,mps,auto}",
        help="where the model runs (default auto: cuda if available, else cpu)",
    )
    model.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="weights and compute dtype (default float32; bfloat16/float16 halve memory on GPU)",
    )
    model.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=(
            "CPU threads for torch (default: torch's choice, one per core); 1 is often fastest on a busy or small "
            f"machine. At most 4 per core ({MAX_THREADS} here): more only slow torch down"
        ),
    )
    output = parent.add_argument_group("output (common to every subcommand)")
    output.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status messages on stderr (they only appear when stderr is a terminal)")
    output.add_argument("--json", action="store_true", help="machine-readable JSON on stdout instead of text")
    return parent


def without_options(parent: argparse.ArgumentParser, command: str, instead: dict[str, str],
                    hidden: bool = False) -> argparse.ArgumentParser:
    """A copy of the common options' `parent` for a `command` that does not use some of them: each option named in
    `instead` (its flag -> what `command` uses in its place) defaults to None, so that one given shows, and is refused
    by validate_common_args instead of being ignored; its help says so instead of what it does elsewhere (or, hidden,
    it is left out of the help)."""
    parent = copy.deepcopy(parent)  # its actions are shared by every command built on it
    refusals = {}
    for action in parent._actions:
        flag = next((flag for flag in action.option_strings if flag in instead), None)
        if flag is not None:
            action.default = None
            action.help = argparse.SUPPRESS if hidden else f"not used by {command} (refused): {instead[flag]}"
            refusals[action.dest] = f"{command} does not use {flag}: {instead[flag]}"
    parent.set_defaults(options_refused=refusals)
    return parent


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """--n-sink, --window-size, --data and --model of the experiment scripts, with the CLI's defaults (check them
    with validate_common_args)."""
    parser.add_argument("--n-sink", type=int, default=DEFAULT_N_SINK, help=f"attention sinks (default {DEFAULT_N_SINK})")
    parser.add_argument("--window-size", type=int, default=DEFAULT_WINDOW_SIZE,
                        help=f"recent tokens kept next to the sinks (default {DEFAULT_WINDOW_SIZE})")
    parser.add_argument("--data", default=None,
                        help="text source: a .txt file, - for standard input, or a datasets spec such as pg19 "
                             "(default: the embedded text)")
    parser.add_argument("--model", default=None,
                        help="model name or path, as `streaming-llm --model` (default: the embedded SmolLM2-135M-Instruct)")


def validate_common_args(args: argparse.Namespace) -> None:
    """Refuse bad common options before anything is loaded: ValueError with the reason."""
    for dest, refusal in getattr(args, "options_refused", {}).items():  # (without_options)
        if getattr(args, dest, None) is not None:
            raise ValueError(refusal)
    n_sink, window_size = getattr(args, "n_sink", DEFAULT_N_SINK), getattr(args, "window_size", DEFAULT_WINDOW_SIZE)
    if n_sink is not None and n_sink < 0:
        raise ValueError(f"--n-sink must be >= 0 (0 = no sinks), got {n_sink}")
    if window_size is not None and window_size < 1:
        raise ValueError(f"--window-size must be >= 1, got {window_size}")
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be between 1 and {MAX_THREADS} (4 per core), got {threads}")
    device = getattr(args, "device", None)
    if device is not None and not DEVICE_PATTERN.match(device):
        raise ValueError(f"--device must be cpu, cuda, cuda:N, mps or auto; got {device!r}")
    if getattr(args, "model", None) == EMBEDDED_ALIAS:
        args.model = None


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from --threads (when given)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def model_label(args: argparse.Namespace) -> str:
    """A short name for the model the options select."""
    return "SmolLM2-135M-Instruct (embedded)" if args.model is None else str(args.model)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars and status lines go to stderr when it is a terminal and --quiet is not given, so that
    a piped or captured stderr holds only warnings and the one-line error."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def status(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr (see show_progress)."""
    if show_progress(args):
        print(message, file=sys.stderr, flush=True)


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for --model/--device/--dtype; ValueError if the model cannot be loaded."""
    from streaming_llm.loading import load_model

    status(args, f"loading {model_label(args)} ...")
    return load_model(args.model, dtype=args.dtype, device=args.device)


def wrapper_from_args(args: argparse.Namespace):
    """(StreamingLLMWrapper, tokenizer) for the common options (a FastStreamingWrapper, whose one-token steps are
    compiled, where --compile asks for it); the wrapper refuses a capacity beyond the model's positions (ValueError)."""
    from streaming_llm.wrapper import StreamingLLMWrapper

    compile_choice = getattr(args, "compile", "never")
    if compile_choice == "always" and args.streaming_mode != "ours":
        raise ValueError("--compile always needs --streaming-mode ours (the static decode step uses its buffers)")
    model, tokenizer = load_from_args(args)
    options = dict(n_sink=args.n_sink, window_size=args.window_size, position_mode=args.position_mode)
    on_cuda = next(model.parameters()).device.type == "cuda"
    if args.streaming_mode == "ours" and (compile_choice == "always" or (compile_choice == "auto" and on_cuda)):
        from streaming_llm.fast import FastStreamingWrapper

        # "auto" stays the wrapper's choice: it compiles no mixture of experts (fast.compiles_step)
        return FastStreamingWrapper(model, compile=compile_choice, **options), tokenizer
    return StreamingLLMWrapper(model, streaming_mode=args.streaming_mode, **options), tokenizer


def print_json(payload: dict[str, Any], file=None) -> None:
    """One JSON object on one line (stdout by default)."""
    print(json.dumps(payload, ensure_ascii=False), file=file or sys.stdout, flush=True)


def peak_memory_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where the platform does not report it)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def mib_text(value: float | None, decimals: int = 0) -> str:
    """A memory reading for a status line, "123 MiB"; "n/a" where the platform gives none (Windows)."""
    return "n/a" if value is None else f"{value:.{decimals}f} MiB"


def utf8_stdio() -> None:
    """Set up stdin and stdout as the command line and the scripts use them. Bytes on stdin that are not UTF-8 arrive
    as surrogate escapes (as in argv) instead of failing inside the decoder, whatever the locale, so that require_utf8
    names the input and interactive chat can go on; a character stdout cannot encode is written as '?'. A pipe or a
    file is read and written as UTF-8 whatever the locale's encoding (Windows: cp1252, which read a piped prompt's
    UTF-8 as other characters, and lacks most characters a model writes); a terminal keeps its own."""
    for stream, errors in ((sys.stdout, "replace"), (sys.stdin, "surrogateescape")):
        try:
            stream.reconfigure(errors=errors, **({} if stream.isatty() else {"encoding": "utf-8"}))
        except (AttributeError, ValueError, OSError):
            pass  # a replaced stream (tests, notebooks) keeps its own settings


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within it, SIGTERM (`kill`, a job scheduler's stop) ends the command as SystemExit(143), not at once: `finally`
    blocks run, so a results file being written leaves no hidden temporary beside it (atomic_write). In the main
    thread only, where Python runs signal handlers; the handler before it is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_script(main, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run an experiment script's `main(argv)` under the CLI's error contract: a ValueError or OSError (bad input,
    a model or file that cannot be read) is one line, `<script>: error: <reason>`, exit status 2; Ctrl-C exits 130
    without a traceback. stdin and stdout are set up as the command line's (utf8_stdio). `prog` names a module run
    with `python -m` as its parser does (sys.argv[0] is then the module's file)."""
    name = prog or os.path.basename(sys.argv[0]) or "script"
    utf8_stdio()
    try:
        with sigterm_as_exit():  # (its SystemExit(143) goes on to the script's sys.exit, as --help's does)
            return int((main() if argv is None else main(argv)) or 0)
    except (ValueError, OSError) as error:
        print(f"{name}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)
        return 130


def require_cuda(device: str) -> str:
    """The device a GPU script runs on (its --device, checked by validate_common_args): auto is CUDA where there is
    one, else the CPU. ValueError for a CUDA device asked for on a machine without one, and for mps (the scripts time
    CUDA kernels, or run a CPU smoke check)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (this script measures the GPU; --device cpu for a "
                         "small smoke run where it offers one)")
    if device == "mps":
        raise ValueError("--device mps: this script measures CUDA (--device cuda), or runs a small smoke check on the CPU "
                         "(--device cpu)")
    return device


def one_line(error: BaseException) -> str:
    """An error as the CLI prints it: one line (an OSError as '<reason>: <file>')."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return text or type(error).__name__


@contextlib.contextmanager
def trial_folder(folder: Path) -> Iterator[None]:
    """Create `folder` and the missing folders above it for a check, then remove again those it created (each only
    if still empty): a run refused after its output was checked leaves no folder behind; the first write creates
    them (atomic_write). A folder that existed before is never touched."""
    created, probe = [], folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        yield
    finally:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


def check_output_file(path: str, option: str = "--output") -> Path:
    """The file `option` names (a leading ~ expanded; write to this path, not to the text given), checked before
    any work so that a long run does not fail at its end: not empty, not a folder or a device, and its folder
    takes new files (a missing one is created for the check and removed again; the write creates it)."""
    if not path.strip():
        raise ValueError(f"{option} is empty: give a file path")
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file path in it")
    if file.exists() and not file.is_file():
        raise ValueError(f"{option} {path} is not a regular file")
    # the folder the file is written in: a link's target's (atomic_write writes through a link)
    parent = Path(os.path.realpath(file)).parent if file.is_symlink() else file.parent
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    if not existing.is_dir():  # mkdir would say "File exists"
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        with trial_folder(parent):
            parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=parent):  # the file is written next to it, then renamed
                pass
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write in its folder {parent} ({error.strerror or error})") from None
    return file


def measurement_output(parser: argparse.ArgumentParser, output: str | None, option: str = "--output") -> Path | None:
    """An experiment's --output JSON file (check_output_file; `option` names it in the message), refused through
    `parser` before the measurement; None without one."""
    if output is None:
        return None
    try:
        return check_output_file(output, option)
    except ValueError as error:
        parser.error(str(error))


def finish_measurement(record: dict[str, Any], summary: str, output: Path | None) -> None:
    """Print an experiment's one-line summary and write its record to `output` (atomically) when there is one."""
    from streaming_llm.eval.results import write_json_atomically

    print(summary)
    if output is not None:
        write_json_atomically(output, record)
