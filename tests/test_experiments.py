"""The experiment scripts' command lines: each shell entry point only calls the CLI, so what matters is which
commands it runs with which options. PYTHON=echo prints them instead of running them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent


def commands_of(script: str, cwd: Path | None = None, **env: str) -> list[str]:
    """The command lines `script` would run (PYTHON=echo), one per line of its stdout, run from `cwd`."""
    completed = subprocess.run(
        ["bash", str(ROOT / "experiments" / script)], env={**os.environ, "PYTHON": "echo", **env},
        capture_output=True, text=True, check=True, timeout=60, cwd=cwd,
    )
    return completed.stdout.splitlines()


def load_script(name: str):
    """experiments/<name>.py as a fresh module (its own globals, for a test to patch), not run as a script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def run_as_script(monkeypatch, capsys, script: str, *args: str) -> tuple[int, str, str]:
    """`python experiments/<script> args` in this process (runpy, as __main__: the script's own exit path, without
    ~4 s of interpreter start-up): (exit status, stdout, stderr). An exception the script lets out fails the test."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(ROOT / "experiments" / script), run_name="__main__")
    except KeyboardInterrupt:  # out of the script: a traceback for its user (and pytest would stop the session)
        pytest.fail(f"{script} let a KeyboardInterrupt out")
    out, err = capsys.readouterr()
    return exit.value.code, out, err


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "experiments").glob("*.py")))
def test_every_option_of_every_script_is_described_with_its_default(script, monkeypatch):
    """--help of eval_streaming_llm.py listed --num-tokens, --chunk-sizes, --n-sink, ... with no word on them, and the
    other scripts many of theirs; an option whose default is a value (not None, off or empty) names it in its help,
    as the CLI's do (tests/test_cli.py)."""
    import argparse

    from test_cli import assert_options_described

    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *args, **kwargs: parsers.append(self) or (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    main = load_script(script).main
    with pytest.raises(SystemExit):
        main() if script.startswith(("check_", "gpu_")) else main([])
    [parser] = parsers
    assert_options_described(parser, script)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "experiments").glob("*.sh")))
def test_every_shell_script_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / "experiments" / script)], check=True, timeout=60)


def test_gpu_latency_run_checks_the_fast_path_unless_told_not_to():
    default = commands_of("run_decoding_latency.sh", DEVICE="cuda")
    assert any("check_fast_path.py --device cuda" in line for line in default)
    skipped = commands_of("run_decoding_latency.sh", DEVICE="cuda", FAST_PATH_CHECK="0", STREAM_TOKENS="0",
                          METHODS="streaming_compiled,recompute", TAG_PREFIX="h200")
    assert not any("check_fast_path.py" in line for line in skipped)
    benches = [line for line in skipped if "streaming_llm.cli bench" in line]
    assert len(benches) == 2  # the 7B shape at 4096, then SmolLM2 at 1024
    assert "--shape llama-2-7b --cache-sizes 4096" in benches[0]
    assert "--tag h200_llama-2-7b_bf16" in benches[0]
    assert all("--methods streaming_compiled,recompute" in line for line in benches)
    assert "--stream-tokens 0" in benches[1]


def test_scripts_take_the_callers_relative_paths_and_run_the_cli_through_python(tmp_path):
    """Each script moves to the repository root; a relative OUTPUT_DIR or DATA file given by the caller was then
    resolved there (written into the repository, or 'no such file'). The CLI runs as PYTHON -m streaming_llm.cli, so
    the scripts work without an activated virtual environment (bare `streaming-llm` and `python` did not)."""
    (tmp_path / "text.txt").write_text("x")
    lines = commands_of("run_comprehensive_comparisons.sh", cwd=tmp_path, OUTPUT_DIR="out", DATA="text.txt",
                        NUM_TOKENS="1100")
    assert lines and all(f"--output-dir {tmp_path}/out" in line for line in lines)
    assert f"--data {tmp_path}/text.txt" in lines[0] and lines[0].startswith("-m streaming_llm.cli eval")
    # the decode-loop comparison and kvpress's prefix follow a small NUM_TOKENS (they ran 4,096 and 2,048 tokens
    # regardless; eval refuses a --decode-tokens beyond --num-tokens)
    assert "run_decode_perplexity.py --num-tokens 1100 " in lines[1] and "--decode-tokens 1100 " in lines[0]
    spec = commands_of("run_kvpress_streaming_decode.sh", cwd=tmp_path, DATA="wikitext:wikitext-2-raw-v1")
    assert "--data wikitext:wikitext-2-raw-v1" in spec[0]  # a datasets spec is not a path


def test_scripts_expand_a_quoted_tilde_in_the_callers_paths(tmp_path):
    """OUTPUT_DIR="~/runs" (quoted, so no shell expanded it) was taken for a relative path and made <caller's
    folder>/~/runs: the results went to a folder named '~'."""
    home = tmp_path / "home"
    lines = commands_of("run_comprehensive_comparisons.sh", cwd=tmp_path, OUTPUT_DIR="~/runs", HOME=str(home))
    assert lines and all(f"--output-dir {home}/runs" in line for line in lines)
    lines = commands_of("run_everything.sh", cwd=tmp_path, OUTPUT_ROOT="~", HOME=str(home))
    assert f"--output-dir {home}/comprehensive " in lines[0]


@pytest.mark.parametrize("options", [["--force"], ["--quiet"], ["-q"], ["--model", "m"], ["--dtype", "bfloat16"],
                                     ["--device", "cpu"], ["--threads", "1"]])
def test_the_options_extra_args_takes_are_options_of_both_programs(options):
    """run_comprehensive_comparisons.sh passes EXTRA_ARGS to `streaming-llm eval` and run_decode_perplexity.py: with
    -q (eval's short --quiet) the whole eval ran, then run_decode_perplexity.py refused it."""
    from test_docs import cli_subparsers, program_parser

    for parser in (cli_subparsers()["eval"], program_parser("script", "experiments/run_decode_perplexity.py")):
        parser.parse_args(options)


def test_comprehensive_run_summarizes_the_dtype_it_ran():
    """With EXTRA_ARGS='--dtype bfloat16' into a folder holding float32 results (results/comprehensive, the default),
    the run ended in 'summarize_results.py: error: ... holds results in several dtypes (bfloat16, float32): pass
    --dtype': the summary was not told the run's dtype."""
    for extra in ("--quiet --dtype bfloat16", "--dtype=bfloat16 --force"):
        *_, summary = commands_of("run_comprehensive_comparisons.sh", NUM_TOKENS="64", EXTRA_ARGS=extra)
        assert "summarize_results.py" in summary and summary.endswith(" --dtype bfloat16")
    *_, summary = commands_of("run_comprehensive_comparisons.sh", NUM_TOKENS="64", EXTRA_ARGS="--quiet")
    assert "--dtype" not in summary


