"""The mutation campaign's mutants are what its docstring says, numbered the same way each time."""

import json
import subprocess
import sys
import os

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mutation_campaign  # noqa: E402

SOURCE = "def f(a, b):\n    return a < b and not a\n\n\ndef g(n):\n    return min(n, 1) + 0.5\n"


@pytest.fixture
def source_file(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(SOURCE)
    return str(path)


def test_every_operator_gives_its_mutants_in_source_order(source_file):
    found = [(m["line"], m["original"], m["mutant"]) for m in mutation_campaign.mutants(source_file)]
    assert found == [(2, "<", "<="), (2, "and", "or"), (2, "not", ""),
                     (6, "min", "max"), (6, "1", "0"), (6, "1", "2"), (6, "+", "-")]  # 0.5: a float, left alone
    dropped = mutation_campaign.mutants(source_file)[2]
    assert dropped["mutated_line"] == "    return a < b and a"
    assert [m["id"].rpartition(":")[2] for m in mutation_campaign.mutants(source_file)] == list("0123456")


def test_functions_pick_mutants_that_keep_their_whole_file_numbers(source_file):
    picked = mutation_campaign.mutants(source_file, {"g"})
    assert [m["id"].rpartition(":")[2] for m in picked] == ["3", "4", "5", "6"]
    with pytest.raises(SystemExit, match="no function or class h"):
        mutation_campaign.mutants(source_file, {"g", "h"})


def test_summary_counts_a_mutant_by_its_last_run(tmp_path):
    log = tmp_path / "log.jsonl"
    base = dict(file="x.py", line=3, source_line="a", mutated_line="b", tests=["t"], git_commit="c")
    rows = [dict(base, id="x.py:0", outcome="survived"), dict(base, id="x.py:1", outcome="killed"),
            dict(base, id="x.py:0", outcome="killed")]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = mutation_campaign.summarize(str(log))
    assert summary["mutants"] == 2 and summary["outcomes"] == {"killed": 2} and summary["survivors"] == []


def test_without_files_or_a_log_it_says_what_to_give():
    done = subprocess.run([sys.executable, mutation_campaign.__file__], capture_output=True, text=True)
    assert done.returncode == 2 and "give --files and --tests" in done.stderr


def test_the_compiled_file_it_deletes_is_the_one_python_writes(tmp_path, source_file):
    """Before each mutant the campaign deletes the mutated file's .pyc from its own PYTHONPYCACHEPREFIX folder (the
    compiled torch and transformers stay); that is where Python keeps it."""
    pycache = tmp_path / "pyc"
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import m"], cwd=tmp_path, env=env, check=True)
    assert os.path.isfile(mutation_campaign.compiled_file(str(pycache), source_file))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_campaign_stops_as_on_ctrl_c_on_termination_signals_also_in_a_background_job(signame):
    """The file being mutated is put back in a `finally`, which runs on KeyboardInterrupt. A campaign started with
    `nohup ... &` ignores SIGINT and SIGTERM used to kill it outright: the mutant stayed in the source file."""
    import signal
    import time

    signum = getattr(signal, signame)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        mutation_campaign._stop_on_signals()
        with pytest.raises(KeyboardInterrupt, match=signame):
            os.kill(os.getpid(), signum)
            time.sleep(5)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
