"""The experiment scripts' command lines: each shell entry point only calls the CLI, so what matters is which
commands it runs with which options. PYTHON=echo prints them instead of running them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def commands_of(script: str, cwd: Path | None = None, **env: str) -> list[str]:
    """The command lines `script` would run (PYTHON=echo), one per line of its stdout, run from `cwd`."""
    completed = subprocess.run(
        ["bash", str(ROOT / "experiments" / script)], env={**os.environ, "PYTHON": "echo", **env},
        capture_output=True, text=True, check=True, timeout=60, cwd=cwd,
    )
    return completed.stdout.splitlines()


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
    with pytest.raises(SystemExit, match="holds results of several models or texts"):
        summarize_results.main(summary)
    assert summarize_results.main([*summary, "--model", "model_a"]) == 0


def test_gpu_scripts_say_they_need_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    completed = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_step_breakdown.py")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip() == ("gpu_step_breakdown.py: error: --device cuda: no CUDA device here (this script "
                                        "measures the GPU; --device cpu for a small smoke run where it offers one)")
