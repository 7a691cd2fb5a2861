"""The `streaming-llm` command, run in-process (main(argv)) and as a subprocess.

The model is a tiny random Llama saved next to the embedded SmolLM2 tokenizer, so the chat template,
special tokens and byte-level pieces are the real ones while a step costs milliseconds. Capacity 64
(4 sinks + 60 window) is far below every stream here.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streaming_llm import cli
from streaming_llm.bench.soak import save_tiny_chat_llama

N_SINK, WINDOW_SIZE = 4, 60
CAPACITY = N_SINK + WINDOW_SIZE
CACHE_OPTIONS = ["--n-sink", str(N_SINK), "--window-size", str(WINDOW_SIZE)]
_CHECKPOINT: dict[str, Path] = {}


def build_tiny_checkpoint(root: Path) -> Path:
    """Save a tiny random Llama (vocab = the SmolLM2 tokenizer's) and that tokenizer to root/tiny_chat_llama."""
    return save_tiny_chat_llama(root / "tiny_chat_llama")


def tiny_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint folder, built once per test session (test_generation_api.py shares it)."""
    if "folder" not in _CHECKPOINT:
        _CHECKPOINT["folder"] = build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))
    return _CHECKPOINT["folder"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture
def script_file(tmp_path) -> Path:
    """20 turns: 8 records of 2 turns (MT-Bench's "turns") and 4 of one "prompt"."""
    lines = [{"question_id": i, "turns": [f"Question {i}: what do cats eat?", "And why?"]} for i in range(8)]
    lines += [{"prompt": f"Say something about the number {i}."} for i in range(4)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_subprocess(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script (the `python -m streaming_llm.cli` module where it is not installed)."""
    script = Path(sys.executable).with_name("streaming-llm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "streaming_llm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command + list(argv), input=stdin, capture_output=True, text=True, env=env, timeout=300)


class Terminal:
    """`streaming-llm ARGS` run as a person runs it: on a pseudo-terminal that is its controlling terminal (so a ^C
    typed there is SIGINT), with stdin, stdout and stderr on it. Skipped where there are no pseudo-terminals."""

    # A session leader takes the terminal on its stdin as its controlling one, then becomes the command.
    LAUNCHER = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "os.execv(sys.executable, [sys.executable, '-m', 'streaming_llm', *sys.argv[1:]])")

    def __init__(self, *argv: str):
        pty = pytest.importorskip("pty")
        termios = pytest.importorskip("termios")
        self.master, slave = pty.openpty()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TERM": "xterm", "INPUTRC": os.devnull}
        self.process = subprocess.Popen([sys.executable, "-c", self.LAUNCHER, *argv], stdin=slave, stdout=slave,
                                        stderr=slave, start_new_session=True, env=env)
        os.close(slave)
        self.settings = termios.tcgetattr(self.master)  # before the command changes them
        self.output = b""  # what the terminal showed after the last match

    def _read(self) -> bytes:
        if not select.select([self.master], [], [], 120)[0]:
            raise AssertionError(f"the terminal stayed silent; it last showed {self.output[-1000:]!r}")
        try:
            return os.read(self.master, 65536)
        except OSError:  # EIO: the command closed the terminal
            return b""

    def expect(self, pattern: bytes) -> re.Match:
        """Read until `pattern` shows; the match (the output after it is kept for the next one)."""
        while not (match := re.search(pattern, self.output)):
            data = self._read()
            if not data:
                raise AssertionError(f"the command ended before {pattern!r}; the terminal showed {self.output[-1000:]!r}")
            self.output += data
        self.output = self.output[match.end():]
        return match

    def send(self, typed: bytes) -> None:
        os.write(self.master, typed)

    def answer(self) -> dict:
        """The next --json answer record, once the prompt for the next line shows (keys typed before it are read by
        the terminal's own line editing, not by the command's)."""
        record = json.loads(self.expect(rb'(\{"prompt".*?\})\r\n').group(1))
        self.expect(b"> ")
        return record

    def close(self) -> int:
        """Read to the end; the exit status (`settings_left`: the terminal's settings the command left)."""
        import termios

        while data := self._read():
            self.output += data
        self.settings_left = termios.tcgetattr(self.master)
        os.close(self.master)
        return self.process.wait(timeout=60)


def assert_one_line_error(status: int, err: str, fragment: str) -> None:
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("streaming-llm: error: ") and fragment in lines[0], lines[0]


# -- generate -----------------------------------------------------------------------------------------
def check_long_generation(stats: dict, new_tokens: int) -> None:
    assert stats["new_tokens"] == new_tokens and stats["stop_reason"] == "length"
    assert stats["tokens_seen"] == stats["prompt_tokens"] + new_tokens - 1  # the last token is never fed
    assert stats["cache_length"] == stats["max_cache_length"] == stats["cache_capacity"] == CAPACITY


def test_generate_2000_tokens_keeps_the_cache_at_capacity(model_dir, capsys):
    status, out, err = run_main(
        capsys, "generate", "--model", str(model_dir), *CACHE_OPTIONS, "--prompt", "Once upon a time",
        "--max-new-tokens", "2000", "--ignore-eos", "--stats", "--json",
    )
    assert status == 0, err
    stats = json.loads(out)
    check_long_generation(stats, 2000)
    assert 100 < stats["peak_rss_mib"] < 100_000  # this process, torch loaded: MiB, not KiB or bytes


def test_peak_rss_is_in_mib_on_linux_and_on_macos(monkeypatch):
    """ru_maxrss is in KiB on Linux and in bytes on macOS (a branch CI, on Linux, never took); peak_rss_mib of
    generate and chat is MiB on both, and None without the resource module."""
    import resource
    import types

    from streaming_llm.cli_common import peak_memory_mb

    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**20))
    monkeypatch.setattr(sys, "platform", "linux")
    assert peak_memory_mb() == 3 * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peak_memory_mb() == 3.0
    monkeypatch.setitem(sys.modules, "resource", None)  # no such module (Windows): import fails
    assert peak_memory_mb() is None


def test_generate_subprocess_sampling_past_capacity_reports_cache_length(model_dir):
    """The console script, sampling with every option, 400 tokens (> 6x the capacity): the cache stays at capacity and
    the stats say so. (It generated 2000, ~3.5 s more; test_generate_2000_tokens_keeps_the_cache_at_capacity keeps
    that length, in-process.)"""
    result = run_subprocess(
        "generate", "--model", str(model_dir), *CACHE_OPTIONS, "--prompt", "Once upon a time",
        "--max-new-tokens", "400", "--ignore-eos", "--stats", "--json", "--temperature", "0.8", "--top-p", "0.9",
        "--top-k", "50", "--repetition-penalty", "1.2", "--seed", "3",
    )
    assert result.returncode == 0, result.stderr
    check_long_generation(json.loads(result.stdout), 400)


def test_generate_text_mode_streams_the_same_text_as_json(model_dir, capsys):
    common = ["generate", "--model", str(model_dir), *CACHE_OPTIONS, "-p", "Héllo wörld 日本", "--max-new-tokens", "90", "--ignore-eos"]
    status, out, err = run_main(capsys, *common, "--stats")
    assert status == 0
    assert "[stats] 90 tokens" in err and f"cache {CAPACITY}/{CAPACITY}" in err
    status, json_out, _ = run_main(capsys, *common, "--json")
    assert status == 0 and out == json.loads(json_out)["text"] + "\n"


def test_generate_compiled_static_step_gives_the_same_tokens(model_dir, capsys):
    """--compile always (torch.compile of the static decode step; CUDA graphs on GPU, inductor here) generates
    what the general path generates, greedily, far past the cache capacity."""
    argv = ["generate", "--model", str(model_dir), *CACHE_OPTIONS, "-p", "Once upon a time", "--max-new-tokens", "150",
            "--ignore-eos", "--json"]
    texts = {}
    for choice in ("never", "always"):
        status, out, err = run_main(capsys, *argv, "--compile", choice)
        assert status == 0, err
        texts[choice] = json.loads(out)
    assert texts["always"]["text"] == texts["never"]["text"]
    assert texts["always"]["cache_length"] == CAPACITY


@pytest.mark.parametrize("compile_choice, streaming_mode, expected", [
    ("auto", "ours", "StreamingLLMWrapper"),  # auto compiles on CUDA only
    ("never", "ours", "StreamingLLMWrapper"),
    ("always", "ours", "FastStreamingWrapper"),
    ("auto", "mit", "StreamingLLMWrapper"),
])
def test_the_compile_option_picks_the_wrapper(monkeypatch, compile_choice, streaming_mode, expected):
    import argparse

    from tiny_models import build_llama

    from streaming_llm import cli_common

    monkeypatch.setattr(cli_common, "load_from_args", lambda args: (build_llama(), None))
    args = argparse.Namespace(compile=compile_choice, streaming_mode=streaming_mode, n_sink=2, window_size=8,
                              position_mode="pos_shift")
    wrapper, _ = cli_common.wrapper_from_args(args)
    assert type(wrapper).__name__ == expected and wrapper.cache.streaming_mode == streaming_mode
    assert getattr(wrapper, "step_kind", "compiled") == "compiled"  # "always" on CPU: inductor, no CUDA graph


@pytest.mark.parametrize("config_name, compiled", [("LlamaConfig", True), ("MixtralConfig", False)])
def test_compile_auto_on_cuda_compiles_the_step_where_the_wrapper_would(monkeypatch, config_name, compiled):
    """--compile auto (the default) on a CUDA device made FastStreamingWrapper(compile="always"), so a mixture of experts
    had its step compiled, which the wrapper's own "auto" never does (not verified; in float32 transformers' grouped
    expert matmul fails to trace). The CLI's auto is now the wrapper's."""
    import argparse
    from types import SimpleNamespace

    import torch
    import transformers

    from streaming_llm import cli_common, fast
    from streaming_llm.fast import compiles_step

    config = getattr(transformers, config_name)()
    model = SimpleNamespace(config=config, parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]))
    made = {}
    monkeypatch.setattr(cli_common, "load_from_args", lambda args: (model, None))
    monkeypatch.setattr(fast, "FastStreamingWrapper", lambda model, **options: made.update(options) or "fast")
    args = argparse.Namespace(compile="auto", streaming_mode="ours", n_sink=2, window_size=8, position_mode="pos_shift")
    assert cli_common.wrapper_from_args(args)[0] == "fast"
    assert compiles_step(made["compile"], "cuda", config) is compiled


def test_generate_sampling_is_reproducible_with_a_seed(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "-p", "x", "--max-new-tokens", "20", "--ignore-eos", "--json", "--temperature", "1.0"]
    texts = [json.loads(run_main(capsys, *argv, "--seed", str(seed))[1])["text"] for seed in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


def test_generate_takes_the_prompt_as_its_argument_as_it_takes_it_from_the_option(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "8", "--ignore-eos", "--json", "--chat-template", "off"]
    given = json.loads(run_main(capsys, *argv, "The prompt as an argument")[1])
    option = json.loads(run_main(capsys, *argv, "--prompt", "The prompt as an argument")[1])
    other = json.loads(run_main(capsys, *argv, "Another prompt")[1])
    same = ("text", "prompt_tokens", "new_tokens", "stop_reason")
    assert [given[key] for key in same] == [option[key] for key in same]
    assert given["prompt_tokens"] != other["prompt_tokens"]


def test_an_unknown_option_after_a_prompt_is_not_taken_for_prompt_words(capsys):
    status, out, err = run_main(capsys, "generate", "x", "--outptu", "3")
    assert_one_line_error(status, err, "unrecognized arguments: --outptu 3 (see streaming-llm generate --help)")


def test_generate_stop_string_and_prompt_file_from_stdin(model_dir, capsys, monkeypatch):
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "30", "--ignore-eos", "--json", "--chat-template", "off"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("The prompt from stdin"))
    full = json.loads(run_main(capsys, *argv, "--prompt-file", "-")[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("The prompt from stdin"))
    dash = json.loads(run_main(capsys, *argv, "-")[1])  # `generate -` reads stdin too
    assert (dash["prompt_tokens"], dash["text"]) == (full["prompt_tokens"], full["text"])
    stop = full["text"][10:14]
    monkeypatch.setattr(sys, "stdin", io.StringIO("The prompt from stdin"))
    cut = json.loads(run_main(capsys, *argv, "--prompt-file", "-", "--stop", stop)[1])
    assert cut["stop_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]


# -- chat ---------------------------------------------------------------------------------------------
def check_answers(path: Path, script: Path) -> list[dict]:
    answers = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = []
    for line in script.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompts += record.get("turns", [record.get("prompt")])
    assert [answer["prompt"] for answer in answers] == prompts and len(answers) == 20
    assert all(answer["new_tokens"] >= 1 and isinstance(answer["answer"], str) for answer in answers)
    assert answers[0]["question_id"] == 0 and answers[1]["turn"] == 1
    seen = [answer["tokens_seen"] for answer in answers]
    assert seen == sorted(seen) and seen[-1] > 4 * CAPACITY  # one conversation, several times the capacity
    assert all(answer["cache_length"] == min(answer["tokens_seen"], CAPACITY) for answer in answers)
    return answers


def test_chat_script_20_turns_records_every_answer(model_dir, script_file, tmp_path, capsys):
    output = tmp_path / "answers.jsonl"
    status, out, err = run_main(
        capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--script", str(script_file), "--output", str(output),
        "--max-new-tokens", "24", "--json",
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["answers"] == 20 and summary["cache_length"] == CAPACITY
    answers = check_answers(output, script_file)
    assert summary["tokens_seen"] == answers[-1]["tokens_seen"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, lambda: SystemExit(143)], ids=["ctrl_c", "sigterm"])
def test_an_interrupted_chat_script_keeps_its_finished_answers_beside_the_output(model_dir, script_file, tmp_path,
                                                                                capsys, monkeypatch, interruption):
    """Ctrl-C or SIGTERM in a long --script run lost every answer (--output is written when the script completes).
    The finished ones now go to answers.partial.jsonl, as a whole run would have recorded them; --output itself is
    not written. A later run that completes removes that partial file."""
    from streaming_llm.generation import StreamingChat

    output = tmp_path / "answers.jsonl"
    argv = ["chat", "--model", str(model_dir), *CACHE_OPTIONS, "--script", str(script_file), "--output", str(output),
            "--max-new-tokens", "6", "--json", "--quiet"]
    assert run_main(capsys, *argv)[0] == 0
    whole = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    output.unlink()

    plain_send, calls = StreamingChat.send, itertools.count()

    def send(self, prompt):
        if next(calls) == 3:  # during the fourth answer
            raise interruption()
        return plain_send(self, prompt)

    monkeypatch.setattr(StreamingChat, "send", send)
    status, out, err = run_main(capsys, *argv)
    partial = tmp_path / "answers.partial.jsonl"
    assert status == (130 if interruption is KeyboardInterrupt else 143) and out == ""
    assert f"chat: interrupted after 3 of 20 answers; those are in {partial}" in err
    assert not output.exists()
    kept = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    unstable = ("seconds",)
    assert [{k: v for k, v in a.items() if k not in unstable} for a in kept] == [
        {k: v for k, v in a.items() if k not in unstable} for a in whole[:3]]

    monkeypatch.setattr(StreamingChat, "send", plain_send)
    assert run_main(capsys, *argv)[0] == 0
    assert output.is_file() and not partial.exists()


def test_chat_script_subprocess(model_dir, script_file, tmp_path):
    output = tmp_path / "answers.jsonl"
    result = run_subprocess(
        "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--script", str(script_file), "-o", str(output),
        "--max-new-tokens", "24", "--temperature", "0.7", "--seed", "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("USER: ") == 20 and result.stdout.count("ASSISTANT: ") == 20
    check_answers(output, script_file)


def test_interactive_chat_commands(model_dir, capsys, monkeypatch):
    typed = "Hello there\n/stats\nTell me more\n/reset\n/stats\n/nonsense\nAgain\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "8")
    assert status == 0, err
    assert "> Hello there" in out and "> Again" in out and "never read" not in out
    stats_lines = [line for line in out.splitlines() if line.startswith("[stats]")]
    assert stats_lines[0].startswith("[stats] 1 turns") and stats_lines[1].startswith("[stats] 0 turns, 0 tokens seen")
    assert "unknown command /nonsense" in out


class TypedInput(io.StringIO):
    """stdin at a terminal, as far as isatty() tells."""

    def isatty(self):
        return True


def test_interactive_chat_on_a_terminal_prompts_and_ends_on_ctrl_d(model_dir, capsys, monkeypatch):
    """On a terminal (stdin.isatty(): never under pytest or in CI, so every other chat test took the piped branch) a
    line is read with input("> "), echoed by the terminal and not again; Ctrl-D (EOF) ends the chat on a new line."""
    monkeypatch.setattr(sys, "stdin", TypedInput("Hello there\n/stats\n"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "8")
    assert status == 0, err
    assert out.startswith("> ") and "> Hello there" not in out  # piped input is echoed as "> Hello there"
    assert "\n\n> [stats] 1 turns" in out and out.endswith("> \n")  # each line prompted; the EOF's newline


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_typed_chat_with_stdout_in_a_file_prompts_on_stderr(model_dir, capsys, monkeypatch, json_lines):
    """Typed at a terminal with stdout in a file or a pipe (`chat --json > answers.jsonl`), the prompt "> " went into
    that file, ahead of every answer (breaking its JSON lines), and the person typing saw none; it goes to stderr."""
    monkeypatch.setattr(sys, "stdin", TypedInput("Hello there\nTell me more\n"))
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "8",
                                *(["--json"] if json_lines else []))
    assert status == 0, err
    assert not out.startswith(">") and err == "> > > \n"  # a prompt for each line and the one Ctrl-D answered
    if json_lines:
        assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hello there", "Tell me more"]


def test_interactive_chat_at_a_terminal_edits_lines(model_dir):
    """Typed at a terminal, a line is edited with readline: without it, arrow keys reached the model as escape codes,
    a pasted line was cut at the terminal's 4,095 bytes, and a paste of several lines was sent as one message per
    line; with bracketed paste it is one message, sent with Enter."""
    terminal = Terminal("chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "2", "--json")
    terminal.expect(b"> ")
    terminal.send(b"abc\x1b[D\x1b[DX\r")  # two left arrows
    assert terminal.answer()["prompt"] == "aXbc"
    terminal.send(b"\x1b[A\x7f!\r")  # up arrow: the line before, edited
    assert terminal.answer()["prompt"] == "aXb!"
    long_line = "streaming " * 600
    terminal.send(long_line.encode() + b"\r")
    assert terminal.answer()["prompt"] == long_line
    terminal.send(b"\x1b[200~first line\nsecond line\x1b[201~\r")  # a paste of two lines, as the terminal sends it
    assert terminal.answer()["prompt"] == "first line\nsecond line"
    terminal.send(b"\x04")
    assert terminal.close() == 0


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_typed_answer_stops_it_and_the_chat_goes_on(model_dir, capsys, monkeypatch, presses):
    """Ctrl-C while an answer was generated ended the chat (status 130) and the conversation with it. As in other chat
    programs it stops that answer after the token being computed, which stays in the conversation (stop_reason
    "interrupted"), and the next line is answered after it: every token fed once, as the template renders the
    conversation. A second Ctrl-C during the same answer ends the chat, status 130."""
    from streaming_llm.generation import StreamingChat
    from streaming_llm.wrapper import StreamingLLMWrapper

    fed, steps, rendered = [], [], []
    plain_call, plain_send = StreamingLLMWrapper.__call__, StreamingChat.send

    def call(wrapper, input_ids):
        fed.extend(input_ids[0].tolist())
        steps.append(input_ids.shape[1] == 1)
        third_step = steps[-1] and sum(steps) == 3
        if third_step:
            os.kill(os.getpid(), signal.SIGINT)  # as a ^C typed at the terminal, while the model runs
        logits = plain_call(wrapper, input_ids)
        if third_step and presses == 2:
            os.kill(os.getpid(), signal.SIGINT)  # again, once the first one was taken
        return logits

    def send(chat, user_text, max_new_tokens=None):
        with contextlib.closing(plain_send(chat, user_text, max_new_tokens)) as answer:
            for index, piece in enumerate(answer):
                if index == 0:
                    template = chat.tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
                    rendered.append(chat.tokenizer.decode(fed, skip_special_tokens=False) == template)
                yield piece

    monkeypatch.setattr(StreamingLLMWrapper, "__call__", call)
    monkeypatch.setattr(StreamingChat, "send", send)
    monkeypatch.setattr(sys, "stdin", TypedInput("Hello there\nTell me more\n"))
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "20", "--json")
    if presses == 2:
        assert status == 130 and out == "" and "Traceback" not in err
        return
    assert status == 0, err
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first["stop_reason"] == "interrupted" and first["new_tokens"] == 4  # the token sampled after the third step
    assert second["stop_reason"] == "length" and second["turns"] == 2 and second["tokens_seen"] == len(fed)
    assert rendered == [True, True]


def test_typed_chat_in_a_thread_other_than_the_main_one(model_dir, capsys, monkeypatch):
    """main() called from another thread (only the main thread may set a signal handler): a chat typed at a terminal
    failed on its first answer ("signal only works in main thread"); it is answered, Ctrl-C being the main thread's."""
    import threading

    monkeypatch.setattr(sys, "stdin", TypedInput("Hello there\nTell me more\n"))
    statuses = []
    thread = threading.Thread(target=lambda: statuses.append(
        cli.main(["chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "4", "--json"])))
    thread.start()
    thread.join()
    out, err = capsys.readouterr()
    assert statuses == [0], err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hello there", "Tell me more"]


def test_ctrl_c_at_a_terminal_stops_the_answer(model_dir):
    """At a terminal: ^C during an answer says so and shows the prompt again, the conversation goes on with the answer
    as far as it went, and the terminal's settings are left as they were. (^C at the prompt ends the chat, status 130,
    as test_keyboard_interrupt_exits_130_without_traceback checks; not typed here: CPython's readline does not see a
    SIGINT that arrives between showing the prompt and waiting for a key until Enter.)"""
    terminal = Terminal("chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "100000")
    terminal.expect(b"> ")
    terminal.send(b"Hello there\r")
    terminal.expect(rb"Hello there\r\n.{40}")  # the answer is being written
    terminal.send(b"\x03")
    terminal.expect(rb"\[answer stopped \(Ctrl-C\)[^\n]*\n[^>]*> ")
    terminal.send(b"/stats\r")
    terminal.expect(rb"\[stats\] 1 turns[^\n]*\(interrupted\)[^>]*> ")
    terminal.send(b"\x04")
    assert terminal.close() == 0 and b"Traceback" not in terminal.output
    assert terminal.settings_left == terminal.settings


def test_interactive_chat_json_is_one_object_per_line(model_dir, capsys, monkeypatch):
    """With --json, stdout is JSON lines: one object per answer and per /stats (it mixed the echoed input and the
    answer text with the JSON /stats lines); an unknown command goes to stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/stats\n/nonsense\nTell me more\n"))
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "8", "--json")
    assert status == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o.get("prompt") for o in objects] == ["Hello there", None, "Tell me more"]
    assert objects[0]["new_tokens"] == 8 and objects[0]["turns"] == 1 and objects[2]["turns"] == 2
    assert isinstance(objects[0]["answer"], str) and objects[1]["turns"] == 1 and objects[1]["last_answer_tokens"] == 8
    assert "unknown command /nonsense" in err


# -- info and the parser ----------------------------------------------------------------------------------
def test_info_json(model_dir, capsys):
    status, out, _ = run_main(capsys, "info", "--model", str(model_dir), "--window-size", "100", "--position-mode", "rerotate", "--json")
    assert status == 0
    info = json.loads(out)
    assert info["model_type"] == "llama" and info["layers"] == 2 and info["head_dim"] == 16 and info["rotary_ndims"] == 16
    assert info["cache_capacity"] == 104 and info["position_mode"] == "rerotate" and info["max_positions"] == 4096
    assert info["chat_template"] is True and set(info["versions"]) >= {"python", "torch", "transformers", "streaming_llm"}
    assert info["resolved"] == str(Path(model_dir).resolve())  # the folder, made absolute (not the embedded GGUF)
    # per layer: keys and values of 104 + 1 slots and the 4 sinks' own keys, fp32
    slot_bytes = info["kv_heads"] * 16 * 4
    assert info["kv_cache_mib"] == round(2 * (2 * 105 + 4) * slot_bytes / 2**20, 2)
    # the smallest valid cache: no sinks (window attention) and a window of one token
    status, out, _ = run_main(capsys, "info", "--model", str(model_dir), "--n-sink", "0", "--window-size", "1", "--json")
    assert status == 0 and json.loads(out)["cache_capacity"] == 1


def test_info_of_a_model_without_sliding_layers_in_half_precision(model_dir, capsys):
    """A Llama has no layer with its own window (sliding_layers 0, sliding_window null) and none without RoPE; the KV
    cache size is in the dtype the model is loaded in: bfloat16 keys and values take half the bytes of float32."""
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        status, out, _ = run_main(capsys, "info", "--model", str(model_dir), "--window-size", "1000", "--dtype", dtype,
                                  "--json")
        assert status == 0
        info = json.loads(out)
        assert (info["sliding_layers"], info["sliding_window"], info["layers_without_rope"], info["rotary_pairs"]) == (
            0, None, 0, "rotate_half (i, i+d/2)")
        sizes[dtype] = info["kv_cache_mib"]
    slot_bytes = info["kv_heads"] * 16 * 2  # per layer: keys and values of 1004 + 1 slots and the 4 sinks' own keys
    assert sizes == {"float32": round(2 * (2 * 1005 + 4) * 2 * slot_bytes / 2**20, 2),
                     "bfloat16": round(2 * (2 * 1005 + 4) * slot_bytes / 2**20, 2)}


def test_help_lists_the_commands(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0 and all(name in out for name in ("generate", "chat", "info"))
    status, out, _ = run_main(capsys, "generate", "--help")
    assert status == 0 and "--window-size" in out and "--repetition-penalty" in out


def test_version_names_the_package_version(capsys):
    """`streaming-llm --version` (there was none: a bug report could not say which release it ran)."""
    import tomllib
    from pathlib import Path

    version = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    status, out, err = run_main(capsys, "--version")
    assert (status, out, err) == (0, f"streaming-llm {version}\n", "")


def test_every_option_of_every_command_is_described_with_its_default(capsys):
    """`plot --title` had no help at all, and `bench --shape` (embedded) and `--stream-tokens` (0) did not say their
    defaults; an option whose default is a value (not None, off or empty) names it in its help."""
    import argparse

    parser = cli.build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    assert {"eval", "plot", "bench"} <= set(commands)  # the optional commands are installed here
    for name, command in commands.items():
        status, _, _ = run_main(capsys, name, "--help")
        assert status == 0, name
        assert_options_described(command, name)


def assert_options_described(parser, name: str) -> None:
    """Every option of `parser` (the program `name`) has help, and one whose default is a value (not None, off or
    empty) names it there; where the help writes "(default X", X is that value (`plot --smooth` wrote its 256 by
    hand)."""
    import argparse
    import re

    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = f"{name} {action.option_strings or action.dest}"
        assert action.help, f"{label} has no help"
        if action.default not in (None, False, []):
            assert "default" in action.help, f"{label} does not say its default {action.default!r}"
            stated = re.search(r"\(default:? ([^);]+)", action.help)
            if stated:
                value = action.default
                if isinstance(value, (int, float)):
                    number = re.match(r"-?[\d.]+", stated[1])
                    agrees = number is not None and float(number[0]) == value
                else:
                    agrees = stated[1].startswith(",".join(map(str, value)) if isinstance(value, list) else value)
                assert agrees, f"{label} says its default is {stated[1]!r}, not {value!r}"


def test_missing_optional_commands_are_skipped(monkeypatch, capsys):
    monkeypatch.setattr(cli, "OPTIONAL_COMMANDS", ("streaming_llm.no_such_package.command",))
    assert set(cli.build_parser().parse_args(["info"]).command_names) == {"generate", "chat", "info"}


@pytest.mark.parametrize("methods", ["kvpress_decode_shipped", "all"])
def test_a_kvpress_method_without_kvpress_is_one_line_before_the_model_loads(methods, monkeypatch, capsys):
    """A wheel installed without the [kvpress] extra: a traceback after the model had loaded and the other
    methods had run; now refused first (the missing model path below would be the error otherwise)."""
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "streaming_llm.eval.kvpress_adapters", raising=False)
    status, out, err = run_main(capsys, "eval", "--model", "./no/such/model", "--methods", methods)
    assert_one_line_error(status, err, "kvpress_decode_shipped")
    assert "cannot be imported" in err and "pip install 'streaming-llm[kvpress]'" in err and out == ""


# -- errors: one line, exit status 2 ----------------------------------------------------------------------
def test_progress_goes_to_a_terminal_unless_quiet(monkeypatch):
    import argparse

    from streaming_llm.cli_common import model_label, show_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(argparse.Namespace(quiet=False)) and show_progress(argparse.Namespace())
    assert not show_progress(argparse.Namespace(quiet=True))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # piped or captured: only warnings and the error
    assert not show_progress(argparse.Namespace(quiet=False))
    assert model_label(argparse.Namespace(model=None)) == "SmolLM2-135M-Instruct (embedded)"
    assert model_label(argparse.Namespace(model="EleutherAI/pythia-70m")) == "EleutherAI/pythia-70m"


def test_thread_counts_are_taken_up_to_four_per_core():
    import argparse

    from streaming_llm.cli_common import MAX_THREADS, validate_common_args

    for threads in (1, MAX_THREADS):
        validate_common_args(argparse.Namespace(threads=threads))
    for threads in (0, MAX_THREADS + 1):
        with pytest.raises(ValueError, match=f"--threads must be between 1 and {MAX_THREADS} \\(4 per core\\), got {threads}"):
            validate_common_args(argparse.Namespace(threads=threads))


@pytest.mark.parametrize("swallowed_as", [None, ImportError])
def test_ctrl_c_while_loading_ends_the_command_even_where_transformers_swallows_it(model_dir, capsys, monkeypatch,
                                                                                   swallowed_as):
    """Ctrl-C while transformers reads a tokenizer could be lost: its `except import_protobuf_decode_error():`
    raises ImportError in place of the KeyboardInterrupt (without protobuf), which AutoTokenizer catches and then
    loads another tokenizer class. The command went on, generating with a wrong tokenizer (exit status 0), or ended
    with a "could not load model" error about protobuf; Ctrl-C ends it with status 130 and no output."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained

    def interrupted_read(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C pressed while the tokenizer is read
        except KeyboardInterrupt:
            if swallowed_as is not None:
                raise swallowed_as("requires the protobuf library") from None
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", interrupted_read)
    status, out, err = run_main(capsys, "generate", "--model", str(model_dir), "-p", "hi", "--max-new-tokens", "2",
                                *CACHE_OPTIONS)
    assert (status, out, err) == (130, "", "\n")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "-p", "x", "--window-size", "-5"], "--window-size must be >= 1"),
        (["chat", "--n-sink", "-1"], "--n-sink must be >= 0"),
        (["generate", "--model", "./no/such/model", "-p", "x"], "model path not found"),
        (["generate", "--model", "no_such_model.gguf", "-p", "x"], "GGUF file not found"),
        (["generate", "--prompt-file", "no/such/prompt.txt"], "prompt file not found: no/such/prompt.txt"),
        (["generate"], "give the prompt"),
        (["chat", "--script", "no/such/prompts.jsonl"], "script not found"),
        (["generate", "-p", "x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["generate", "-p", "x", "--position-mode", "sideways"], "invalid choice"),
        (["generate", "-p", "x", "--compile", "always", "--streaming-mode", "mit"], "--compile always needs --streaming-mode ours"),
        (["generate", "-p", "x", "--device", "tpu"], "--device must be"),
        (["generate", "--prompt", "x", "--prompt-file", "y"], "not allowed with argument"),
        (["generate", "x", "--prompt-file", "y"], "argument --prompt-file/-f: not allowed with argument PROMPT"),
        (["generate", "Once", "upon", "a"], "unrecognized arguments: upon a; a prompt of several words is one argument: quote it"),
        (["generate", "--prompt-file", "."], "prompt file is a folder, not a file: ."),
        (["generate", "-p", "x", "--temperature", "inf"], "--temperature must be >= 0 and finite"),
        (["generate", "-p", "x", "--repetition-penalty", "nan"], "--repetition-penalty must be > 0 and finite"),
        (["generate", "-p", "x", "--seed", "99999999999999999999999"], "--seed must be an integer in [0, 2**63)"),
        (["generate", "-p", "x", "--seed", "-1"], "--seed must be an integer in [0, 2**63)"),
        (["generate", "-p", "x", "--repetition-window", "99999999999999999999"], "--repetition-window must be < 2**31"),
        (["chat", "--repetition-window", str(2**31)], "--repetition-window must be < 2**31, got 2147483648"),
        (["generate", "-p", "x", "--threads", "100000"], "--threads must be between 1 and"),
        (["generate", "-p", "\udcff\udcfe"], "--prompt is not UTF-8 text (byte offset 0)"),
        (["chat", "--system", "caf\udce9"], "--system is not UTF-8 text (byte offset 3)"),
        (["frobnicate"], "invalid choice"),
        ([], "choose a command"),
        # before the model is loaded (the default, embedded one here): these came after it, or not at all
        (["generate", "-p", "x", "--stop", ""], "--stop needs a non-empty text"),
        (["generate", "-p", "x", "--chat-template", "off", "--system", "Be brief."], "--system needs the chat template"),
        (["generate", "-p", "", "--chat-template", "off"], "the prompt is empty"),  # generated from BOS alone
        (["generate", "-p", " \n"], "the prompt is empty"),
    ],
)
def test_bad_options_give_one_line_and_status_2(argv, fragment, capsys):
    status, out, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, fragment)
    assert out == ""


def test_errors_found_after_loading(model_dir, tmp_path, capsys):
    status, _, err = run_main(capsys, "generate", "--model", str(model_dir), "-p", "x", "--window-size", "5000")
    assert_one_line_error(status, err, "too large for the model's max_position_embeddings=4096")
    bad_script = tmp_path / "bad.jsonl"
    bad_script.write_text('{"prompt": "fine"}\n{"no_prompt": 1}\n', encoding="utf-8")
    status, _, err = run_main(capsys, "chat", "--model", str(model_dir), "--script", str(bad_script))
    assert_one_line_error(status, err, "line 2: needs a \"prompt\" string")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    status, _, err = run_main(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(latin1))
    assert_one_line_error(status, err, "is not UTF-8 text")


def test_the_chat_template_option_decides_how_the_prompt_is_fed(model_dir, tmp_path, capsys):
    """auto and on wrap the prompt in the template (more tokens than the bare prompt), off feeds it bare; a folder
    whose tokenizer has no template takes auto as off and refuses on; --system needs the template."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (plain / name).symlink_to(model_dir / name)
    prompt_tokens = {}
    for model, choice in ((model_dir, "auto"), (model_dir, "on"), (model_dir, "off"), (plain, "auto")):
        status, out, err = run_main(capsys, "generate", "--model", str(model), "-p", "Hello there", "--max-new-tokens",
                                    "1", "--json", "--chat-template", choice)
        assert status == 0, err
        prompt_tokens[model.name, choice] = json.loads(out)["prompt_tokens"]
    assert prompt_tokens[model_dir.name, "auto"] == prompt_tokens[model_dir.name, "on"]
    assert prompt_tokens[model_dir.name, "on"] > prompt_tokens[model_dir.name, "off"] == prompt_tokens["plain", "auto"]
    status, _, err = run_main(capsys, "generate", "--model", str(plain), "-p", "x", "--chat-template", "on")
    assert_one_line_error(status, err, f"--chat-template on: the tokenizer of {plain} has no chat template")
    status, _, err = run_main(capsys, "generate", "--model", str(model_dir), "-p", "x", "--chat-template", "off",
                              "--system", "Be brief.")
    assert_one_line_error(status, err, "--system needs the chat template")


def test_broken_model_folders_are_one_line_errors(model_dir, tmp_path, capsys):
    """A folder without tokenizer files once ran with an empty 8-token tokenizer; corrupt weights gave a traceback."""
    no_tokenizer, bad_weights = tmp_path / "no_tok", tmp_path / "bad_weights"
    for folder in (no_tokenizer, bad_weights):
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).symlink_to(model_dir / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bad_weights / name).symlink_to(model_dir / name)
    (bad_weights / "model.safetensors").unlink()
    (bad_weights / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    for argv in (["generate", "-p", "x"], ["info"]):
        status, out, err = run_main(capsys, *argv, "--model", str(no_tokenizer))
        assert_one_line_error(status, err, f"{no_tokenizer} has no tokenizer (tokenizer.json, tokenizer.model")
        assert out == ""
    status, _, err = run_main(capsys, "info", "--model", str(bad_weights))
    assert_one_line_error(status, err, f"could not load model '{bad_weights}' (a corrupt or truncated file?): SafetensorError")


def test_mps_without_mps_is_a_one_line_error(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    status, _, err = run_main(capsys, "info", "--device", "mps")
    assert_one_line_error(status, err, "device 'mps' requested but MPS is not available")


def test_text_that_is_not_utf8_is_refused_by_name(model_dir, tmp_path, capsys, monkeypatch):
    """Python carries undecodable bytes (argv, stdin) as surrogate escapes and JSON "\\ud800" as a lone surrogate;
    the tokenizer refused them with a TypeError traceback."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\udce9 au lait\n"))
    status, _, err = run_main(capsys, "generate", "--model", str(model_dir), "-f", "-")
    assert_one_line_error(status, err, "prompt file (stdin) is not UTF-8 text (byte offset 3)")
    script = tmp_path / "surrogate.jsonl"
    script.write_text('{"prompt": "fine"}\n{"prompt": "a\\ud800b"}\n', encoding="utf-8")
    status, _, err = run_main(capsys, "chat", "--model", str(model_dir), "--script", str(script))
    assert_one_line_error(status, err, "surrogate.jsonl line 2: a string holds a lone surrogate")
    # Interactive chat reports the line and goes on.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\ncaf\udce9\n/stats\n"))
    status, out, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--max-new-tokens", "4")
    assert status == 0 and "[stats] 1 turns" in out
    assert err.strip() == "streaming-llm: error: input line 2 is not UTF-8 text (byte offset 3); line ignored"


def test_non_utf8_stdin_subprocess(model_dir):
    """The real bytes through the console script: `printf 'caf\\xe9' | streaming-llm generate -f -`."""
    script = Path(sys.executable).with_name("streaming-llm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "streaming_llm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command + ["generate", "--model", str(model_dir), "-f", "-"], input=b"caf\xe9 au lait\n",
                            capture_output=True, env=env, timeout=300)
    assert_one_line_error(result.returncode, result.stderr.decode(), "prompt file (stdin) is not UTF-8 text (byte offset 3)")


def test_utf8_text_a_c_locale_decoded_as_ascii_is_taken_as_the_text_it_is(model_dir):
    """With PYTHONUTF8=0 in the C locale Python decodes argv (and a terminal's stdin) as ASCII, carrying every byte
    over 127 as a surrogate escape: a UTF-8 prompt, --system or --stop was refused as "not UTF-8 text". The bytes are
    read back and taken as UTF-8; bytes that are not UTF-8 are still refused, at their offset."""
    assert cli.require_utf8("Café".encode().decode("ascii", "surrogateescape"), "--prompt", "ascii") == "Café"
    with pytest.raises(ValueError, match=r"--stop is not UTF-8 text \(byte offset 3\)"):
        cli.require_utf8(b"caf\xe9".decode("ascii", "surrogateescape"), "--stop", "ascii")
    script = Path(sys.executable).with_name("streaming-llm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "streaming_llm.cli"]
    command += ["generate", "--model", str(model_dir), "-p", "Café naïf", "--stop", "é", "--max-new-tokens", "6"]
    outputs = []
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUTF8"}
    for locale in ({}, {"PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}):
        env = {**environment, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **locale}
        result = subprocess.run(command, capture_output=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr.decode()
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]


def test_an_empty_prompt_file_is_named(tmp_path, capsys):
    """A prompt file of whitespace only is refused before the model is loaded, naming the file."""
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    status, out, err = run_main(capsys, "generate", "--model", "./no/such/model", "--prompt-file", str(empty))
    assert_one_line_error(status, err, f"the prompt file {empty} is empty")
    assert out == ""


@pytest.mark.parametrize("output, fragment", [
    ("{tmp}", "--output {tmp} is a folder: give a file path"),
    ("", "--output is empty"),
    ("{script}/answers.jsonl", "--output {script}/answers.jsonl: {script} is a file, not a folder"),
    ("{script}/sub/answers.jsonl", "--output {script}/sub/answers.jsonl: {script} is a file, not a folder"),
    ("/dev/null", "--output /dev/null is not a regular file"),
    # the answers replaced the prompts, with no warning
    ("{script}", "--output {script} is the --script file: the answers would replace the prompts"),
    ("{tmp}/./{script.name}", "--output {tmp}/{script.name} is the --script file"),
])
def test_chat_output_is_checked_before_the_model_loads(output, fragment, script_file, tmp_path, capsys):
    """It was only written after the whole script, failing then on an internal temporary file."""
    names = {"tmp": tmp_path, "script": script_file}
    output, fragment = output.format(**names), fragment.format(**names)
    status, _, err = run_main(capsys, "chat", "--model", "./no/such/model", "--script", str(script_file), "--output", output)
    assert_one_line_error(status, err, fragment)


def test_a_refused_chat_leaves_no_folder_for_its_output(script_file, tmp_path, capsys):
    """--output's folder was created when --output was checked, so a run refused afterwards (here the model) left an
    empty new folder behind."""
    output = tmp_path / "new" / "sub" / "answers.jsonl"
    status, _, err = run_main(capsys, "chat", "--model", "./no/such/model", "--script", str(script_file), "--output", str(output))
    assert_one_line_error(status, err, "no/such/model")
    assert sorted(path.name for path in tmp_path.iterdir()) == [script_file.name]


def test_chat_output_with_a_leading_tilde_is_written_in_the_home_folder(model_dir, tmp_path, capsys, monkeypatch):
    """`--output=~/answers.jsonl` was checked as ~/answers.jsonl, then written to ./~/answers.jsonl."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "one.jsonl"
    script.write_text('{"prompt": "Hello"}\n', encoding="utf-8")
    status, _, err = run_main(capsys, "chat", "--model", str(model_dir), *CACHE_OPTIONS, "--script", str(script),
                              "--max-new-tokens", "2", "--output", "~/answers.jsonl")
    assert status == 0, err
    assert (home / "answers.jsonl").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "a", "turns": ["b"]}', 'line 2: has both "prompt" and "turns"'),
    ('{"prompt": "a", "score": NaN}', "line 2: NaN is not a number"),
    ('{"prompt": "a", "score": -Infinity}', "line 2: -Infinity is not a number"),
    ('{"prompt": "a", "score": 1e999}', "line 2: the number 1e999 is out of range"),
    ('{"turns": []}', 'line 2: needs a "prompt" string or a non-empty "turns" list of strings'),
    ('{"turns": "one turn"}', 'line 2: needs a "prompt" string'),
    ('{"turns": ["a", 2]}', 'line 2: needs a "prompt" string'),
    ('{"prompt": 7}', 'line 2: needs a "prompt" string'),
    ('["a"]', 'line 2: needs a "prompt" string'),
    ('{"prompt": ""}', "line 2: a prompt is empty"),  # sent as an empty message; the interactive chat skips one
    ('{"turns": ["a", " "]}', "line 2: a prompt is empty"),
    ('{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: nested too deeply"),  # RecursionError
])
def test_script_lines_that_would_lose_or_corrupt_data_are_refused(line, fragment, tmp_path, capsys):
    """A prompt next to turns was dropped; NaN was copied into --output as bare NaN, which is not JSON."""
    script = tmp_path / "script.jsonl"
    script.write_text('{"prompt": "fine", "score": 1.5}\n' + line + "\n", encoding="utf-8")
    status, _, err = run_main(capsys, "chat", "--model", "./no/such/model", "--script", str(script))
    assert_one_line_error(status, err, fragment)


def test_prompt_file_may_be_a_pipe_or_a_device(tmp_path):
    """`-f <(cmd)` (a pipe) and `-f /dev/null` were refused as "not a file"."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as handle:
            handle.write("from a pipe")

    threading.Thread(target=write, daemon=True).start()
    assert cli.read_text_file(str(fifo), "prompt file") == "from a pipe"
    assert cli.read_text_file(os.devnull, "prompt file") == ""


def test_keyboard_interrupt_exits_130_without_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_generate", interrupted)
    status, _, err = run_main(capsys, "generate", "-p", "x")
    assert status == 130 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "-p", "x", "--window-size", "-5"], "--window-size must be >= 1"),
        (["generate", "--model", "no-such-org/no-such-model", "-p", "x"], "could not load model 'no-such-org/no-such-model'"),
        (["info", "--model", "no-such-org/no-such-model"], "(and there is no local folder no-such-org/no-such-model)"),
        (["generate", "--prompt-file", "no/such/prompt.txt"], "prompt file not found"),
    ],
)
def test_bad_options_subprocess(argv, fragment):
    result = run_subprocess(*argv)
    assert_one_line_error(result.returncode, result.stderr, fragment)