def test_comprehensive_run_summarizes_the_model_and_text_it_ran(experiment, tmp_path):
    """With EXTRA_ARGS='--model X' or DATA=<text> into a folder holding other models' or texts' results
    (results/comprehensive, the default), the whole run ended in 'summarize_results.py: error: ... holds results of
    several models or texts': the summary was not told the run's model nor text."""
    from streaming_llm.data import EMBEDDED_NAME
    from streaming_llm.loading import EMBEDDED_MODEL

    script = experiment("summarize_results")
    for model, text in (("tiny", "text.txt"), ("tiny", "other.txt"), ("huge", "text.txt"), (EMBEDDED_MODEL, EMBEDDED_NAME)):
        write_fake_result(tmp_path, "dense", 64, window_size=1020, model=model, text=text, sha256=f"{len(text):064x}")
    for model, env in (("tiny", {"EXTRA_ARGS": "--quiet --model /models/tiny", "DATA": "/texts/text.txt"}),
                       ("tiny", {"EXTRA_ARGS": "--model=tiny", "DATA": "other.txt"}), (EMBEDDED_MODEL, {})):
        *_, summary = commands_of("run_comprehensive_comparisons.sh", NUM_TOKENS="64", OUTPUT_DIR=str(tmp_path), **env)
        command, *options = summary.split()
        assert command == "experiments/summarize_results.py"
        assert script.main(options) == 0, (model, text)


def test_summary_refuses_a_folder_mixing_models_and_creates_its_folder(tmp_path, capsys):
    """summarize_results wrote into <dir>/summary without creating it (run_everything.sh failed on a fresh folder),
    and put two models' results in one table."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import summarize_results
    from test_cli import run_main

    from streaming_llm.bench.soak import save_tiny_chat_llama

    stream = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--block-size", "32", "--quiet"]
    first = save_tiny_chat_llama(tmp_path / "a" / "model_a")
    assert run_main(capsys, "eval", "--model", str(first), *stream, "--methods", "dense,streaming_pos_shift",
                    "--output-dir", str(tmp_path / "out"))[0] == 0
    summary = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--output-dir", str(tmp_path / "out")]
    assert summarize_results.main(summary) == 0
    assert (tmp_path / "out" / "summary" / "table__T120__s2_w20.md").is_file()
    other = save_tiny_chat_llama(tmp_path / "b" / "model_b", seed=1)
    assert run_main(capsys, "eval", "--model", str(other), *stream, "--methods", "dense",
                    "--output-dir", str(tmp_path / "out"))[0] == 0
    with pytest.raises(ValueError, match="holds results of several models or texts"):
        summarize_results.main(summary)
    assert summarize_results.main([*summary, "--model", "model_a"]) == 0


def test_summary_of_a_result_without_its_nll_file_skips_that_cross_check(tmp_path, capsys):
    """A result whose .nlls.npy file went missing is a row with no segment perplexities (summary_rows) and no curve
    (plot_nll_curves), but the cross-check of its pair read its NLLs as an array: AttributeError ('NoneType' object
    has no attribute 'size'), and no summary JSON nor figure was written."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import summarize_results
    from test_cli import run_main

    from streaming_llm.bench.soak import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "model")
    out = tmp_path / "out"
    assert run_main(capsys, "eval", "--model", str(model), "--num-tokens", "120", "--n-sink", "2", "--window-size",
                    "20", "--block-size", "32", "--quiet", "--methods", "window,streaming_pos_shift",
                    "--output-dir", str(out))[0] == 0
    (window_nlls,) = out.glob("*window*.nlls.npy")
    window_nlls.unlink()
    summary = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--output-dir", str(out)]
    assert summarize_results.main(summary) == 0
    written = json.loads((out / "summary" / "table__T120__s2_w20.json").read_text())
    assert written["cross_checks"] == []
    assert [row["method"] for row in written["rows"]] == ["window", "streaming_pos_shift"]
    assert (out / "nll_curves__T120__s2_w20.png").is_file()


def test_summary_keeps_to_one_dtype(tmp_path, capsys):
    """A bfloat16 run on more tokens than a method's float32 one was taken for that method's row, beside float32 rows,
    in a table that shows no dtype. A folder of several dtypes is refused now; --dtype picks one."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import summarize_results
    from test_cli import run_main

    from streaming_llm.bench.soak import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "model")
    stream = ["--model", str(model), "--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--block-size",
              "32", "--quiet", "--output-dir", str(tmp_path / "out")]
    assert run_main(capsys, "eval", *stream, "--methods", "dense:64,streaming_pos_shift")[0] == 0
    assert run_main(capsys, "eval", *stream, "--methods", "dense", "--dtype", "bfloat16")[0] == 0
    summary = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"holds results in several dtypes \(bfloat16, float32\): pass --dtype"):
        summarize_results.main(summary)
    assert summarize_results.main([*summary, "--dtype", "float32"]) == 0
    rows = json.loads((tmp_path / "out" / "summary" / "table__T120__s2_w20.json").read_text())["rows"]
    assert [(row["method"], row["num_tokens"]) for row in rows] == [("dense", 64), ("streaming_pos_shift", 120)]
    assert summarize_results.main([*summary, "--dtype", "bfloat16"]) == 0
    rows = json.loads((tmp_path / "out" / "summary" / "table__T120__s2_w20__bfloat16.json").read_text())["rows"]
    assert [(row["method"], row["num_tokens"]) for row in rows] == [("dense", 120)]
    assert (tmp_path / "out" / "nll_curves__T120__s2_w20__bfloat16.png").is_file()
    with pytest.raises(ValueError, match="no float16 results"):
        summarize_results.main([*summary, "--dtype", "float16"])


def test_summary_refuses_results_of_one_text_tokenized_otherwise(tmp_path, capsys, monkeypatch):
    """A method scored again on its first 64 tokens after the tokenization changed (a BOS put first or not: another
    tokenizer, another transformers) has its own file name; the table and figure put it beside the other stream's
    results as if token t were the same token in both."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import summarize_results
    from test_cli import run_main

    from streaming_llm import data
    from streaming_llm.bench.soak import save_tiny_chat_llama

    model = save_tiny_chat_llama(tmp_path / "model")
    stream = ["--model", str(model), "--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--block-size",
              "32", "--quiet", "--output-dir", str(tmp_path / "out")]
    assert run_main(capsys, "eval", *stream, "--methods", "streaming_pos_shift")[0] == 0
    load_tokens = data.load_tokens
    monkeypatch.setattr(data, "load_tokens", lambda tokenizer, *args, **kwargs: load_tokens(
        tokenizer, *args, **{**kwargs, "add_bos": not data._prefix_ids(tokenizer, None)}))
    assert run_main(capsys, "eval", *stream, "--methods", "dense:64")[0] == 0
    with pytest.raises(ValueError, match="were scored on different token streams of model on .* first 64 tokens"):
        summarize_results.main(["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--output-dir",
                                str(tmp_path / "out")])


