"""Behaviour of the command line (streaming_llm/cli_common.py, streaming_llm/cli.py) that no other test pinned down,
found by a mutation-testing audit.

Each test here fails on at least one small change to those files (a flipped comparison, a changed default) that the
rest of the suite let through. They run the command in-process (cli.main) or call the shared helpers directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
from types import SimpleNamespace

import pytest

from streaming_llm import cli, cli_common
from streaming_llm.cli_common import mib_text, print_json, validate_common_args


def fresh_cli_common(monkeypatch, cpu_count: int | None):
    """cli_common imported anew (its module constants computed again) on a machine whose os.cpu_count() is
    `cpu_count`."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    spec = importlib.util.spec_from_file_location("cli_common_anew", cli_common.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- cli_common --------------------------------------------------------------------------------------------
def test_the_cache_defaults_of_the_command_and_the_scripts_are_the_papers():
    """4 sinks and a 1,020-token window (a 1,024-token cache), for `streaming-llm` and the experiment scripts."""
    args = cli.build_parser("generate").parse_args(["generate", "-p", "x"])
    assert (args.n_sink, args.window_size) == (4, 1020)
    script_parser = argparse.ArgumentParser()
    cli_common.add_stream_options(script_parser)
    args = script_parser.parse_args([])
    assert (args.n_sink, args.window_size, args.data, args.model) == (4, 1020, None, None)


def test_threads_are_allowed_up_to_four_per_core_and_four_where_the_cores_are_unknown(monkeypatch):
    assert cli_common.MAX_THREADS == 4 * os.cpu_count()
    assert fresh_cli_common(monkeypatch, 3).MAX_THREADS == 12
    assert fresh_cli_common(monkeypatch, None).MAX_THREADS == 4  # os.cpu_count() may not know


def test_zero_sinks_and_a_one_token_window_are_valid_caches():
    """--n-sink 0 is window attention (the paper's baseline); a window of one token is the smallest cache."""
    validate_common_args(argparse.Namespace(n_sink=0, window_size=1))
    with pytest.raises(ValueError, match="--n-sink must be >= 0 \\(0 = no sinks\\), got -1"):
        validate_common_args(argparse.Namespace(n_sink=-1, window_size=1))
    with pytest.raises(ValueError, match="--window-size must be >= 1, got 0"):
        validate_common_args(argparse.Namespace(n_sink=0, window_size=0))


