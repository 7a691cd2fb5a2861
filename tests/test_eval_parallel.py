"""The exact parallel evaluator (SEMANTICS.md §5): scoring in blocks gives the decode loop's per-token NLLs.

Every method with feed="exact" is scored by compute_perplexity with block_size=1 (the decode loop) and with
larger blocks, on the tiny Llama and GPTNeoX models and on the real embedded model; |ΔNLL| <= 1e-4 per token.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from streaming_llm.eval.methods import METHODS, get_methods
from streaming_llm.eval.perplexity import compute_perplexity
from tiny_models import random_ids

TOLERANCE = 1e-4
EXACT_METHODS = [method.name for method in METHODS.values() if method.feed == "exact"]


def _nlls(model, method_name: str, ids: torch.Tensor, n_sink: int, window_size: int, block_size: int) -> torch.Tensor:
    stepper = METHODS[method_name].build(copy.deepcopy(model), n_sink, window_size)
    return compute_perplexity(stepper, ids, block_size=block_size).nlls


@pytest.mark.parametrize("method_name", EXACT_METHODS)
@pytest.mark.parametrize("block_size", [7, 64])
def test_blocks_equal_decode_loop(model, method_name, block_size):
    """40 tokens through a capacity of 2 + 9: eviction starts at token 11, blocks cross it and the window."""
    ids = random_ids(40, seed=3)[None]
    decode = _nlls(model, method_name, ids, n_sink=2, window_size=9, block_size=1)
    blocks = _nlls(model, method_name, ids, n_sink=2, window_size=9, block_size=block_size)
    assert decode.shape == blocks.shape == (39,)
    assert (decode - blocks).abs().max().item() <= TOLERANCE


def test_methods_differ_once_tokens_are_evicted(llama_model):
    """The comparison is not vacuous: window, streaming and dense give different NLLs past the capacity,
    and equal ones before it."""
    ids = random_ids(40, seed=4)[None]
    runs = {name: _nlls(llama_model, name, ids, 2, 9, 8) for name in ("dense", "window", "streaming_pos_shift")}
    capacity = 11
    for name in ("window", "streaming_pos_shift"):
        assert (runs[name][:capacity] - runs["dense"][:capacity]).abs().max().item() <= TOLERANCE
        assert (runs[name][capacity:] - runs["dense"][capacity:]).abs().max().item() > 1e-3
    assert (runs["window"][capacity:] - runs["streaming_pos_shift"][capacity:]).abs().max().item() > 1e-3


def test_mit_and_rerotate_equal_pos_shift(model):
    ids = random_ids(30, seed=5)[None]
    pos_shift = _nlls(model, "streaming_pos_shift", ids, 3, 6, 10)
    for name in ("mit", "streaming_rerotate"):
        assert (_nlls(model, name, ids, 3, 6, 10) - pos_shift).abs().max().item() <= TOLERANCE


def test_recompute_equals_streaming_before_eviction_and_batches_exactly(llama_model):
    """Recompute re-encodes the last capacity+1 tokens: before any eviction that is the dense prefix;
    batching its windows (block size) never changes a number."""
    ids = random_ids(24, seed=6)[None]
    one = _nlls(llama_model, "recompute", ids, 2, 6, 1)
    batched = _nlls(llama_model, "recompute", ids, 2, 6, 16)
    dense = _nlls(llama_model, "dense", ids, 2, 6, 24)
    assert (one - batched).abs().max().item() <= TOLERANCE
    assert (one[:8] - dense[:8]).abs().max().item() <= TOLERANCE


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method"):
        get_methods("dense,streaming")
    assert [m.name for m in get_methods("all")] == list(METHODS)


def test_decode_only_methods_are_fed_one_token():
    for method in METHODS.values():
        if method.name.startswith("kvpress"):
            assert method.feed == "decode" and method.block_size(256) == 1 and method.evaluator(256) == "decode"


def test_real_model_blocks_equal_decode_loop(embedded_model):
    """120 tokens of the embedded text through 4 sinks + a 32-token window: decode loop vs blocks of 40. Each block is
    longer than the cache (36), so each evicts within itself: the first from an empty cache, the next two from a full
    one. (It was 300 tokens, a 64-token window and blocks of 100, the same three blocks: the decode loop, ~55 ms a
    token on CPU, took 17 s.)"""
    from streaming_llm.data import load_tokens

    model, tokenizer = embedded_model
    ids = load_tokens(tokenizer, None, 120)
    method = METHODS["streaming_pos_shift"]
    decode = compute_perplexity(method.build(model, 4, 32), ids, block_size=1).nlls
    blocks = compute_perplexity(method.build(model, 4, 32), ids, block_size=40).nlls
    assert decode.shape == blocks.shape == (119,)
    assert (decode - blocks).abs().max().item() <= TOLERANCE


def test_sampled_recompute_equals_recompute_stepper(llama_model, tmp_path):
    from streaming_llm.eval.baselines import recompute_nlls_at
    from streaming_llm.eval.harness import perplexity_at, run_recompute_sample, sample_steps

    ids = random_ids(30, seed=13)[None]
    full = _nlls(llama_model, "recompute", ids, 2, 6, 8)
    steps = sample_steps(30, capacity=8, num_samples=5)
    assert steps == [8, 13, 18, 23, 28]
    sampled = recompute_nlls_at(llama_model, ids, 8, [3] + steps, batch_windows=2)
    assert (sampled - full[[3] + steps]).abs().max().item() <= TOLERANCE
    run = run_recompute_sample(llama_model, ids, num_samples=5, model_name="tiny", data={"name": "random"},
                               n_sink=2, window_size=6, output_dir=tmp_path)
    assert run.record["evaluator"] == "sample5" and run.record["extra"]["sampled_steps"] == steps
    assert abs(run.record["perplexity"] - perplexity_at(full, steps)) <= 1e-6 * run.record["perplexity"]
    again = run_recompute_sample(llama_model, ids, num_samples=5, model_name="tiny", data={"name": "random"},
                                 n_sink=2, window_size=6, output_dir=tmp_path)
    assert again.skipped and again.json_path == run.json_path and again.record == json.loads(run.json_path.read_text())
    forced = run_recompute_sample(llama_model, ids, num_samples=5, model_name="tiny", data={"name": "random"},
                                  n_sink=2, window_size=6, output_dir=tmp_path, force=True)
    assert not forced.skipped and forced.record["perplexity"] == run.record["perplexity"]


def test_sampled_recompute_checks_its_arguments(llama_model):
    """Steps 0..T-2 (the last token predicts nothing), capacity >= 1 (1: each token from itself and one before),
    ids of one sequence."""
    from streaming_llm.eval.baselines import recompute_nlls_at

    ids = random_ids(10, seed=14)[None]
    ends = recompute_nlls_at(llama_model, ids, 1, [0, 8])
    assert (ends - _nlls(llama_model, "recompute", ids, 0, 1, 1)[[0, 8]]).abs().max().item() <= TOLERANCE
    for bad in ([-1], [9]):
        with pytest.raises(ValueError, match=r"steps must lie in \[0, 8\]"):
            recompute_nlls_at(llama_model, ids, 4, bad)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        recompute_nlls_at(llama_model, ids, 0, [3])
    for shape in ((10,), (2, 10)):
        with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
            recompute_nlls_at(llama_model, random_ids(10, seed=14).expand(*shape), 4, [3])


@pytest.mark.parametrize("make_logits, fragment", [
    (lambda ids: torch.zeros(2, ids.shape[1], 64), "float logits [1, 3, vocab] for 3 tokens; got torch.float32 (2, 3, 64)"),
    (lambda ids: torch.zeros(ids.shape[1], 64), "got torch.float32 (3, 64)"),
    (lambda ids: torch.zeros(1, ids.shape[1], 64, dtype=torch.long), "got torch.int64 (1, 3, 64)"),
    (lambda ids: [0.0] * ids.shape[1], "got list"),
    (lambda ids: torch.zeros(1, ids.shape[1], 10), "the stepper's logits cover 10 token ids; the text holds id 63"),
    (lambda ids: torch.zeros(1, ids.shape[1], 63), "the stepper's logits cover 63 token ids; the text holds id 63"),
    (lambda ids: torch.zeros(1, ids.shape[1] + 1, 64), "float logits [1, 3, vocab] for 3 tokens; got torch.float32 (1, 4, 64)"),
])
def test_a_stepper_returning_anything_but_its_logits_is_named(make_logits, fragment):
    """compute_perplexity scored row 0 of a [2, n, V] output and integer logits silently, and failed inside
    cross_entropy on others. Logits one token too long, or a vocabulary ending at the text's largest id (even where
    that id is only the last target), are named too."""

    class Stepper:
        def reset(self):
            pass

        def __call__(self, ids):
            return make_logits(ids)

    pattern = fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    for ids in ([[5, 63, 7, 1, 2, 3, 4]], [[5, 6, 7, 1, 2, 3, 63]]):  # the largest id inside, or only as the last target
        with pytest.raises(ValueError, match=pattern):
            compute_perplexity(Stepper(), torch.tensor(ids), block_size=3)


def test_token_nlls_scores_a_block_a_few_rows_at_a_time_with_the_same_values(monkeypatch):
    """A block's logits in float64 at once (256 rows x 49,152 for SmolLM2: 100 MB, twice with the log-softmax) were
    fresh allocations at every block, ~10% of `streaming-llm eval`. On the CPU they are scored a few rows at a time,
    and each row's NLL is bit for bit the one of the whole block's cross-entropy."""
    import torch.nn.functional as F

    from streaming_llm.eval import perplexity

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 49152, generator=generator) * 5
    targets = torch.randint(0, 49152, (256,), generator=generator)
    expected = F.cross_entropy(logits.double(), targets, reduction="none")
    cross_entropy, sizes = F.cross_entropy, []

    def counted(input, target, **kwargs):
        sizes.append(input.numel())
        return cross_entropy(input, target, **kwargs)

    monkeypatch.setattr(perplexity.F, "cross_entropy", counted)
    nlls = perplexity.token_nlls(logits, targets)
    assert nlls.dtype == torch.float64 and torch.equal(nlls, expected)
    assert sum(sizes) == logits.numel() and max(sizes) * 8 <= 4 * 2**20  # 4 MiB of float64 at a time
