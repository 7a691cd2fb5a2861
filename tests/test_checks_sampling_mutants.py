"""Behaviour of streaming_llm/checks.py and streaming_llm/sampling.py that no other test pinned down directly (found
by mutation testing): SamplingConfig's bounds at their exact edges, its defaults and immutability, and the kvpress
adapters' refusal of an empty token input (it reached torch.cat and the model's reshape before)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import build_llama, random_ids

from streaming_llm.sampling import SamplingConfig


def test_sampling_config_defaults_are_the_documented_ones():
    """docs/generation.md: greedy, no top-k or top-p limit, no penalty, a repetition window of 64, no seed."""
    assert dataclasses.astuple(SamplingConfig()) == (0.0, 0, 1.0, 1.0, 64, None)
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy


def test_a_sampling_config_cannot_be_changed_once_made():
    """A config is shared by a stream and its sampler (and hashed as a value): changing it afterwards is refused."""
    config = SamplingConfig(top_k=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 0  # type: ignore[misc]
    assert hash(config) == hash(SamplingConfig(top_k=5))


@pytest.mark.parametrize("top_p", [1, 1.0, 0.5, 1e-9])
def test_top_p_up_to_one_is_accepted(top_p):
    assert SamplingConfig(top_p=top_p).top_p == top_p


@pytest.mark.parametrize("top_p", [1.0000001, 1.5, 2, 0, -0.1])
def test_top_p_outside_zero_to_one_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingConfig(top_p=top_p)


@pytest.mark.parametrize("window", [1, 2, 2**31 - 1])
def test_a_repetition_window_from_one_token_to_below_2_to_the_31_is_accepted(window):
    assert SamplingConfig(repetition_window=window).repetition_window == window


@pytest.mark.parametrize("window, message", [
    (0, "repetition_window must be an integer >= 1"),
    (2**31, "repetition_window must be < 2\\*\\*31, got 2147483648"),
    (2**32, "repetition_window must be < 2\\*\\*31"),
])
def test_a_repetition_window_outside_its_range_is_refused(window, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(repetition_window=window)


@pytest.fixture(scope="module")
def kvpress_model():
    pytest.importorskip("kvpress")
    return build_llama()


EMPTY = torch.zeros(1, 0, dtype=torch.long)
REFUSED_EMPTY = r"must be an integer tensor of token ids of shape \[1, n\], n >= 1; got shape \(1, 0\)"


@pytest.mark.parametrize("call", ["step", "prefill"])
def test_the_kvpress_stepper_refuses_an_empty_input_by_name(kvpress_model, call):
    """An empty [1, 0] input was accepted, then failed in torch.cat (step) or in the model's reshape (prefill)."""
    from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

    stepper = KvpressDecodeStepper(kvpress_model, n_sink=2, window_size=6)
    with pytest.raises(ValueError, match="input_ids " + REFUSED_EMPTY):
        getattr(stepper, call)(EMPTY)
    assert stepper.tokens_seen == 0
    assert stepper.step(random_ids(1, seed=0, batch=1)).shape[:2] == (1, 1)  # one token is enough


def test_the_kvpress_prefill_compression_refuses_an_empty_context_by_name(kvpress_model):
    from streaming_llm.eval.kvpress_adapters import kvpress_prefill_compress, kvpress_score_continuation

    with pytest.raises(ValueError, match="context_ids " + REFUSED_EMPTY):
        kvpress_prefill_compress(kvpress_model, EMPTY, n_sink=2, window_size=6)
    prefill = kvpress_prefill_compress(kvpress_model, random_ids(1, seed=0, batch=1), n_sink=2, window_size=6)
    with pytest.raises(ValueError, match="continuation_ids " + REFUSED_EMPTY):
        kvpress_score_continuation(kvpress_model, prefill, EMPTY)
    assert kvpress_score_continuation(kvpress_model, prefill, random_ids(1, seed=1, batch=1)).shape == (1,)
