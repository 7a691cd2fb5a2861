"""Behaviour of the command line (streaming_llm/cli.py) that the sixth mutation round found untested.

Each test here fails on at least one small change to cli.py (a flipped `and`, a changed fallback) that the rest of the
suite let through. They run the command in-process (cli.main) or call its helpers directly.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
from types import SimpleNamespace

import pytest

from streaming_llm import cli, cli_common


def test_a_stray_dash_is_named_without_guessing_an_option(capsys):
    """Only an unknown --option is matched against the options it begins; a stray "-" (or any word) is not, as every
    option begins with "-"."""
    assert cli.main(["info", "-"]) == 2
    assert capsys.readouterr().err == "streaming-llm: error: unrecognized arguments: - (see streaming-llm info --help)\n"
    assert cli.main(["info", "--windo", "8"]) == 2
    assert "unrecognized arguments: --windo 8; did you mean --window-size? (see" in capsys.readouterr().err


def broken_optional_commands(monkeypatch) -> list[str]:
    """Importing an optional command's module fails as where a package it needs is missing; the names tried."""
    real_import, tried = importlib.import_module, []

    def import_module(name, package=None):
        if name in cli.OPTIONAL_COMMANDS:
            tried.append(name)
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    return tried


def test_a_missing_dependency_of_an_optional_command_is_raised_not_taken_for_a_missing_command(monkeypatch):
    """A subcommand is skipped only where its own package is absent; a module that package needs and cannot find is
    a broken install, and says so, rather than the command silently disappearing."""
    broken_optional_commands(monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        cli.build_parser()


@pytest.mark.parametrize("argv", [["generate", "-p", "x", "--max-new-tokens", "0"], ["chat", "--max-new-tokens", "0"],
                                  ["info", "--window-size", "0"]])
def test_generate_chat_and_info_never_import_the_optional_commands(monkeypatch, capsys, argv):
    """The command's own subcommands build their parser without eval's and bench's modules, whatever options follow
    the command's name: a broken eval or bench install leaves them working (here, to their usage error)."""
    tried = broken_optional_commands(monkeypatch)
    assert cli.main(argv) == 2 and "must be >= 1" in capsys.readouterr().err
    assert tried == []


def test_stdin_typed_at_a_terminal_is_taken_back_to_bytes_with_the_terminals_encoding(monkeypatch):
    """UTF-8 typed at a terminal whose encoding is another (cp1252 here: "Á" is the bytes C3 81, read as "Ã" and an
    escape of the undefined 81) is the text it is: the bytes are recovered with the encoding they were read with."""
    stdin = io.TextIOWrapper(io.BytesIO("Á\n".encode("utf-8")), encoding="cp1252", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.stdin_encoding() == "cp1252"
    assert cli.read_text_file("-", "prompt file") == "Á\n"


def generate_json(monkeypatch, capsys, tokenizer, *options: str) -> dict:
    """`generate --json` of a tiny random Llama with `tokenizer` (a 2 + 8 token cache), as a dict."""
    from tiny_models import build_llama

    monkeypatch.setattr(cli_common, "load_from_args", lambda args: (build_llama(), tokenizer))
    status = cli.main(["generate", "-p", "hello", "--json", "--n-sink", "2", "--window-size", "8", "--compile", "never",
                       *options])
    assert status == 0
    return json.loads(capsys.readouterr().out)


def test_a_templated_prompt_ends_by_opening_the_assistants_turn(monkeypatch, capsys):
    """With the chat template, the prompt is the user's message and the assistant's header, so that the model answers
    rather than continues the user's message."""
    from tiny_models import tokenizer_of

    tokenizer = tokenizer_of(["[UNK]", "user:", "assistant:", "hello"])
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    assert generate_json(monkeypatch, capsys, tokenizer, "--max-new-tokens", "1")["prompt_tokens"] == 3


def test_a_short_generation_reports_the_cache_length_it_ends_with_as_its_most(monkeypatch, capsys):
    """max_cache_length is the most the cache held: at the end of a stream shorter than the checking interval, the
    length it ends with (not the 0 it starts from)."""
    from tiny_models import tokenizer_of

    stats = generate_json(monkeypatch, capsys, tokenizer_of(["[UNK]", "hello"]), "--max-new-tokens", "3",
                          "--chat-template", "off", "--ignore-eos")
    assert stats["new_tokens"] == 3 and stats["cache_length"] == 1 + 2  # the prompt, and the tokens fed after it
    assert stats["max_cache_length"] == stats["cache_length"]


class TimedStream:
    """A generate_stream stand-in that yields `pieces` (one per token) and reports the given seconds and speed."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.prompt_tokens, self.new_tokens, self.stop_reason = 1, 0, "length"
        self.prefill_seconds, self.decode_seconds, self.tokens_per_second = 0.123456789, 1.23456789, 12.3456789

    def __iter__(self):
        for piece in self.pieces:
            self.new_tokens += 1
            yield SimpleNamespace(text=piece)


def test_generate_reports_seconds_to_four_places_and_speed_to_two(monkeypatch, capsys):
    from streaming_llm import generation
    from tiny_models import tokenizer_of

    monkeypatch.setattr(generation, "generate_stream", lambda *args, **kwargs: TimedStream(["ca", "fé"]))
    stats = generate_json(monkeypatch, capsys, tokenizer_of(["[UNK]", "hello"]), "--chat-template", "off")
    assert (stats["text"], stats["new_tokens"], stats["stop_reason"]) == ("café", 2, "length")
    assert (stats["prefill_seconds"], stats["decode_seconds"], stats["tokens_per_second"]) == (0.1235, 1.2346, 12.35)


@pytest.mark.parametrize("returned, expected", [(3, 3), (0, 0), (None, 0)])
def test_the_exit_status_is_the_one_the_commands_handler_returns(monkeypatch, returned, expected):
    """A subcommand's handler (the registered eval, plot and bench ones too) returns its exit status; None is 0."""
    monkeypatch.setattr(cli, "run_info", lambda args: returned)
    assert cli.main(["info"]) == expected


@pytest.mark.parametrize("code, expected, err", [(None, 0, ""), (5, 5, ""), ("no model", 1, "no model\n")])
def test_a_handler_that_calls_sys_exit_ends_the_command_with_that_status(monkeypatch, capsys, code, expected, err):
    """sys.exit() in a handler is a successful end, as for any Python program; sys.exit(N) is status N; and
    sys.exit("message") writes the message to stderr and ends with status 1 (it ended with 0 and no word)."""
    def run_info(args):
        sys.exit(code)

    monkeypatch.setattr(cli, "run_info", run_info)
    assert cli.main(["info"]) == expected
    assert capsys.readouterr().err == err