def test_the_help_of_eval_and_bench_names_the_common_options_they_refuse(capsys):
    """eval and bench list a common option they do not use with the reason they refuse it; plot leaves such options
    out of its help."""
    for command, option, reason in [("eval", "--position-mode", "each method names its positions"),
                                    ("bench", "--window-size", "it times each cache size of --cache-sizes")]:
        assert cli.main([command, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"{option} " in help_text and f"not used by {command} (refused): {reason}" in help_text
    assert cli.main(["plot", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--n-sink" not in help_text and "not used by" not in help_text


class Recorder(io.StringIO):
    """A text stream that keeps what it held at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())
        super().flush()


def test_a_json_line_is_written_as_utf8_text_and_flushed_to_the_stream_given(monkeypatch):
    """--json output keeps non-ASCII text as it is (not \\u escapes), and each object is flushed at once, so a
    program reading a chat's JSON lines from a pipe gets each answer when it is made."""
    stdout, other = Recorder(), Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    print_json({"text": "café 世界"})
    assert stdout.getvalue() == '{"text": "café 世界"}\n' and stdout.flushed == [stdout.getvalue()]
    print_json({"n": 1}, file=other)
    assert other.getvalue() == '{"n": 1}\n' and stdout.getvalue().count("\n") == 1


def test_memory_in_a_status_line_is_whole_mib_unless_asked():
    assert (mib_text(123.456), mib_text(123.456, 2), mib_text(None)) == ("123 MiB", "123.46 MiB", "n/a")


def test_a_measurement_prints_its_summary_and_writes_its_record_only_where_asked(tmp_path, capsys):
    output = tmp_path / "record.json"
    cli_common.finish_measurement({"tokens": 3}, "3 tokens", output)
    assert json.loads(output.read_text(encoding="utf-8")) == {"tokens": 3}
    cli_common.finish_measurement({"tokens": 4}, "4 tokens", None)
    assert capsys.readouterr().out == "3 tokens\n4 tokens\n" and [path.name for path in tmp_path.iterdir()] == ["record.json"]


# -- cli ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["generate", "-p", "x"], ["chat"]])
def test_generate_and_chat_sample_greedily_up_to_256_tokens_by_default(argv):
    args = cli.build_parser(argv[0]).parse_args(argv)
    assert (args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (256, 0.0, 1.0, 0, None)
    assert (args.repetition_penalty, args.repetition_window, args.stop, args.system) == (1.0, 64, [], None)
    assert args.compile == "auto"


def test_a_system_message_is_refused_only_where_the_chat_template_is_off():
    """chat always uses the template (it has no --chat-template); generate's auto and on use it."""
    for template in ({}, {"chat_template": "auto"}, {"chat_template": "on"}):
        args = argparse.Namespace(system="Be brief.", stop=["\n\n"], **template)
        cli.check_text_options(args)
        assert (args.system, args.stop) == ("Be brief.", ["\n\n"])
    with pytest.raises(ValueError, match="--system needs the chat template"):
        cli.check_text_options(argparse.Namespace(system="Be brief.", stop=[], chat_template="off"))


def test_a_templated_prompt_is_fed_with_the_bos_its_template_writes_and_no_second_one(monkeypatch, capsys):
    """The chat template writes the BOS itself: its text is tokenized without the tokenizer's own special tokens."""
    from tokenizers import processors
    from tiny_models import build_llama, tokenizer_of

    tokenizer = tokenizer_of(["[UNK]", "<s>", "user:", "assistant:", "hello"])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", 1)])
    tokenizer.chat_template = ("{{ bos_token }} {% for message in messages %}{{ message['role'] }}: "
                               "{{ message['content'] }} {% endfor %}assistant:")
    assert tokenizer("hello")["input_ids"] == [1, 4]  # this tokenizer adds a BOS of its own
    monkeypatch.setattr(cli_common, "load_from_args", lambda args: (build_llama(), tokenizer))
    status = cli.main(["generate", "-p", "hello", "--json", "--max-new-tokens", "1", "--n-sink", "2",
                       "--window-size", "8", "--compile", "never"])
    assert status == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 4  # <s> user: hello assistant:


class GivenAnswersChat:
    """A StreamingChat stand-in that answers with the given pieces of text, one piece per token; each turn took
    `seconds` at `tokens_per_second`."""

    def __init__(self, answers: list[list[str]], seconds: float = 0.123456789, tokens_per_second: float = 12.34567):
        cache = SimpleNamespace(get_cache_length=lambda: 7)
        self.wrapper = SimpleNamespace(tokens_seen=0, cache=cache, cache_capacity=12, n_sink=4, window_size=8,
                                       position_mode="pos_shift", streaming_mode="ours")
        self.answers, self.seconds, self.tokens_per_second = list(answers), seconds, tokens_per_second
        self.turns, self.last_turn = 0, None

    def send(self, prompt: str):
        pieces = self.answers.pop(0)
        for piece in pieces:
            self.wrapper.tokens_seen += 1
            yield SimpleNamespace(text=piece)
        self.turns += 1
        self.last_turn = SimpleNamespace(answer="".join(pieces), new_tokens=len(pieces), fed_tokens=len(prompt),
                                         stop_reason="length", seconds=self.seconds,
                                         tokens_per_second=self.tokens_per_second)


def clock(monkeypatch, *readings: float) -> None:
    """time.perf_counter() gives `readings` in turn, then the last one for ever."""
    readings = list(readings)
    monkeypatch.setattr(cli.time, "perf_counter", lambda: readings.pop(0) if len(readings) > 1 else readings[0])


def script_args(**options) -> argparse.Namespace:
    return argparse.Namespace(**{"json": True, "output": None, "quiet": False, "model": None, **options})


SCRIPT = [{"turns": ["Bonjour", "Et toi ?"], "fields": {"id": "é1"}}]


def test_a_scripts_records_and_summary_hold_its_counts_seconds_and_speeds_rounded(tmp_path, monkeypatch, capsys):
    output = tmp_path / "answers.jsonl"
    clock(monkeypatch, 100.0, 100.70012)  # the script took 0.70012 s
    chat = GivenAnswersChat([["ca", "fé"], ["oui"]])
    assert cli._run_script(script_args(output=str(output)), chat, SCRIPT) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"id": "é1", "record": 0, "turn": 0, "prompt": "Bonjour", "answer": "café", "new_tokens": 2, "fed_tokens": 7,
         "stop_reason": "length", "tokens_seen": 2, "cache_length": 7, "seconds": 0.1235},
        {"id": "é1", "record": 0, "turn": 1, "prompt": "Et toi ?", "answer": "oui", "new_tokens": 1, "fed_tokens": 8,
         "stop_reason": "length", "tokens_seen": 3, "cache_length": 7, "seconds": 0.1235},
    ]
    assert '"id": "é1"' in output.read_text(encoding="utf-8")  # UTF-8 text, not \\u escapes
    summary = json.loads(capsys.readouterr().out)
    assert {key: summary[key] for key in ("records", "answers", "new_tokens", "seconds", "tokens_per_second",
                                          "turns", "last_answer_tokens", "last_tokens_per_second", "output")} == {
        "records": 1, "answers": 2, "new_tokens": 3, "seconds": 0.7, "tokens_per_second": 4.28, "turns": 2,
        "last_answer_tokens": 1, "last_tokens_per_second": 12.35, "output": str(output)}


def test_a_script_timed_at_zero_seconds_has_no_speed(monkeypatch, capsys):
    clock(monkeypatch, 5.0)
    assert cli._run_script(script_args(), GivenAnswersChat([["a"], ["b"]]), SCRIPT) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["seconds"], summary["tokens_per_second"]) == (0.0, None)


def test_a_script_in_text_mode_prints_each_turn_and_no_progress_bar(monkeypatch, capsys):
    """The answers go to stdout as text; the bar of turns shows only with --json, at a terminal."""
    monkeypatch.setattr(cli, "show_progress", lambda args: True)
    assert cli._run_script(script_args(json=False), GivenAnswersChat([["ca", "fé"], ["oui"]]), SCRIPT) == 0
    captured = capsys.readouterr()
    assert captured.out == "USER: Bonjour\n\nASSISTANT: café\n\nUSER: Et toi ?\n\nASSISTANT: oui\n\n"
    assert "turns" not in captured.err
    assert cli._run_script(script_args(json=True), GivenAnswersChat([["a"], ["b"]]), SCRIPT) == 0
    assert "turns" in capsys.readouterr().err


def test_chat_commands_and_stats_reach_a_pipe_as_soon_as_they_are_answered(monkeypatch):
    """A program driving the chat through pipes reads each reply when it is made, not when stdout's buffer fills."""
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/stats\nBonjour\n/stats\n/frobnicate\n"))
    chat = GivenAnswersChat([["ca", "fé"]])
    assert cli._run_interactive(script_args(json=False, quiet=True), chat) == 0
    before = "[stats] 0 turns, 0 tokens seen, cache 7/12 (4 sinks + 8 window)\n"
    after = ("[stats] 1 turns, 2 tokens seen, cache 7/12 (4 sinks + 8 window); last answer 2 tokens at 12.3 tokens/s "
             "(length)\n")
    unknown = "unknown command /frobnicate; commands: /reset /stats /exit\n"
    assert stdout.getvalue() == f"> /stats\n{before}> Bonjour\ncafé\n\n> /stats\n{after}> /frobnicate\n{unknown}"
    for reply in (before, after, unknown):
        assert any(text.endswith(reply) for text in stdout.flushed), reply


def fake_readline(monkeypatch, doc: str, version: int) -> list[str]:
    """A readline module of that __doc__ and runtime version; the settings bound through it."""
    bound: list[str] = []
    module = SimpleNamespace(__doc__=doc, _READLINE_RUNTIME_VERSION=version, parse_and_bind=bound.append)
    monkeypatch.setitem(sys.modules, "readline", module)
    return bound


def test_line_editing_is_gnu_readline_from_8_1_with_bracketed_paste(monkeypatch):
    """Bracketed paste came with GNU readline 8.1; macOS's libedit has none; Windows has no readline."""
    bound = fake_readline(monkeypatch, "Importing this module enables command line editing using GNU readline.", 0x0801)
    assert cli._line_editing() is True and bound == ["set enable-bracketed-paste on"]
    assert fake_readline(monkeypatch, "GNU readline", 0x0800) == [] and cli._line_editing() is False
    assert fake_readline(monkeypatch, "... using libedit readline.", 0x0802) == [] and cli._line_editing() is False
    monkeypatch.setitem(sys.modules, "readline", None)  # no such module: import fails
    assert cli._line_editing() is False


@pytest.mark.parametrize("stdin, stdout, terminals, expected", [
    (0, 1, {0, 1}, True),
    (0, 1, {1}, False),  # input piped in
    (0, 1, {0}, False),  # output to a file or a pipe
    (3, 1, {0, 1, 3}, False),  # sys.stdin replaced by another terminal
    (0, 4, {0, 1, 4}, False),
    (None, 1, {0, 1}, False),  # a replaced stream without a file descriptor
])
def test_input_reads_with_readline_only_on_the_processs_own_terminals(monkeypatch, stdin, stdout, terminals, expected):
    def stream(descriptor):
        if descriptor is None:
            return io.StringIO()  # fileno() raises io.UnsupportedOperation
        return SimpleNamespace(fileno=lambda: descriptor)

    monkeypatch.setattr(sys, "stdin", stream(stdin))
    monkeypatch.setattr(sys, "stdout", stream(stdout))
    monkeypatch.setattr(os, "isatty", lambda descriptor: descriptor in terminals)
    assert cli._input_uses_readline() is expected


def test_a_closed_stdout_ends_the_command_quietly_with_status_141(tmp_path, monkeypatch, capsys):
    """`streaming-llm generate ... | head -1`: once the reader is gone, stdout is sent to the null device (so the
    final flush cannot fail again) and the exit status is 141, as a shell reports SIGPIPE."""
    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "run_generate", closed_pipe)
    with open(tmp_path / "stdout", "w", encoding="utf-8") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli.main(["generate", "-p", "x"]) == 141
        stdout.write("written after the pipe closed")
    assert (tmp_path / "stdout").read_text(encoding="utf-8") == "" and capsys.readouterr().err == ""


def test_answers_of_a_script_read_from_stdin_may_go_to_an_existing_file(tmp_path, monkeypatch, capsys):
    """`--script -` names no file to compare with --output: the run goes on to the model (whose error shows here)."""
    output = tmp_path / "answers.jsonl"
    output.write_text("from an earlier run\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "Hello"}\n'))
    status = cli.main(["chat", "--model", "./no/such/model", "--script", "-", "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2 and "model path not found" in err, err


def test_info_as_text_is_one_aligned_line_per_json_field(monkeypatch, capsys):
    from tiny_models import build_llama, tokenizer_of

    monkeypatch.setattr(cli_common, "load_from_args", lambda args: (build_llama(), tokenizer_of(["[UNK]", "hello"])))
    assert cli.main(["info", "--n-sink", "2", "--window-size", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert cli.main(["info", "--n-sink", "2", "--window-size", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    width = max(len(key) for key in info)  # the values start in one column, after the longest name
    assert [line[:width].rstrip() for line in lines] == list(info)
    assert all(line[width:width + 2] == "  " and line[width + 2] != " " for line in lines)
    assert lines[list(info).index("cache_capacity")][width + 2:] == "10"