def test_fast_path_check_of_the_frozen_step(tmp_path, monkeypatch, capsys):
    """check_fast_path.py --freeze-weights (the check the next GPU run makes of freeze_weights), here compiled on CPU:
    the report says the step was frozen and compiled, and in fp32 the frozen step gives the general path's logits.
    The prompt fills the cache (4 sinks + 8), so every token after it takes the full buffer's step, the one frozen:
    the filling step, compiled unfrozen in each dtype, is not what is checked here (test_fast_path.py runs it)."""
    status, _, _ = run_as_script(monkeypatch, capsys, "check_fast_path.py", "--device", "cpu", "--compile", "always",
                                 "--freeze-weights", "--layers", "1", "--window-size", "8", "--tokens", "24",
                                 "--prompt", "12", "--output", str(tmp_path / "check.json"))
    report = json.loads((tmp_path / "check.json").read_text())
    assert status == 0 and report["freeze_weights"] is True
    assert report["step_kind"] == {"float32": "compiled", "bfloat16": "compiled"}
    assert report["fast_float32_vs_general_float32"]["max_abs_diff"] <= 1e-4


def test_gpu_scripts_say_they_need_cuda(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    status, _, err = run_as_script(monkeypatch, capsys, "gpu_step_breakdown.py")
    assert status == 2
    assert err.strip() == ("gpu_step_breakdown.py: error: --device cuda: no CUDA device here (this script "
                           "measures the GPU; --device cpu for a small smoke run where it offers one)")


@pytest.mark.parametrize("script, options", [
    ("check_fast_path.py", ["--device", "cpu", "--layers", "1", "--window-size", "8", "--tokens", "20", "--prompt", "4"]),
    ("gpu_attention_microbench.py", ["--device", "cpu"]),
    ("gpu_step_breakdown.py", ["--device", "cpu", "--shape", "pythia-70m", "--dtype", "float32", "--capacity", "16",
                               "--steps", "1"]),
])
def test_measurements_check_their_output_file_first(tmp_path, monkeypatch, capsys, script, options):
    """--output naming a folder (or a path under a file) failed after the whole measurement ('Is a directory'), and
    --output=~/x.json wrote into a folder named '~' in the working directory (the GPU scripts not even atomically)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for output, message in ((str(tmp_path), f"--output {tmp_path} is a folder: give a file path in it"),
                            ("~/file/x.json", f"--output ~/file/x.json: {tmp_path}/home/file is a file, not a folder")):
        status, out, err = run_as_script(monkeypatch, capsys, script, *options, f"--output={output}")
        assert (status, out) == (2, ""), err
        assert err.splitlines()[-1] == f"{script}: error: {message}"


SMALL_BREAKDOWN = ["--device", "cpu", "--shape", "pythia-70m", "--dtype", "float32"]  # not a 7B model on a CPU


@pytest.mark.parametrize("script, options, message", [
    ("check_fast_path.py", ["--device", "gpu"], "--device must be cpu, cuda, cuda:N, mps or auto; got 'gpu'"),
    ("gpu_attention_microbench.py", ["--device", "gpu"], "--device must be cpu, cuda, cuda:N, mps or auto; got 'gpu'"),
    ("gpu_step_breakdown.py", ["--device", "gpu"], "--device must be cpu, cuda, cuda:N, mps or auto; got 'gpu'"),
    ("gpu_attention_microbench.py", ["--device", "mps"], "--device mps: this script measures CUDA (--device cuda), or "
                                                          "runs a small smoke check on the CPU (--device cpu)"),
    ("gpu_step_breakdown.py", [*SMALL_BREAKDOWN, "--capacity", "0"], "--capacity must exceed --n-sink (4); got 0"),
    ("gpu_step_breakdown.py", [*SMALL_BREAKDOWN, "--capacity", "4"], "--capacity must exceed --n-sink (4); got 4"),
    ("gpu_step_breakdown.py", [*SMALL_BREAKDOWN, "--steps", "0"], "--steps and --top must be >= 1; got --steps 0, --top 15"),
    ("gpu_step_breakdown.py", [*SMALL_BREAKDOWN, "--freeze-weights"],
     "--freeze-weights needs --device cuda: off CUDA this script runs the steps uncompiled"),
    ("check_fast_path.py", ["--device", "cpu", "--layers", "0"],
     "--layers and --prompt must be >= 1 and --tokens at least --prompt; got --layers 0, --prompt 16, --tokens 400"),
    ("check_fast_path.py", ["--device", "cpu", "--layers", "1", "--tokens", "3", "--prompt", "4"],
     "--layers and --prompt must be >= 1 and --tokens at least --prompt; got --layers 1, --prompt 4, --tokens 3"),
])
def test_measurements_refuse_a_bad_device_or_length_in_one_line(monkeypatch, capsys, script, options, message):
    """--device gpu ended in torch's traceback ('Expected one of cpu, cuda, ...'); check_fast_path's --layers 0 was
    refused as 'this llama model rotates no features' and --prompt 0 or --tokens 0 as 'input_ids must be a [batch, n]
    tensor' (no option named), and --tokens below --prompt streamed a shorter prompt than asked; gpu_step_breakdown's
    --capacity 0 ended in a traceback ('cannot reshape tensor of 0 elements'), --capacity 4 (= --n-sink) as 'window_size
    must be an integer >= 1' after its first measurement, and --steps 0 as 'no median for empty data'."""
    assert run_as_script(monkeypatch, capsys, script, *options) == (2, "", f"{script}: error: {message}\n")


def test_gpu_scripts_take_device_auto(tmp_path, monkeypatch, capsys):
    """--device auto (which validate_common_args accepts) went to torch.device as it was, a traceback ('Expected one of
    cpu, cuda, ... device type at start of device string: auto'); it is CUDA where there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: auto would time it")
    status, _, err = run_as_script(monkeypatch, capsys, "gpu_attention_microbench.py", "--device", "auto", "--output",
                                   str(tmp_path / "smoke.json"))
    assert status == 0, err
    assert json.loads((tmp_path / "smoke.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("script", ["long_prompt_memory.py", "sliding_ring_memory.py"])
def test_memory_measurements_stop_on_ctrl_c_without_a_traceback(tmp_path, monkeypatch, capsys, script):
    """Ctrl-C during the measurement printed a KeyboardInterrupt traceback (the scripts ran main() without
    run_script); now exit status 130, nothing on stderr but a line break, and no --output file. The interrupt is
    raised where the script seeds its model (torch.manual_seed)."""
    import torch

    monkeypatch.setattr(torch, "manual_seed", mock.Mock(side_effect=KeyboardInterrupt))
    status, _, err = run_as_script(monkeypatch, capsys, script, "--output", str(tmp_path / "out.json"))
    assert (status, err) == (130, "\n")
    assert not (tmp_path / "out.json").exists()


@contextlib.contextmanager
def stray_sigterm_handler():
    """SIGTERM handled by a stray handler inside: where the code under test leaves SIGTERM as it was, the test fails (the
    handler's exception), not the process running it; the code must put this handler back before the block ends."""

    class Stray(Exception):
        pass

    def stray(signum, frame):
        raise Stray

    previous = signal.signal(signal.SIGTERM, stray)
    try:
        yield
        assert signal.getsignal(signal.SIGTERM) is stray
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_experiment_script_ends_on_sigterm_with_status_143_and_no_output(tmp_path, monkeypatch, capsys):
    """SIGTERM killed an experiment script where it stood; under run_script it ends as SystemExit(143), its `finally`
    blocks run, and the handler before it is put back. Raised where the script seeds its model (torch.manual_seed)."""
    import torch

    monkeypatch.setattr(torch, "manual_seed", mock.Mock(side_effect=lambda *_: signal.raise_signal(signal.SIGTERM)))
    with stray_sigterm_handler():
        status, _, err = run_as_script(monkeypatch, capsys, "long_prompt_memory.py", "--output", str(tmp_path / "o.json"))
    assert (status, err) == (143, "")
    assert not (tmp_path / "o.json").exists()


def refusal_of(script: str, **env: str) -> str:
    """The one-line error of `script` refusing a variable (exit status 2) before it ran anything (PYTHON=echo)."""
    completed = subprocess.run(
        ["bash", str(ROOT / "experiments" / script)], env={**os.environ, "PYTHON": "echo", **env},
        capture_output=True, text=True, timeout=60,
    )
    assert (completed.returncode, completed.stdout) == (2, ""), completed
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith(f"{script}: error: "), completed.stderr
    return completed.stderr.strip()


@pytest.fixture
def experiment(monkeypatch):
    """import_module for the experiment scripts, with model loading refused: bad options are named before it."""
    import importlib

    import streaming_llm.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    monkeypatch.setattr(streaming_llm.loading, "load_model", refuse)
    return importlib.import_module


@pytest.mark.parametrize("options, message", [
    (["--strides", "100"], "--strides 100: '100' is not an integer from 1 to 20 (the window's capacity, n-sink + window-size)"),
    (["--strides", "8,0"], "--strides 8,0: '0' is not an integer from 1 to 20"),
    (["--chunk-sizes", "8,abc"], "--chunk-sizes 8,abc: 'abc' is not an integer >= 1"),
    (["--chunk-sizes", "-4"], "--chunk-sizes -4: '-4' is not an integer >= 1"),
    (["--chunk-sizes", "8,16,08"], "--chunk-sizes 8,16,08: 8 is given more than once"),
    (["--strides", "4, 4"], "--strides 4, 4: 4 is given more than once"),
])
def test_chunked_eval_checks_chunk_sizes_and_strides_before_loading(experiment, options, message):
    """--strides beyond the capacity was refused minutes later (after the model and the reference), --chunk-sizes
    8,abc as "invalid literal for int()" without naming the option."""
    script = experiment("eval_streaming_llm")
    with pytest.raises(ValueError) as error:
        script.main(["--n-sink", "4", "--window-size", "16", *options])
    assert str(error.value).startswith(message)


def test_decode_perplexity_checks_block_size_and_output_dir_first(experiment, tmp_path):
    """--output-dir naming a file failed after all the work ('File exists'); --block-size 1 compared the decode
    loop with itself and wrote a summary of speedup 1.0x."""
    script = experiment("run_decode_perplexity")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"^--output-dir {tmp_path}/file is not a folder$"):
        script.main(["--output-dir", str(tmp_path / "file")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary").write_text("x")  # where the summary goes
    with pytest.raises(ValueError, match="^--output-dir .*/out/summary is not a folder$"):
        script.main(["--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="^--block-size must be >= 2, got 1: the parallel evaluator needs blocks of at least 2"):
        script.main(["--block-size", "1", "--output-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="^--methods: no parallel evaluator to compare for recompute"):
        script.main(["--methods", "recompute", "--output-dir", str(tmp_path / "new")])


@pytest.mark.parametrize("script, options", [
    ("eval_streaming_llm", ["--n-sink", "4", "--window-size", "16", "--strides", "8"]),
    ("eval_kvpress", ["--n-sink", "4", "--window-size", "16", "--context-length", "64"]),
])
def test_chunked_and_kvpress_evals_check_their_output_dir_first(experiment, tmp_path, monkeypatch, script, options):
    """--output-dir naming a file failed after all the work ('File exists: ...', without the option), an empty one
    wrote into the working directory, and --output-dir=~/runs into a folder named '~' there."""
    main = experiment(script).main
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"^--output-dir {tmp_path}/file is not a folder$"):
        main([*options, "--output-dir", str(tmp_path / "file")])
    with pytest.raises(ValueError, match="^--output-dir is empty: give a folder$"):
        main([*options, "--output-dir", ""])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    from streaming_llm.eval import results

    checked, prepare = [], results.prepare_output_dir

    def recorded(*args):  # the folder leaves no trace once the run is refused: record the path it checked
        checked.append(prepare(*args))
        return checked[-1]

    monkeypatch.setattr(results, "prepare_output_dir", recorded)
    with pytest.raises(AssertionError, match="the model was loaded"):  # the options passed: the model comes next
        main([*options, "--output-dir=~/runs"])
    assert checked == [tmp_path / "home" / "runs"] and not (tmp_path / "~").exists()


@pytest.mark.parametrize("script, options", [
    ("eval_streaming_llm", ["--n-sink", "4", "--window-size", "16", "--strides", "8"]),
    ("eval_kvpress", ["--n-sink", "4", "--window-size", "16", "--context-length", "64"]),
    ("run_decode_perplexity", ["--n-sink", "4", "--window-size", "16"]),
])
def test_a_refused_eval_script_leaves_no_folder_behind(experiment, tmp_path, script, options):
    """--output-dir was created when checked, before --data was read: a run refused then left an empty folder."""
    with pytest.raises(ValueError, match="no such file"):
        experiment(script).main([*options, "--data", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "new")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (["--n-sink", "-1"], "--n-sink must be >= 0 (0 = no sinks), got -1"),
    (["--window-size", "-3"], "--window-size must be >= 1, got -3"),
    (["--window-size", "0"], "--window-size must be >= 1, got 0"),
    (["--demo-window", "0"], "--continuation-length, --timing-repeats and --demo-window must be >= 1, --demo-tokens >= 0"),
    # it ran on the stream's 576 tokens and said nothing
    (["--demo-tokens", "5000"], "--demo-tokens 5000: the stream has --context-length + --continuation-length 576 tokens"),
])
def test_kvpress_eval_checks_the_cache_sizes_before_loading(experiment, tmp_path, options, message):
    """--n-sink -1 or --window-size -3 ended in a traceback (torch.arange's 'upper bound and lower bound inconsistent'),
    --window-size 0 or --demo-window 0 as 'window_size must be an integer >= 1' without the option, all after the model
    was loaded (--demo-window after the whole comparison)."""
    script = experiment("eval_kvpress")
    with pytest.raises(ValueError) as error:
        script.main(["--n-sink", "4", "--window-size", "16", "--context-length", "64", *options,
                     "--output-dir", str(tmp_path)])
    assert str(error.value) == message


def test_kvpress_eval_says_what_it_does_with_an_existing_result(experiment, tmp_path, capsys):
    """An existing result was skipped with 'exists (use --force)', which did not say that nothing of it is read or
    printed: the file is kept as it is, nothing is run (the model is not loaded), exit status 0."""
    from streaming_llm.data import read_source
    from streaming_llm.eval.command import _model_name
    from streaming_llm.eval.results import data_label

    _, data = read_source(None, 64 + 512, "--context-length + --continuation-length")
    path = tmp_path / f"{_model_name(None)}__{data_label(data)}__L64_m512__s4_w16__kvpress_official.json"
    path.write_text("old")
    assert experiment("eval_kvpress").main(["--n-sink", "4", "--window-size", "16", "--context-length", "64",
                                            "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("", f"{path} exists: it is left as it is and nothing is run (its numbers are "
                                   "neither checked nor printed); --force runs the comparison and replaces it\n")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 2-layer random Llama with the embedded tokenizer, saved as a model folder."""
    from streaming_llm.bench.soak import save_tiny_chat_llama

    return save_tiny_chat_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("script, options", [
    ("eval_streaming_llm", ["--num-tokens", "40", "--chunk-sizes", "8", "--strides", "8", "--quiet"]),
    ("run_decode_perplexity", ["--num-tokens", "40", "--block-size", "8", "--quiet"]),
    ("eval_kvpress", ["--context-length", "30", "--continuation-length", "8", "--timing-repeats", "1",
                      "--demo-tokens", "0"]),
])
def test_evals_read_a_text_from_a_pipe(tiny_chat_model, tmp_path, capsys, script, options):
    """--data <(cmd) (a pipe, read once) was read again to tokenize it after the model was loaded, and refused as
    "text file '/dev/fd/63': the text is empty" (the fix of `streaming-llm eval`, a6c3c7c, had not reached them)."""
    text = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode("utf-8"))  # ~3 KB: fits the pipe's buffer
    os.close(write_end)
    try:
        assert load_script(script).main(["--model", str(tiny_chat_model), "--n-sink", "2", "--window-size", "14",
                                          *options, "--data", f"/dev/fd/{read_end}", "--output-dir", str(tmp_path)]) == 0
    finally:
        os.close(read_end)
    # every result records the token stream it scored (the text's sha256 does not tell its tokenizations apart)
    from transformers import AutoTokenizer

    from streaming_llm.data import load_tokens
    from streaming_llm.eval.results import tokens_fingerprint

    ids = load_tokens(AutoTokenizer.from_pretrained(tiny_chat_model), None, 38 if script == "eval_kvpress" else 40, text=text)
    records = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert records and all(record["tokens_fingerprint"] == tokens_fingerprint(ids) for record in records)


def test_decode_perplexity_takes_the_model_options_of_eval(tiny_chat_model, tmp_path):
    """run_comprehensive_comparisons.sh passes EXTRA_ARGS to `streaming-llm eval` and to run_decode_perplexity.py;
    EXTRA_ARGS="--dtype bfloat16" ran eval, then stopped at 'run_decode_perplexity.py: error: unrecognized arguments:
    --dtype bfloat16'. It takes --dtype, --device and --threads now; its results and summary are named by dtype, as
    eval's are (a float32 summary beside them is not replaced)."""
    assert load_script("run_decode_perplexity").main([
        "--model", str(tiny_chat_model), "--n-sink", "2", "--window-size", "14", "--num-tokens", "40", "--block-size", "8",
        "--quiet", "--dtype", "bfloat16", "--device", "cpu", "--threads", "1", "--output-dir", str(tmp_path)]) == 0
    records = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert len(records) == 2 and all(record["dtype"] == "bfloat16" for record in records)
    [summary] = (tmp_path / "summary").glob("*.json")
    assert summary.name == "decode_vs_parallel__T40__s2_w14__bfloat16.json"


@pytest.mark.parametrize("script, options, option", [
    ("eval_streaming_llm", ["--strides", "8", "--num-tokens", "4096"], "--num-tokens 4096"),
    ("run_decode_perplexity", ["--num-tokens", "4096"], "--num-tokens 4096"),
    ("eval_kvpress", ["--context-length", "4000", "--continuation-length", "96"], "--context-length + --continuation-length 4096"),
])
def test_evals_refuse_more_tokens_than_the_text_holds_before_loading(experiment, tmp_path, script, options, option):
    """A stream longer than the --data text was refused after the model was loaded, as "num_tokens=4096, but the text
    has only <n> tokens" (no option named); the scripts now check it first, as `streaming-llm eval` does."""
    (tmp_path / "short.txt").write_text("a short text\n")
    with pytest.raises(ValueError) as error:
        experiment(script).main(["--n-sink", "4", "--window-size", "16", *options, "--data", str(tmp_path / "short.txt"),
                                 "--output-dir", str(tmp_path / "out")])
    assert str(error.value) == f"{option}: the text holds 13 bytes, and a token takes at least one"


@pytest.mark.parametrize("script, options, option", [
    ("eval_streaming_llm", ["--strides", "8", "--num-tokens", "120"], "--num-tokens 120"),
    ("run_decode_perplexity", ["--num-tokens", "120"], "--num-tokens 120"),
    ("eval_kvpress", ["--context-length", "100", "--continuation-length", "20"], "--context-length + --continuation-length 120"),
])
def test_evals_name_their_option_when_the_text_has_fewer_tokens(tiny_chat_model, tmp_path, script, options, option):
    """A text of enough bytes but fewer tokens than asked for was refused, once tokenized, as "num_tokens=120, but the
    text has only 21 tokens": the library's parameter, not the script's option."""
    (tmp_path / "few.txt").write_text(" lighthouse" * 20, encoding="utf-8")  # 220 bytes, one token a word
    with pytest.raises(ValueError) as error:
        load_script(script).main(["--model", str(tiny_chat_model), "--n-sink", "2", "--window-size", "14", *options,
                                  "--data", str(tmp_path / "few.txt"), "--output-dir", str(tmp_path / "out")])
    assert str(error.value).startswith(f"{option}: the text has only ")


@pytest.mark.parametrize("content", [b'{"model": "x", "data": {', b"[1]", b"\xff", b'{"model": "x", "data": "text"}'])
def test_chunked_eval_names_a_foreign_file_in_the_place_of_its_result(experiment, tmp_path, content):
    """A file of that name which is no result of the script was refused as a bare JSON or UTF-8 error ("Expecting
    property name enclosed in double quotes: line 2 column 1 (char 25)") without naming it, or ended in a traceback
    ("'list' object has no attribute 'get'")."""
    path = tmp_path / "chunked__T64__s4_w16.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        experiment("eval_streaming_llm").main(["--n-sink", "4", "--window-size", "16", "--strides", "8", "--num-tokens",
                                               "64", "--output-dir", str(tmp_path)])
    assert str(error.value) == f"{path} is not a result of this script; use another --output-dir, or --force to replace it"


def test_latency_run_refuses_an_unknown_device_and_honours_methods_on_cpu():
    """DEVICE=gpu or CUDA ran the CPU branch (a 100,000-token stream among it); METHODS was ignored on CPU."""
    for device in ("gpu", "CUDA", "cuda:x"):
        assert refusal_of("run_decoding_latency.sh", DEVICE=device) == (
            f"run_decoding_latency.sh: error: DEVICE must be cpu (the default), cuda or cuda:N, got '{device}'")
    cpu = commands_of("run_decoding_latency.sh", METHODS="dense,streaming", STREAM_TOKENS="0")
    assert len(cpu) == 1 and "--device cpu --shape embedded" in cpu[0] and "--methods dense,streaming " in cpu[0]
    assert "--methods default " in commands_of("run_decoding_latency.sh", DEVICE="cpu")[0]  # bench's default
    assert any("--device cuda:1 " in line for line in commands_of("run_decoding_latency.sh", DEVICE="cuda:1"))


@pytest.mark.parametrize("script, env, message", [
    ("run_comprehensive_comparisons.sh", {"NUM_TOKENS": "abc"}, "NUM_TOKENS must be a positive integer (digits only), got 'abc'"),
    ("run_comprehensive_comparisons.sh", {"NUM_TOKENS": "1e3"}, "NUM_TOKENS must be a positive integer (digits only), got '1e3'"),
    ("run_comprehensive_comparisons.sh", {"NUM_TOKENS": "ROOT[$(echo INJECTED >&2)]"},
     "NUM_TOKENS must be a positive integer (digits only), got 'ROOT[$(echo INJECTED >&2)]'"),
    ("run_comprehensive_comparisons.sh", {"NUM_TOKENS": "0"}, "NUM_TOKENS must be a positive integer (digits only), got '0'"),
    ("run_comprehensive_comparisons.sh", {"RECOMPUTE_SAMPLES": "-1"}, "RECOMPUTE_SAMPLES must be a positive integer (digits only), got '-1'"),
    ("run_endless_generation.sh", {"LENGTHS": " "}, "LENGTHS is empty: give one or more token counts, e.g. LENGTHS='2000 100000'"),
    ("run_endless_generation.sh", {"LENGTHS": "2000 2k"}, "each of LENGTHS must be a positive integer (digits only), got '2k'"),
    ("run_everything.sh", {"SCALE": "Full"}, "SCALE must be small (the default) or full, got 'Full'"),
    ("run_comprehensive_comparisons.sh", {"DATA": "-"}, "DATA=- (standard input) is read by two commands here (eval, "
     "then run_decode_perplexity.py): save the text to a file and give DATA=that file"),
])
def test_scripts_refuse_bad_variables_before_running_anything(tmp_path, script, env, message):
    """NUM_TOKENS went into bash arithmetic unchecked ('abc: unbound variable', 'value too great for base', and a
    command inside it was run); LENGTHS=' ' generated nothing and exited 0; SCALE=Full ran the small scale; DATA=-
    gave run_comprehensive_comparisons.sh's second command an empty standard input (the first had read it)."""
    assert refusal_of(script, OUTPUT_ROOT=str(tmp_path), **env) == f"{script}: error: {message}"


def test_endless_generation_refuses_an_output_folder_it_cannot_make_before_generating(tmp_path):
    """OUTPUT_DIR naming a file (or a folder under one) was found only when the first JSON was written, after the
    generation (100,000 tokens by default), and ended in a FileExistsError traceback."""
    (tmp_path / "afile").write_text("")
    for output in ("afile", "afile/sub"):
        assert refusal_of("run_endless_generation.sh", OUTPUT_DIR=str(tmp_path / output), LENGTHS="20") == (
            f"run_endless_generation.sh: error: OUTPUT_DIR {tmp_path / output}: {tmp_path / 'afile'} is a file, not a folder")


def test_run_everything_gives_every_step_the_same_text_and_cache():
    """DATA, N_SINK and WINDOW_SIZE in the environment reached step 3 (run_kvpress_streaming_decode.sh reads them)
    and no other: one folder held results on two texts, and its summary was refused."""
    lines = commands_of("run_everything.sh", DATA=__file__, N_SINK="2", WINDOW_SIZE="60")
    assert len(lines) >= 5 and not any("--data" in line for line in lines)
    kvpress = next(line for line in lines if "kvpress_decode_shipped" in line)
    assert "--n-sink 4 --window-size 1020 " in kvpress


def write_fake_result(folder: Path, method: str, num_tokens: int, n_sink: int = 4, window_size: int = 16,
                      model: str = "tiny", text: str = "text.txt", sha256: str = "0" * 64) -> None:
    import torch

    from streaming_llm.eval.results import write_result

    record = {"model": model, "data": {"name": text, "kind": "file", "path": f"/texts/{text}", "sha256": sha256},
              "num_tokens": num_tokens, "n_sink": n_sink, "window_size": window_size, "method": method,
              "evaluator": "block32", "perplexity": 2.0, "tokens_per_s": 100.0, "wall_s": 1.0, "extra": {}}
    write_result(folder, f"{model}__{text}__{method}__T{num_tokens}", record, torch.full((num_tokens - 1,), 0.5))


def test_summary_keeps_to_one_text_with_data(experiment, tmp_path):
    """--model could not separate texts: a folder of one model's results on two texts was refused with 'pass
    --model' even when --model was passed (the filter looked only at the model). --data picks the text (by its data
    label, its name or the path given to eval) and the refusal names the options that tell the results apart."""
    script = experiment("summarize_results")
    for text, sha256 in (("text.txt", "0" * 64), ("other.txt", "1" * 64)):
        write_fake_result(tmp_path, "dense", 64, text=text, sha256=sha256)
    options = ["--num-tokens", "120", "--n-sink", "4", "--window-size", "16", "--output-dir", str(tmp_path)]
    for model in ([], ["--model", "tiny"], ["--model", "some/folder/tiny"]):
        with pytest.raises(ValueError, match=r"several models or texts \(tiny on other-11111111, tiny on text-00000000\): "
                           r"pass --data \(other-11111111 or text-00000000\), or keep"):
            script.main([*options, *model])
    for data in ("text-00000000", "text.txt", "text", "/texts/text.txt"):
        assert script.main([*options, "--model", "tiny", "--data", data]) == 0
    with pytest.raises(ValueError, match="no results"):
        script.main([*options, "--data", "missing.txt"])
    write_fake_result(tmp_path, "dense", 64, model="huge")
    with pytest.raises(ValueError, match=r"pass --model \(huge or tiny\) and --data \(other-11111111 or text-00000000\)"):
        script.main(options)
    assert script.main([*options, "--model", "huge", "--data", "text.txt"]) == 0


def test_summary_shows_only_the_ranges_its_results_cover(experiment, tmp_path):
    """A 64-token stream got columns up to 'tokens 8,192–10,239', all '–'; --context-length 0 a 'tokens 0–0' one."""
    script = experiment("summarize_results")
    for method, tokens in (("dense", 64), ("streaming_pos_shift", 64), ("window", 48)):
        write_fake_result(tmp_path, method, tokens)
    options = ["--num-tokens", "120", "--n-sink", "4", "--window-size", "16", "--output-dir", str(tmp_path)]
    assert script.main(options) == 0
    header = (tmp_path / "summary" / "table__T120__s4_w16.md").read_text().splitlines()[2]  # under "<model> on <text>"
    assert [column.strip() for column in header.split("|") if column.strip().startswith("tokens ")] == [
        "tokens 1–20", "tokens 21–63"]  # before any eviction | the rest of the 64-token stream
    with pytest.raises(ValueError, match=r"^--context-length must be >= 1 \(the model's trained context, in tokens\), got 0$"):
        script.main([*options, "--context-length", "0"])


def test_an_interrupted_summary_keeps_the_previous_table(experiment, tmp_path, monkeypatch):
    """The markdown table was written in place (write_text): a write that failed or was interrupted half-way left a
    truncated table where the previous one had been. It is written to a temporary file and moved in place, as the
    JSON and the figure are."""
    import builtins
    import io

    script = experiment("summarize_results")
    write_fake_result(tmp_path, "dense", 64)
    table = tmp_path / "summary" / "table__T120__s4_w16.md"
    table.parent.mkdir()
    table.write_text("the previous table\n", encoding="utf-8")
    real_open = io.open

    def open_failing_midway(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".md" in str(file):
            def write(data, write=handle.write):
                write(data[: len(data) // 2])
                raise KeyboardInterrupt
            handle.write = write
        return handle

    monkeypatch.setattr(io, "open", open_failing_midway)
    monkeypatch.setattr(builtins, "open", open_failing_midway)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--num-tokens", "120", "--n-sink", "4", "--window-size", "16", "--output-dir", str(tmp_path)])
    monkeypatch.undo()
    assert table.read_text(encoding="utf-8") == "the previous table\n"
    assert sorted(path.name for path in table.parent.iterdir()) == [table.name]


def test_summary_refuses_a_folder_that_is_not_there_and_expands_a_tilde(tmp_path, monkeypatch):
    """A mistyped --output-dir (or a file) was reported as 'no results ... in <dir>' with exit status 1 and without the
    script's name, and --output-dir=~/runs looked for a folder named '~' in the working directory."""
    script = load_script("summarize_results")
    options = ["--num-tokens", "120", "--n-sink", "4", "--window-size", "16"]
    with pytest.raises(ValueError, match=f"^--output-dir {tmp_path}/missing is not a folder \\(of results of streaming-llm eval\\)$"):
        script.main([*options, "--output-dir", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"^no results \\(s4_w16, at most 120 tokens\\) in {tmp_path}/empty$"):
        script.main([*options, "--output-dir", str(tmp_path / "empty")])
    write_fake_result(tmp_path / "home" / "runs", "dense", 64)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert script.main([*options, "--output-dir=~/runs"]) == 0
    assert (tmp_path / "home" / "runs" / "summary" / "table__T120__s4_w16.md").is_file() and not (tmp_path / "~").exists()


def test_summary_refuses_an_empty_output_dir_and_writes_its_table_without_nll_files(experiment, tmp_path, monkeypatch,
                                                                                    capsys):
    """--output-dir "" read and wrote the working directory (Path("") is "."), where every other script refuses it; a
    folder whose results had all lost their NLL files got its table, then exit status 2 from the figure."""
    script = experiment("summarize_results")
    options = ["--num-tokens", "120", "--n-sink", "4", "--window-size", "16"]
    write_fake_result(tmp_path, "dense", 64)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="^--output-dir is empty: give a folder$"):
        script.main([*options, "--output-dir", ""])
    assert not (tmp_path / "summary").exists()
    for path in tmp_path.glob("*.nlls.npy"):
        path.unlink()
    assert script.main([*options, "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "summary" / "table__T120__s4_w16.json").is_file() and not list(tmp_path.glob("*.png"))
    assert capsys.readouterr().err.startswith("no figure: no result has per-token NLLs to draw")


def test_summaries_of_two_models_or_texts_in_one_folder_do_not_replace_each_other(experiment, tmp_path):
    """summarize_results named its table and figure by length, sinks and window only: summarizing model A, then
    model B in one folder replaced A's table with B's, and the table never named its model. The names carry the model
    and text where the folder holds several; the table names them and its JSON records them."""
    script = experiment("summarize_results")
    options = ["--num-tokens", "120", "--n-sink", "4", "--window-size", "16", "--output-dir", str(tmp_path)]
    write_fake_result(tmp_path, "dense", 64)
    assert script.main(options) == 0  # one stream: the name it always had
    assert json.loads((tmp_path / "summary" / "table__T120__s4_w16.json").read_text())["model"] == "tiny"
    write_fake_result(tmp_path, "dense", 64, model="huge")
    for model in ("tiny", "huge"):
        assert script.main([*options, "--model", model]) == 0
        written = json.loads((tmp_path / "summary" / f"table__{model}__text-00000000__T120__s4_w16.json").read_text())
        assert {key: written[key] for key in ("model", "data", "n_sink", "window_size", "dtype")} == {
            "model": model, "data": "text-00000000", "n_sink": 4, "window_size": 16, "dtype": "float32"}
        table = (tmp_path / "summary" / f"table__{model}__text-00000000__T120__s4_w16.md").read_text()
        assert table.startswith(f"{model} on text-00000000, float32\n")
        assert (tmp_path / f"nll_curves__{model}__text-00000000__T120__s4_w16.png").is_file()


def test_decode_perplexity_summary_records_its_stream_and_keeps_other_texts_and_methods(tiny_chat_model, tmp_path):
    """run_decode_perplexity's summary was named by length, sinks and window only and recorded no model, text nor
    dtype: a run on another text, or of another method, replaced it. It records them now, is named by model and text
    where the folder holds several, and a run of other methods on the same stream adds its rows."""
    script = load_script("run_decode_perplexity")
    options = ["--model", str(tiny_chat_model), "--n-sink", "2", "--window-size", "14", "--num-tokens", "40",
               "--block-size", "8", "--quiet", "--output-dir", str(tmp_path)]
    for methods in ("streaming_pos_shift", "streaming_rerotate"):
        assert script.main([*options, "--methods", methods]) == 0
    written = json.loads((tmp_path / "summary" / "decode_vs_parallel__T40__s2_w14.json").read_text())
    assert {key: written[key] for key in ("model", "data", "n_sink", "window_size", "dtype")} == {
        "model": "tiny", "data": "shakespeare-c8d9c271", "n_sink": 2, "window_size": 14, "dtype": "float32"}
    assert [row["method"] for row in written["rows"]] == ["streaming_pos_shift", "streaming_rerotate"]
    text = tmp_path / "other.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40)
    assert script.main([*options, "--data", str(text)]) == 0
    [other] = (tmp_path / "summary").glob("decode_vs_parallel__tiny__other-*__T40__s2_w14.json")
    assert json.loads(other.read_text())["data"] == other.name.split("__")[2]
    assert json.loads((tmp_path / "summary" / "decode_vs_parallel__T40__s2_w14.json").read_text()) == written


def test_long_prompt_memory_records_what_it_measured(tmp_path, capsys):
    """The measurement behind the long-prompt numbers (results/generation/long_prompt_8192*.json): a one-line summary
    and a JSON record of the prompt, the cache, the memory, the time, the next tokens and the commit; a bad length is
    refused first."""
    import json

    script = load_script("long_prompt_memory")
    with pytest.raises(SystemExit):
        script.main(["--prompt-tokens", "0"])
    assert "--prompt-tokens must be >= 1, got 0" in capsys.readouterr().err
    assert script.main(["--prompt-tokens", "300", "--output", str(tmp_path / "out" / "long.json")]) == 0
    assert capsys.readouterr().out.startswith("prompt 300 tokens: peak RSS growth ")  # its one-line summary
    record = json.loads((tmp_path / "out" / "long.json").read_text())
    assert record["prompt_tokens"] == 300 and (record["n_sink"], record["window_size"]) == (4, 60)
    assert len(record["next_tokens"]) == 2 and record["peak_rss_growth_mib"] >= 0 and record["seconds"] > 0


def test_sliding_ring_memory_refuses_bad_options_before_building_its_model(tmp_path, capsys):
    """The measurement behind docs/performance.md's sliding-ring table (results/generation/sliding_ring_gemma3_1b*.json)
    checks its options and output file before the 26-layer model is built."""
    script = load_script("sliding_ring_memory")
    (tmp_path / "folder.json").mkdir()
    for argv, message in ((["--prompt-tokens", "4"], "--prompt-tokens must be >= 5"), (["--steps", "0"], "--steps must be >= 1"),
                          (["--output", str(tmp_path / "folder.json")], "is a folder: give a file path in it")):
        with mock.patch.object(script, "measure", side_effect=AssertionError("measured")), pytest.raises(SystemExit):
            script.main(argv)
        assert message in capsys.readouterr().err


def test_sliding_ring_memory_counts_kv_mib_by_layer_kind_and_times_in_ms(monkeypatch):
    """measure() (here with 2 of the shape's layers, a sliding one with an 8-token window then a full one, 4 kv heads of
    256, window_size 1020) counts every buffer of each layer kind in MiB: the sliding layer's 8 key and 8 value slots
    (it keeps no sink keys); the full layer's 1025 key and value slots and its 4 sink keys; and times the prompt in
    seconds and each decode step in milliseconds (clock injected: every reading 0.25 s after the last)."""
    import itertools
    import types

    import torch

    from streaming_llm.bench.latency import shape_config

    script = load_script("sliding_ring_memory")

    def two_layers():
        from transformers import Gemma3ForCausalLM

        config = shape_config("gemma3-1b-attention", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                              sliding_window=8, hidden_size=64, intermediate_size=64, num_key_value_heads=4,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        return Gemma3ForCausalLM(config).eval(), config.layer_types

    clock = itertools.count(0.0, 0.25)
    monkeypatch.setattr(script, "gemma3_1b_attention", two_layers)
    monkeypatch.setattr(script, "WINDOW_SIZE", 1020)
    monkeypatch.setattr(script, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    threads = torch.get_num_threads()
    try:
        record = script.measure(40, 3)
    finally:
        torch.set_num_threads(threads)
    slot = 4 * 256 * 4  # bytes of one token's keys (or values) in a layer: 4 kv heads x 256 dims x fp32
    assert record["kv_mib"] == {"sliding_attention": round(2 * 8 * slot / 2**20, 2),  # 0.06
                                "full_attention": round((2 * 1025 + 4) * slot / 2**20, 2)}  # 8.02
    assert record["kv_mib_total"] == round((2 * 8 + 2 * 1025 + 4) * slot / 2**20, 2) == 8.09
    assert (record["prompt_s"], record["step_ms_median"], record["steps"], record["window_size"]) == (0.25, 250.0, 3, 1020)
    assert len(record["last_logits_head"]) == 8 and record["step_kind"] == "eager"


def test_long_prompt_memory_reports_kib_growth_in_mib_and_writes_nothing_without_output(tmp_path, capsys, monkeypatch):
    """Linux's ru_maxrss is in KiB: a peak 2048 KiB above the one before the call is 2.0 MiB (readings injected); without
    --output only the summary is printed (run from tmp_path: a file written to a default relative path would land
    there), and a bad --output is refused before the measurement."""
    import types

    monkeypatch.chdir(tmp_path)
    script = load_script("long_prompt_memory")
    import resource

    readings = iter([1000, 1000, 3048])  # main's check that there is a reading, then before and after the call
    with mock.patch.object(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=next(readings))), \
            mock.patch.object(sys, "platform", "linux"):
        assert script.main(["--prompt-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt 100 tokens: peak RSS growth 2 MiB, ") and list(tmp_path.iterdir()) == []
    (tmp_path / "folder.json").mkdir()
    with mock.patch.object(script, "measure", side_effect=AssertionError("measured")), pytest.raises(SystemExit):
        script.main(["--output", str(tmp_path / "folder.json")])
    assert "is a folder: give a file path in it" in capsys.readouterr().err


def test_experiments_take_their_smallest_options_and_long_prompt_decodes_greedily(capsys):
    """sliding_ring_memory accepts its smallest run (--prompt-tokens 5: the sinks and one token; --steps 1) and prints
    the record's summary; long_prompt_memory decodes its next tokens greedily (two runs, or two commits, compare them):
    generate() is asked for no sampling and the two tokens it returns are recorded."""
    scripts = {name: load_script(name) for name in ("sliding_ring_memory", "long_prompt_memory")}
    record = {"kv_mib_total": 1.0, "kv_mib": {}, "step_ms_median": 2.0, "prompt_s": 3.0, "last_logits_head": [0.5, 0.25, 0.125],
              "commit": "abc"}
    with mock.patch.object(scripts["sliding_ring_memory"], "measure", return_value=record) as measure:
        assert scripts["sliding_ring_memory"].main(["--prompt-tokens", "5", "--steps", "1"]) == 0
    measure.assert_called_once_with(5, 1)
    assert capsys.readouterr().out == ("KV 1.0 MiB ({}), decode step 2.0 ms (median of 1), prompt 3.0 s, logits "
                                       "[0.5, 0.25, 0.125] (commit abc)\n")
    from transformers import GenerationMixin

    calls, original = [], GenerationMixin.generate

    def generate(self, *args, **kwargs):
        calls.append((kwargs, original(self, *args, **kwargs)))
        return calls[-1][1]

    with mock.patch.object(GenerationMixin, "generate", generate):
        record = scripts["long_prompt_memory"].measure(100)
    [(kwargs, out)] = calls
    assert kwargs["do_sample"] is False and record["next_tokens"] == out[0, 100:].tolist() and len(out[0]) == 102


def test_compiled_wrapper_memory_records_each_wrapper_alive_and_dropped(tmp_path, capsys):
    """The measurement behind docs/performance.md's figures of what a compiled (or frozen) wrapper leaves behind
    (results/latency/cpu_embedded_fp32_compiled_wrapper_memory*.json): a record per wrapper, with it alive and after it
    is dropped, over the model alone, and the step per wrapper after the first; bad options are refused first."""
    script = load_script("compiled_wrapper_memory")
    for options, message in ((["--wrappers", "0"], "--wrappers must be >= 1, got 0"),
                             (["--tokens", "64"], "--tokens must be more than the capacity, 64, got 64")):
        with pytest.raises(SystemExit):
            script.main(["--model", "tiny", *options])
        assert message in capsys.readouterr().err
    output = tmp_path / "out" / "memory.json"
    assert script.main(["--model", "tiny", "--wrappers", "2", "--tokens", "70", "--output", str(output)]) == 0
    assert "freeze_weights=False: MiB over the model, with each wrapper -> after it is dropped: " in capsys.readouterr().out
    record = json.loads(output.read_text())
    assert (record["model"], record["freeze_weights"], record["tokens"]) == ("tiny-llama-random", False, 70)
    assert [r["wrapper"] for r in record["over_the_model_alone"]] == [1, 2]
    left = [r["after_drop_mib"] for r in record["over_the_model_alone"]]
    assert record["left_per_wrapper_after_the_first_mib"] == round(left[1] - left[0], 1)
