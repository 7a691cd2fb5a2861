"""Interrupted evaluation resumes from its last checkpoint and ends with the same numbers (issue 6)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from streaming_llm.eval.harness import CHECKPOINT_SUFFIX, run_method
from streaming_llm.eval.methods import METHODS
from streaming_llm.eval.perplexity import compute_perplexity
from streaming_llm.eval.results import read_result, tokens_fingerprint
from tiny_models import make_wrapper, random_ids

DATA = {"name": "random", "kind": "test", "sha256": "fedcba9876543210"}


class Interrupted(Exception):
    pass


def _run(model, output_dir, method, on_block=None, force=False, ids=None):
    ids = random_ids(120, seed=11)[None] if ids is None else ids
    return run_method(
        METHODS[method], copy.deepcopy(model), ids, model_name="tiny-llama", data=DATA,
        n_sink=2, window_size=10, block_size=8, output_dir=output_dir, force=force, on_block=on_block,
        checkpoint_every=16,
    )


def _interrupt_at(step: int):
    def on_block(end, nlls):
        if end >= step:
            raise Interrupted(end)

    return on_block


@pytest.mark.parametrize("method", ["streaming_pos_shift", "mit", "dense", "kvpress_decode_corrected"])
def test_resume_after_interruption_gives_the_same_numbers(llama_model, tmp_path, method):
    uninterrupted = _run(llama_model, tmp_path / "whole", method)
    _, expected_nlls = read_result(uninterrupted.json_path)

    with pytest.raises(Interrupted):
        _run(llama_model, tmp_path / "cut", method, on_block=_interrupt_at(72))
    files = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert len(files) == 1 and files[0].endswith(CHECKPOINT_SUFFIX), files  # a checkpoint, no result

    scored_blocks = []
    resumed = _run(llama_model, tmp_path / "cut", method, on_block=lambda end, nlls: scored_blocks.append(end))
    record, nlls = read_result(resumed.json_path)
    assert record["resumed_from_step"] in (64, 72) and not resumed.skipped
    # the checkpoint's steps are replayed, not scored again: the first block scored ends past the resume point
    assert scored_blocks and min(scored_blocks) > record["resumed_from_step"], scored_blocks
    assert np.array_equal(nlls, expected_nlls)  # bit for bit: the same blocks were replayed
    assert record["perplexity"] == uninterrupted.record["perplexity"]
    assert not any(p.name.endswith(CHECKPOINT_SUFFIX) for p in (tmp_path / "cut").iterdir())


def test_force_ignores_a_checkpoint(llama_model, tmp_path):
    with pytest.raises(Interrupted):
        _run(llama_model, tmp_path, "streaming_pos_shift", on_block=_interrupt_at(40))
    record, _ = read_result(_run(llama_model, tmp_path, "streaming_pos_shift", force=True).json_path)
    assert "resumed_from_step" not in record


def test_results_and_checkpoints_of_another_token_stream_of_the_same_text_are_refused(llama_model, tmp_path):
    """Result names carry the text's sha256, not its tokenization: the same text tokenized with a BOS (or by another
    tokenizer) is another stream of ids. Its result was printed as `skipped (exists)`, and its checkpoint's NLLs were
    resumed into the other stream's result; both are refused now, and the same stream is reused and resumed as before."""
    ids = random_ids(120, seed=11)[None]
    with_bos = torch.cat([torch.tensor([[1]]), ids[:, :-1]], dim=1)  # the same text with a BOS, cut to the same length
    first = _run(llama_model, tmp_path, "streaming_pos_shift", ids=ids)
    assert first.record["tokens_fingerprint"] == tokens_fingerprint(ids) != tokens_fingerprint(with_bos)
    with pytest.raises(ValueError, match=f"{first.json_path} was scored on another token stream of the same text "
                       r"\(fingerprint [0-9a-f]{16}, this stream [0-9a-f]{16}: another tokenizer, or a BOS added or "
                       r"not\); use another --output-dir, or --force to replace it"):
        _run(llama_model, tmp_path, "streaming_pos_shift", ids=with_bos)
    assert _run(llama_model, tmp_path, "streaming_pos_shift", ids=ids).skipped  # the same stream: reused
    forced = _run(llama_model, tmp_path, "streaming_pos_shift", ids=with_bos, force=True)
    assert not forced.skipped and forced.record["tokens_fingerprint"] == tokens_fingerprint(with_bos)
    # a result written before tokens fingerprints existed (every committed one) is taken as it was
    record = json.loads(first.json_path.read_text())
    del record["tokens_fingerprint"]
    first.json_path.write_text(json.dumps(record))
    assert _run(llama_model, tmp_path, "streaming_pos_shift", ids=ids).skipped

    # A checkpoint of the BOS stream's unfinished run is refused by the other stream, resumed by its own.
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        _run(llama_model, cut, "mit", on_block=_interrupt_at(40), ids=with_bos)
    (checkpoint,) = cut.iterdir()
    with pytest.raises(ValueError, match=f"{checkpoint} was scored on another token stream of the same text"):
        _run(llama_model, cut, "mit", ids=ids)
    resumed = _run(llama_model, cut, "mit", ids=with_bos)
    assert resumed.record["resumed_from_step"] == 32 and resumed.record["tokens_fingerprint"] == tokens_fingerprint(with_bos)


def test_resume_only_at_a_block_boundary(llama_model, capsys):
    """Replaying an interrupted run rebuilds its cache only if it stopped where a block ended: any other resume
    point (a checkpoint of another block size, or of a longer stream) is refused."""
    input_ids = random_ids(40, seed=12)[None]
    wrapper = make_wrapper(llama_model, 2, 10)
    whole = compute_perplexity(wrapper, input_ids, block_size=8)
    # The checkpoint's NLLs are taken as given (marked here by + 100, which no rescoring reproduces), and the
    # steps after them scored on the replayed cache equal the uninterrupted run's.
    marked = whole.nlls[:16] + 100.0
    resumed = compute_perplexity(wrapper, input_ids, block_size=8, resume_nlls=marked)
    assert np.array_equal(resumed.nlls[:16].numpy(), marked.numpy())
    assert np.array_equal(resumed.nlls[16:].numpy(), whole.nlls[16:].numpy())
    for first in (12, 40):  # inside a block; past the 39 steps of the stream
        with pytest.raises(ValueError, match=f"cannot resume at step {first}"):
            compute_perplexity(wrapper, input_ids, block_size=8, resume_nlls=whole.nlls.new_zeros(first))
    # A run that had scored every step (39, inside the last block) resumes to its own numbers.
    finished = compute_perplexity(wrapper, input_ids, block_size=8, resume_nlls=whole.nlls)
    assert np.array_equal(finished.nlls.numpy(), whole.nlls.numpy()) and finished.perplexity == whole.perplexity
    assert capsys.readouterr().err == ""  # no progress bar unless asked


def test_tokens_per_second_counts_the_predictions():
    """T tokens make T - 1 predictions."""
    import torch

    from streaming_llm.eval.perplexity import PerplexityResult

    assert PerplexityResult(2.0, torch.zeros(10), num_tokens=11, wall_s=2.0).tokens_per_s == 5.0
    assert PerplexityResult(2.0, torch.zeros(10), num_tokens=11, wall_s=0.0).tokens_per_s == float("inf")
