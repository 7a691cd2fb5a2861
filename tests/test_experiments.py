"""The experiment scripts' command lines: each shell entry point only calls the CLI, so what matters is which
commands it runs with which options. PYTHON=echo prints them instead of running them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def commands_of(script: str, **env: str) -> list[str]:
    """The command lines `script` would run (PYTHON=echo), one per line of its stdout."""
    completed = subprocess.run(
        ["bash", str(ROOT / "experiments" / script)], env={**os.environ, "PYTHON": "echo", **env},
        capture_output=True, text=True, check=True, timeout=60,
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
