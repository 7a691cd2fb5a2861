"""The package's import cost and the console script's first seconds: `import streaming_llm` loads neither torch
nor transformers (the public names come on first use), and a Ctrl-C while the command line is still importing
them exits with status 130 and no traceback. `--help` and usage errors answer without loading torch either."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import streaming_llm


def test_import_is_light_and_every_public_name_resolves():
    probe = "import sys, streaming_llm; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]"
    for name in streaming_llm.__all__:
        assert getattr(streaming_llm, name) is not None
    assert set(streaming_llm.__all__) <= set(dir(streaming_llm))


def test_help_of_every_command_answers_without_torch():
    """The parser is built from names only (streaming_llm.choices, the method tables), so `streaming-llm --help`
    answers at once, not after the seconds torch and transformers take to import. So do the usage errors of bench,
    eval, generate and chat (an unknown method took 4 s, a --top-p of 7 2.5 s)."""
    probe = (
        "import contextlib, io, sys\n"
        "from streaming_llm.cli import build_parser, main\n"
        "commands = list(build_parser().parse_args([]).command_names)\n"
        "for argv in [['--help'], ['--version']] + [[command, '--help'] for command in commands]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert main(argv) == 0 and out.getvalue(), argv\n"
        "for argv, words in [(['bench', '--methods', 'nope'], 'unknown method'), (['bench', '--methods', 'mit,mit'], 'more than once'),\n"
        "                    (['bench', '--rounds', '0'], '--rounds'), (['bench', '--tag', '../x'], 'plain file name'),\n"
        "                    (['bench', '--tag', 'x' * 240, '--methods', 'nope'], 'at most 200'),\n"
        "                    (['eval', '--methods', 'nope'], 'unknown method'), (['eval', '--num-tokens', '1'], '--num-tokens'),\n"
        "                    (['generate', '--prompt', 'hi', '--top-p', '7'], '--top-p'), (['generate'], '--prompt-file'),\n"
        "                    (['generate', '--prompt-file', 'no/such/prompt.txt'], 'not found'),\n"
        "                    (['chat', '--max-new-tokens', '0'], '--max-new-tokens'), (['chat', '--output', 'a.json'], '--script')]:\n"
        "    with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "        assert main(argv) == 2 and words in err.getvalue(), (argv, err.getvalue())\n"
        "print(len(commands), sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split(" ", 1) == ["6", "[]\n"], loaded.stdout


def test_ctrl_c_while_the_command_line_imports_is_a_quiet_exit_130():
    script = Path(sys.executable).with_name("streaming-llm")
    if not script.is_file():
        import pytest

        pytest.skip("the console script is not installed")
    process = subprocess.Popen([str(script), "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # torch and transformers take seconds to import: the interrupt lands there (or later, in main)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_python_dash_m_runs_the_command_line():
    """`python -m streaming_llm` is the `streaming-llm` command (for an environment whose scripts are not on PATH):
    the same usage line, and the same exit status 2 for a command that does not exist."""
    help_run = subprocess.run([sys.executable, "-m", "streaming_llm", "--help"], capture_output=True, text=True,
                              timeout=120)
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: streaming-llm "), help_run.stderr
    wrong = subprocess.run([sys.executable, "-m", "streaming_llm", "no-such-command"], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "no-such-command" in wrong.stderr and "Traceback" not in wrong.stderr
