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


class FlushRecorder(io.StringIO):
    """A text stream that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_a_json_line_is_written_as_utf8_text_and_flushed_to_the_stream_given(monkeypatch):
    """--json output keeps non-ASCII text as it is (not \\u escapes), and each object is flushed at once, so a
    program reading a chat's JSON lines from a pipe gets each answer when it is made."""
    stdout, other = FlushRecorder(), FlushRecorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    print_json({"text": "café 世界"})
    assert stdout.getvalue() == '{"text": "café 世界"}\n' and stdout.flushes == 1
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
