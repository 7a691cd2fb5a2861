"""The `streaming-llm` command: generate, chat and info here; eval/plot and bench registered from their
packages when present.

Every subcommand takes the common options of cli_common.py (eval, bench and plot refuse those they do not use:
without_options) and sets `handler=fn(args) -> exit status`.
Errors a user can fix (ValueError, a missing file, a bad option) print one line,
`streaming-llm: error: <reason>`, and exit with status 2; Ctrl-C exits with 130 without a traceback (in a chat typed at
a terminal, Ctrl-C during an answer stops that answer, and the chat goes on).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from streaming_llm.cli_common import (
    apply_threads,
    check_output_file,
    common_parent,
    mib_text,
    model_label,
    one_line,
    peak_memory_mb,
    print_json,
    show_progress,
    sigterm_as_exit,
    status,
    validate_common_args,
    utf8_stdio,
    wrapper_from_args,
)
from streaming_llm.choices import COMPILE_CHOICES

PROG = "streaming-llm"
# Subcommands owned by other packages: module with `register(subparsers, common_parent)`.
OPTIONAL_COMMANDS = ("streaming_llm.eval.command", "streaming_llm.bench.command")
OWN_COMMANDS = ("generate", "chat", "info")
CACHE_CHECK_EVERY = 64  # tokens between two looks at the cache length during `generate`


class UsageError(Exception):
    """A command-line mistake argparse found; main() prints it on one line."""


class _Parser(argparse.ArgumentParser):
    """Options by their whole names only: argparse's abbreviations took `eval --output x.json` for `--output-dir`
    (chat and plot's --output is a file), and wrote the results into a folder named x.json."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, whose "unrecognized arguments" (found by this, the top parser, after the subcommand's) named
        `streaming-llm --help`: it names the subcommand's help, and the options an unknown one begins (`--output`:
        did you mean --output-dir?), as abbreviations are not taken."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(namespace, "command", None)
            subcommands = self._subparsers._group_actions[0].choices if self._subparsers else {}
            parser = subcommands.get(command, self)
            known = [option for action in parser._actions for option in action.option_strings]
            unknown = [name for name in (word.split("=")[0] for word in extras) if name.startswith("--") and name != "--"]
            begun = [option for option in known for name in unknown if option.startswith(name)]
            hint = f"; did you mean {' or '.join(dict.fromkeys(begun))}?" if begun else ""
            takes_text = any(action.dest == "prompt_text" for action in parser._actions)
            if takes_text and not any(word.startswith("-") for word in extras):
                hint = "; a prompt of several words is one argument: quote it"
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}{hint} (see {parser.prog} --help)")
        return namespace


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, per: str) -> None:
    sampling = parser.add_argument_group("generation")
    sampling.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"tokens to generate {per} (default {max_new_tokens}); any number works: the cache never grows",
    )
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, the most likely token (default); > 0 samples, higher = more random")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: sample among the most likely tokens holding this probability mass (default 1 = all)")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (default 0 = all)")
    sampling.add_argument("--seed", type=int, default=None, help="seed of the sampler, for reproducible sampling (default: random)")
    sampling.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating any of the last --repetition-window tokens (CTRL-style; default 1 = off)"
    )
    sampling.add_argument("--repetition-window", type=int, default=64, metavar="N", help="how many recent tokens the repetition penalty looks at (default 64)")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (not printed); repeat for several")
    sampling.add_argument("--system", default=None, metavar="TEXT", help="system message for the chat template (default: the template's own)")
    sampling.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="one-token steps through the static decode step compiled with torch.compile (CUDA graphs on GPU; same "
        "tokens, a fraction of the time per token): auto (default) = on a CUDA device, always, never = the general path",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; given the `command` about to run, the optional subcommands (whose modules import
    torch) are only imported when it may be one of theirs."""
    parent = common_parent()
    parser = _Parser(
        prog=PROG,
        description=(
            "StreamingLLM: endless generation and chat with attention sinks. The KV cache keeps the first "
            "--n-sink tokens and the last --window-size tokens, so memory stays fixed however long the stream."
        ),
    )
    from streaming_llm import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = subparsers.add_parser(
        "generate",
        parents=[parent],
        help="stream a continuation of a prompt to stdout",
        description=(
            "Feed the prompt through the streaming cache (in blocks), then generate one token at a time, printing text "
            "as it is produced. Stops at --max-new-tokens, at the model's end-of-sequence token (unless --ignore-eos) "
            "or at a --stop string."
        ),
    )
    source = generate.add_mutually_exclusive_group()
    source.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT",
                        help="the prompt text (as --prompt; quote it); - reads it from stdin (as --prompt-file -)")
    source.add_argument("--prompt", "-p", default=None, metavar="TEXT", help="the prompt text")
    source.add_argument("--prompt-file", "-f", default=None, metavar="PATH", help="read the prompt from a UTF-8 file ('-' = stdin)")
    _add_sampling_arguments(generate, max_new_tokens=256, per="after the prompt")
    generate.add_argument(
        "--chat-template",
        choices=("auto", "on", "off"),
        default="auto",
        help="wrap the prompt as a user message in the tokenizer's chat template: auto (default) = on when the tokenizer has one (instruct models), off = raw text continuation",
    )
    generate.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens (for long generation)")
    generate.add_argument("--stats", action="store_true", help="print tokens/s, cache length and peak memory to stderr at the end (always included with --json)")
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat",
        parents=[parent],
        help="multi-turn chat with an instruct model through the fixed cache",
        description=(
            "Chat using the tokenizer's chat template. The whole conversation streams through one fixed-size cache: "
            "each turn feeds only its new tokens, old turns are never fed again. Interactive commands: /reset (new "
            "conversation), /stats, /exit. With --script, every prompt of a JSONL file is sent in order through one "
            "conversation and the answers are recorded with --output."
        ),
    )
    chat.add_argument(
        "--script",
        default=None,
        metavar="PROMPTS.jsonl",
        help='scripted mode: one JSON object per line with a "prompt" string or a "turns" list (MT-Bench style)',
    )
    chat.add_argument("--output", "-o", default=None, metavar="ANSWERS.jsonl", help="with --script: write one JSON record per answer (written when the script completes; "
                      "stopped by Ctrl-C or SIGTERM, the finished answers go to ANSWERS.partial.jsonl)")
    _add_sampling_arguments(chat, max_new_tokens=256, per="per answer")
    chat.set_defaults(handler=run_chat)

    info = subparsers.add_parser(
        "info",
        parents=[parent],
        help="the resolved model, its architecture and the cache configuration",
        description="Load the model and show what streaming will use: architecture, rotary dims, cache capacity, position mode, versions.",
    )
    info.set_defaults(handler=run_info)

    for module_name in OPTIONAL_COMMANDS if command not in OWN_COMMANDS else ():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # that subcommand's package is not installed in this tree
            raise
        module.register(subparsers, parent)
    parser.set_defaults(handler=None, command_names=list(subparsers.choices))
    return parser


# -- shared helpers --------------------------------------------------------------------------------------
def require_utf8(text: str, what: str, encoding: str | None = None) -> str:
    """`text` as UTF-8 text; ValueError naming `what` where it is not. Python carries the bytes it could not decode (in
    argv, or stdin) as surrogate escapes, which no tokenizer takes: they are taken back to bytes with `encoding`, the
    one they were decoded with (default: argv's), and read as UTF-8. So UTF-8 that only the locale could not read
    (PYTHONUTF8=0 in the C locale decodes argv as ASCII) is the text it is; it was refused as "not UTF-8"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as error:
        first_escape = error.start
    try:
        return text.encode(encoding or sys.getfilesystemencoding(), "surrogateescape").decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start
    except UnicodeEncodeError:  # (not the escapes of that encoding's decoding)
        offset = len(text[:first_escape].encode("utf-8"))
    raise ValueError(f"{what} is not UTF-8 text (byte offset {offset})")


def stdin_encoding() -> str:
    """What stdin's bytes were decoded with (utf8_stdio: UTF-8 for a pipe or a file, a terminal's own otherwise)."""
    return getattr(sys.stdin, "encoding", None) or "utf-8"


def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of `path` ('-' = stdin; a pipe such as <(cmd) works too); ValueError naming the file otherwise."""
    if path == "-":
        return require_utf8(sys.stdin.read(), f"{what} (stdin)", stdin_encoding())
    file = Path(path).expanduser()
    if not file.exists():
        raise ValueError(f"{what} not found: {path}")
    if file.is_dir():
        raise ValueError(f"{what} is a folder, not a file: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte offset {error.start})") from error
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror}") from error


def check_text_options(args: argparse.Namespace) -> None:
    """Refuse, before the model is loaded, a --system or --stop text that is not UTF-8 (see require_utf8), an empty
    --stop, and --system without the chat template; UTF-8 the locale could not decode becomes the text it is."""
    if args.system is not None:
        args.system = require_utf8(args.system, "--system")
        if getattr(args, "chat_template", None) == "off":
            raise ValueError("--system needs the chat template (--chat-template auto/on with an instruct model)")
    for stop in args.stop:
        if not stop:
            raise ValueError("--stop needs a non-empty text")
    args.stop = [require_utf8(stop, "--stop") for stop in args.stop]


def sampling_from_args(args: argparse.Namespace):
    from streaming_llm.sampling import SamplingConfig

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        return SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            repetition_window=args.repetition_window,
            seed=args.seed,
        )
    except ValueError as error:
        raise ValueError(f"--{str(error).replace('_', '-')}") from None


def _cache_stats(wrapper) -> dict:
    return {
        "tokens_seen": wrapper.tokens_seen,
        "cache_length": wrapper.cache.get_cache_length(),
        "cache_capacity": wrapper.cache_capacity,
        "n_sink": wrapper.n_sink,
        "window_size": wrapper.window_size,
        "position_mode": wrapper.position_mode,
        "streaming_mode": wrapper.streaming_mode,
    }


def _write_text(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


# -- generate --------------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    """Handler of `streaming-llm generate`."""
    if args.prompt_text == "-":  # `generate -` is `generate --prompt-file -`
        args.prompt_file = "-"
    elif args.prompt_text is not None:  # `generate "text"` is `generate --prompt "text"`
        args.prompt = args.prompt_text
    if args.prompt is None and args.prompt_file is None:
        raise ValueError("give the prompt as PROMPT, --prompt TEXT or --prompt-file PATH ('-' reads stdin)")
    prompt = require_utf8(args.prompt, "--prompt") if args.prompt is not None else read_text_file(args.prompt_file, "prompt file")
    if not prompt.strip():
        raise ValueError("the prompt is empty" if args.prompt is not None else f"the prompt file {args.prompt_file} is empty")
    check_text_options(args)
    sampling = sampling_from_args(args)
    from streaming_llm.generation import end_of_turn_ids, generate_stream  # after the usage checks: torch loads here

    wrapper, tokenizer = wrapper_from_args(args)

    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat_template == "on" and not has_template:
        raise ValueError(f"--chat-template on: the tokenizer of {model_label(args)} has no chat template")
    if args.chat_template == "on" or (args.chat_template == "auto" and has_template):
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if args.system:
            raise ValueError("--system needs the chat template (--chat-template auto/on with an instruct model)")
        prompt_ids = tokenizer(prompt)["input_ids"]

    stream = generate_stream(
        wrapper,
        tokenizer,
        prompt_ids,
        sampling,
        stop=args.stop,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=() if args.ignore_eos else end_of_turn_ids(tokenizer, wrapper.model),
        progress=show_progress(args),
    )
    pieces: list[str] = []
    max_cache_length = 0
    for piece in stream:
        if args.json:
            pieces.append(piece.text)
        else:
            _write_text(piece.text)
        if stream.new_tokens % CACHE_CHECK_EVERY == 0:
            max_cache_length = max(max_cache_length, wrapper.cache.get_cache_length())
    if not args.json:
        _write_text("\n")

    stats = {
        "model": model_label(args),
        "prompt_tokens": stream.prompt_tokens,
        "new_tokens": stream.new_tokens,
        "stop_reason": stream.stop_reason,
        "prefill_seconds": round(stream.prefill_seconds, 4),
        "decode_seconds": round(stream.decode_seconds, 4),
        "tokens_per_second": round(stream.tokens_per_second, 2),
        **_cache_stats(wrapper),
        "max_cache_length": max(max_cache_length, wrapper.cache.get_cache_length()),
        "device": str(next(wrapper.model.parameters()).device),
        "dtype": args.dtype,
        "peak_rss_mib": peak_memory_mb(),
    }
    if args.json:
        print_json({"text": "".join(pieces), **stats})
    elif args.stats:
        print(
            f"[stats] {stats['new_tokens']} tokens in {stats['decode_seconds']:.2f} s = {stats['tokens_per_second']:.1f} tokens/s "
            f"(prompt: {stats['prompt_tokens']} tokens in {stats['prefill_seconds']:.2f} s); stop: {stats['stop_reason']}; "
            f"cache {stats['cache_length']}/{stats['cache_capacity']} tokens (max {stats['max_cache_length']}) after "
            f"{stats['tokens_seen']} seen; peak RSS {mib_text(stats['peak_rss_mib'])}",
            file=sys.stderr,
            flush=True,
        )
    return 0


# -- chat ------------------------------------------------------------------------------------------------
def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text} is out of range")
    return number


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def read_script(path: str) -> list[dict]:
    """Records of a JSONL script: each {"turns": [str, ...], "fields": other keys of the line}. Every line must
    hold text and finite numbers only, as the --output records copy its fields."""
    records = []
    for line_number, line in enumerate(read_text_file(path, "script").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
            json.dumps(record, ensure_ascii=False).encode("utf-8")  # as --output will write its fields
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {line_number}: not valid JSON ({error.msg})") from None
        except UnicodeEncodeError:  # a ValueError too
            raise ValueError(f"{path} line {line_number}: a string holds a lone surrogate (an escape \\ud800-\\udfff), which is not text") from None
        except ValueError as error:  # NaN, Infinity, 1e999
            raise ValueError(f"{path} line {line_number}: {error} (only finite numbers are allowed)") from None
        except RecursionError:  # in the parser or, for a line just under its limit, in the encoder
            raise ValueError(f"{path} line {line_number}: nested too deeply") from None
        if isinstance(record, dict) and "prompt" in record and "turns" in record:
            raise ValueError(f'{path} line {line_number}: has both "prompt" and "turns"; give one')
        turns = record.get("turns", [record["prompt"]] if "prompt" in record else None) if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
            raise ValueError(f'{path} line {line_number}: needs a "prompt" string or a non-empty "turns" list of strings')
        if not all(turn.strip() for turn in turns):  # as the interactive chat skips an empty line
            raise ValueError(f"{path} line {line_number}: a prompt is empty")
        fields = {key: value for key, value in record.items() if key not in ("prompt", "turns")}
        records.append({"turns": turns, "fields": fields})
    if not records:
        raise ValueError(f"script {path} has no prompts")
    return records


def _chat_stats_line(chat) -> str:
    wrapper, last = chat.wrapper, chat.last_turn
    line = (
        f"[stats] {chat.turns} turns, {wrapper.tokens_seen} tokens seen, cache {wrapper.cache.get_cache_length()}/"
        f"{wrapper.cache_capacity} ({wrapper.n_sink} sinks + {wrapper.window_size} window)"
    )
    if last is not None:
        line += f"; last answer {last.new_tokens} tokens at {last.tokens_per_second:.1f} tokens/s ({last.stop_reason})"
    return line


def _chat_stats(chat) -> dict:
    last = chat.last_turn
    return {
        "turns": chat.turns,
        **_cache_stats(chat.wrapper),
        "last_answer_tokens": last.new_tokens if last else None,
        "last_tokens_per_second": round(last.tokens_per_second, 2) if last else None,
        "peak_rss_mib": peak_memory_mb(),
    }


def run_chat(args: argparse.Namespace) -> int:
    """Handler of `streaming-llm chat`."""
    if args.output is not None and not args.script:
        raise ValueError("--output records the answers of a --script run; give --script too")
    if args.output is not None:
        args.output = str(check_output_file(args.output))  # ~ expanded: the path the answers are written to
        script_path = Path(args.script).expanduser()
        if (args.script != "-" and script_path.exists() and Path(args.output).exists()
                and os.path.samefile(args.output, script_path)):
            raise ValueError(f"--output {args.output} is the --script file: the answers would replace the prompts")
    script = read_script(args.script) if args.script else None
    check_text_options(args)
    sampling = sampling_from_args(args)
    from streaming_llm.generation import StreamingChat  # after the usage checks: torch loads here

    wrapper, tokenizer = wrapper_from_args(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_label(args)} has no chat template; chat needs an instruct model (for a base model use generate --chat-template off)")
    chat = StreamingChat(wrapper, tokenizer, system_prompt=args.system, sampling=sampling, max_new_tokens=args.max_new_tokens, stop=args.stop)
    if script is not None:
        return _run_script(args, chat, script)
    return _run_interactive(args, chat)


def _run_script(args: argparse.Namespace, chat, script: list[dict]) -> int:
    from tqdm.auto import tqdm

    from streaming_llm.eval.results import partial_path

    total_turns = sum(len(record["turns"]) for record in script)
    bar = tqdm(total=total_turns, desc="turns", unit="turn", disable=not (args.json and show_progress(args)))
    answers, new_tokens, start = [], 0, time.perf_counter()
    try:
        for record_index, record in enumerate(script):
            for turn_index, prompt in enumerate(record["turns"]):
                if not args.json:
                    _write_text(f"USER: {prompt}\n\nASSISTANT: ")
                for piece in chat.send(prompt):
                    if not args.json:
                        _write_text(piece.text)
                if not args.json:
                    _write_text("\n\n")
                turn = chat.last_turn
                new_tokens += turn.new_tokens
                answers.append(
                    {
                        **record["fields"],
                        "record": record_index,
                        "turn": turn_index,
                        "prompt": prompt,
                        "answer": turn.answer,
                        "new_tokens": turn.new_tokens,
                        "fed_tokens": turn.fed_tokens,
                        "stop_reason": turn.stop_reason,
                        "tokens_seen": chat.wrapper.tokens_seen,
                        "cache_length": chat.wrapper.cache.get_cache_length(),
                        "seconds": round(turn.seconds, 4),
                    }
                )
                bar.update()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: the answers finished so far are kept, beside --output
        if args.output and answers:
            partial = partial_path(args.output)
            _write_jsonl_atomically(partial, answers)
            print(f"chat: interrupted after {len(answers)} of {total_turns} answers; those are in {partial}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()
    if args.output:
        _write_jsonl_atomically(Path(args.output), answers)
        partial_path(args.output).unlink(missing_ok=True)  # an interrupted run's, now superseded
    seconds = time.perf_counter() - start
    summary = {
        "model": model_label(args),
        "records": len(script),
        "answers": len(answers),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 2) if seconds > 0 else None,
        **_chat_stats(chat),
        "output": args.output,
    }
    if args.json:
        print_json(summary)
    else:
        status(args, _chat_stats_line(chat) + (f"; {len(answers)} answers written to {args.output}" if args.output else ""))
    return 0


def _write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    """Write all records or nothing (a temporary file in the same folder, renamed when complete)."""
    from streaming_llm.eval.results import atomic_write

    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class _AnswerStop:
    """Ctrl-C while an answer is generated for a person at a terminal, as in other chat programs: the first press stops
    the answer after the token being computed (so the cache holds whole tokens, and the answer so far stays in the
    conversation, stop_reason "interrupted"); a second press interrupts as anywhere else (status 130)."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> _AnswerStop:
        # Only the main thread may set a signal handler (main() called from another thread: Ctrl-C is not ours to take).
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _press(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _line_editing() -> bool:
    """Set up input() for a person at a terminal: readline gives arrow keys, history, and lines past the terminal's
    own limit of 4,095 bytes (without it, a longer paste was cut there, an arrow key reached the model as an escape
    code, and a backspace without the terminal's iutf8 setting left half a character). Bracketed paste (GNU readline
    8.1+) makes a paste of several lines one message, sent with Enter, instead of one message per line. True when
    readline then ends the line itself at Ctrl-D (it does with bracketed paste on)."""
    try:
        import readline
    except ImportError:  # Windows: the console edits the line itself
        return False
    if "libedit" in (readline.__doc__ or "") or getattr(readline, "_READLINE_RUNTIME_VERSION", 0) < 0x0801:
        return False
    readline.parse_and_bind("set enable-bracketed-paste on")  # Python turns it off, for its own prompt
    return True


def _input_uses_readline() -> bool:
    """Whether input() reads with readline (when imported): as CPython decides, where sys.stdin and sys.stdout are
    the process's own stdin and stdout, both terminals."""
    try:
        return sys.stdin.fileno() == 0 and sys.stdout.fileno() == 1 and os.isatty(0) and os.isatty(1)
    except (AttributeError, ValueError, OSError):  # a replaced stream without a file descriptor
        return False


def _run_interactive(args: argparse.Namespace, chat) -> int:
    interactive = sys.stdin.isatty()
    readline_ends_line = interactive and _line_editing() and _input_uses_readline()
    # The prompt is for the person at the terminal: where stdout is a file or a pipe (a transcript, JSON lines) it goes
    # to stderr, as input() would have written it into that file.
    prompt_file = sys.stdout if sys.stdout.isatty() else sys.stderr
    status(
        args,
        f"chatting with {model_label(args)}; cache {chat.wrapper.n_sink} sinks + {chat.wrapper.window_size} window "
        f"= {chat.wrapper.cache_capacity} tokens. Commands: /reset /stats /exit",
    )
    for line_number in itertools.count(1):
        if interactive:
            try:
                if prompt_file is sys.stdout:
                    line = input("> ")  # readline redraws its prompt as the line is edited
                else:
                    print("> ", end="", file=prompt_file, flush=True)
                    line = input()
            except EOFError:
                if not readline_ends_line:
                    print(file=prompt_file, flush=True)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not args.json:
                _write_text(f"> {line}\n")
        try:
            line = require_utf8(line, f"input line {line_number}", stdin_encoding())
        except ValueError as error:  # one bad line is not the end of the conversation
            print(f"{PROG}: error: {error}; line ignored", file=sys.stderr, flush=True)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            chat.reset()
            status(args, "[conversation reset: cache emptied]")
        elif command == "/stats":
            if args.json:
                print_json(_chat_stats(chat))
            else:
                print(_chat_stats_line(chat), flush=True)
        elif command.startswith("/"):
            print(f"unknown command {command}; commands: /reset /stats /exit", file=sys.stderr if args.json else sys.stdout,
                  flush=True)
        else:
            answer = chat.send(line)
            # The answer is closed (recorded as far as it went) while Ctrl-C still only stops it.
            with (_AnswerStop() if interactive else contextlib.nullcontext()) as stop, contextlib.closing(answer):
                for piece in answer:
                    if not args.json:
                        _write_text(piece.text)
                    if stop is not None and stop.requested:
                        break
            if args.json:  # one JSON object per answer: stdout stays JSON lines
                turn = chat.last_turn
                print_json({"prompt": line, "answer": turn.answer, "new_tokens": turn.new_tokens,
                            "fed_tokens": turn.fed_tokens, "stop_reason": turn.stop_reason, **_chat_stats(chat)})
            else:
                _write_text("\n\n")
            if stop is not None and stop.requested:
                status(args, "[answer stopped (Ctrl-C); it stays in the conversation as far as it went]")
    return 0


# -- info ------------------------------------------------------------------------------------------------
def _resolved_source(model_arg: str | None) -> str:
    """Where the model came from: the embedded GGUF's path, a local path made absolute, or the hub id."""
    from streaming_llm.loading import embedded_model_path

    if model_arg is None:
        return str(embedded_model_path())
    path = Path(model_arg).expanduser()
    return str(path.resolve()) if path.exists() else model_arg


def run_info(args: argparse.Namespace) -> int:
    """Handler of `streaming-llm info`."""
    import platform

    import tokenizers
    import torch
    import transformers

    import streaming_llm
    from streaming_llm.cache import kv_cache_bytes
    from streaming_llm.models import attention_shape, sliding_windows

    wrapper, tokenizer = wrapper_from_args(args)
    model, architecture = wrapper.model, wrapper.architecture
    config = model.config.get_text_config()  # a multimodal checkpoint: its language model's
    shape = attention_shape(config)
    windows = sliding_windows(config)
    payload = {
        "model": model_label(args),
        "resolved": _resolved_source(args.model),
        "model_type": architecture.model_type,
        "architecture": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "layers": shape.layers,
        "attention_heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "rotary_ndims": architecture.rotary_ndims,
        "rotary_pairs": ("interleaved (2i, 2i+1)" if any(rotary.interleaved for rotary in architecture.layer_rotaries)
                         else "rotate_half (i, i+d/2)"),
        "layers_without_rope": sum(rotary.rotary_ndims == 0 for rotary in architecture.layer_rotaries),
        # the layers that attend within their own window (docs/semantics.md §8) and that window
        "sliding_layers": sum(window is not None for window in windows),
        "sliding_window": max((window for window in windows if window is not None), default=None),
        "vocab_size": config.vocab_size,
        "max_positions": architecture.max_positions,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "n_sink": wrapper.n_sink,
        "window_size": wrapper.window_size,
        "cache_capacity": wrapper.cache_capacity,
        # keys and values held once the cache is full, for one stream in the model's dtype (cache.kv_cache_bytes)
        "kv_cache_mib": round(kv_cache_bytes(model.config, wrapper.n_sink, wrapper.window_size, wrapper.streaming_mode,
                                             next(model.parameters()).dtype) / 2**20, 2),
        "position_mode": wrapper.position_mode,
        "streaming_mode": wrapper.streaming_mode,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "streaming_llm": streaming_llm.__version__,
        },
    }
    if args.json:
        print_json(payload)
    else:
        width = max(len(key) for key in payload)
        for key, value in payload.items():
            if isinstance(value, dict):
                value = ", ".join(f"{name} {version}" for name, version in value.items())
            print(f"{key:<{width}}  {value}")
    return 0


# -- entry point -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    utf8_stdio()
    try:
        with sigterm_as_exit():
            argv = sys.argv[1:] if argv is None else list(argv)
            parser = build_parser(command=next((word for word in argv if not word.startswith("-")), None))
            args = parser.parse_args(argv)
            if args.handler is None:
                raise UsageError(f"choose a command: {', '.join(args.command_names)} (see {PROG} --help)")
            validate_common_args(args)
            apply_threads(args)
            return int(args.handler(args) or 0)
    except SystemExit as exit_request:  # --help, --version, SIGTERM (sigterm_as_exit: status 143)
        code = exit_request.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr, flush=True)  # sys.exit("message"): as Python ends on it, the message and 1
        return 1
    except (UsageError, ValueError, OSError) as error:
        if isinstance(error, BrokenPipeError):  # stdout closed early, e.g. `| head`: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        sys.stdout.flush()
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
