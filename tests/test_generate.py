"""model.generate() through a StreamingKVCache, far past its capacity, against the wrapper's own greedy loop.

generate() feeds the prompt, then one token per step; the wrapper loop below feeds exactly the same tokens
(prompt as one block, then each argmax). Both follow SEMANTICS.md, so tokens and logits must agree.
"""

import copy

import pytest
import torch
from streaming_llm import StreamingKVCache, prepare_model
from reference import naive_streaming_logits
from tiny_models import make_wrapper, max_abs_diff, random_ids
from transformers import LogitsProcessor, LogitsProcessorList

N_SINK, WINDOW_SIZE = 4, 60
CAPACITY = N_SINK + WINDOW_SIZE
TOLERANCE = 1e-4


class CacheLengthRecorder(LogitsProcessor):
    """Records (tokens generate() has fed so far, cache length, seen length) at every step; scores untouched."""

    def __init__(self, cache: StreamingKVCache):
        self.cache = cache
        self.steps: list[tuple[int, int, int]] = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.shape[1], self.cache.get_cache_length(), self.cache.get_seq_length()))
        return scores


def greedy_generate(model, cache, input_ids, max_new_tokens):
    """(all ids [1, n + max_new_tokens], raw logits [max_new_tokens, vocab], recorder)."""
    recorder = CacheLengthRecorder(cache)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([recorder]),
        return_dict_in_generate=True,
        output_logits=True,
    )
    return output.sequences, torch.cat(output.logits).float(), recorder


def wrapper_greedy(wrapper, prompt: torch.Tensor, max_new_tokens: int):
    """The wrapper's own loop: feed the prompt, then argmax, feed it, ...; returns (new ids [n], logits [n, vocab])."""
    logits = wrapper(prompt[None])[0, -1]
    new_ids, step_logits = [], []
    for step in range(max_new_tokens):
        step_logits.append(logits.float())
        new_ids.append(int(logits.argmax()))
        if step + 1 < max_new_tokens:  # generate() never feeds its last token either
            logits = wrapper(torch.tensor([[new_ids[-1]]]))[0, -1]
    return torch.tensor(new_ids), torch.stack(step_logits)


def check_recorded_lengths(recorder):
    for fed, cache_length, seen in recorder.steps:
        assert seen == fed
        assert cache_length == min(fed, CAPACITY) <= CAPACITY


def test_generate_runs_far_past_capacity(llama_model):
    model = prepare_model(copy.deepcopy(llama_model))
    cache = StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE)
    prompt = random_ids(10, seed=40)[None]
    sequences, logits, recorder = greedy_generate(model, cache, prompt, max_new_tokens=300)
    assert sequences.shape == (1, 310) and torch.equal(sequences[:, :10], prompt)
    assert cache.get_cache_length() <= CAPACITY
    assert len(recorder.steps) == 300
    check_recorded_lengths(recorder)

    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    expected_ids, expected_logits = wrapper_greedy(wrapper, prompt[0], 300)
    assert torch.equal(sequences[0, 10:], expected_ids)
    assert max_abs_diff(logits, expected_logits) <= TOLERANCE
    # And both are the naive reference on the generated stream (the logit fed at i-1 chose token i).
    reference = naive_streaming_logits(llama_model, sequences[0, :-1], N_SINK, WINDOW_SIZE)
    assert max_abs_diff(logits, reference[9:]) <= TOLERANCE


def test_multi_turn_generate_through_one_cache(llama_model):
    """Each turn passes the whole conversation so far; the cache feeds only what it has not seen yet."""
    model = prepare_model(copy.deepcopy(llama_model))
    cache = StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE)
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    user_turns = [random_ids(20, seed=41), random_ids(15, seed=42), random_ids(12, seed=43)]
    new_tokens = 80

    conversation = torch.zeros(0, dtype=torch.long)
    turn_logits = {}  # first generated index of each turn -> generate()'s logits for that turn
    pending = torch.zeros(0, dtype=torch.long)  # the wrapper's side: tokens generate() has not fed yet
    for user_ids in user_turns:
        conversation = torch.cat([conversation, user_ids])
        sequences, logits, recorder = greedy_generate(model, cache, conversation[None], new_tokens)
        assert torch.equal(sequences[0, : len(conversation)], conversation)
        check_recorded_lengths(recorder)

        expected_ids, expected_logits = wrapper_greedy(wrapper, torch.cat([pending, user_ids]), new_tokens)
        assert torch.equal(sequences[0, len(conversation) :], expected_ids)
        assert max_abs_diff(logits, expected_logits) <= TOLERANCE
        turn_logits[len(conversation)] = logits
        conversation = sequences[0]
        pending = expected_ids[-1:]

    assert len(conversation) > 3 * CAPACITY
    assert cache.get_seq_length() == len(conversation) - 1 == wrapper.cache.get_seq_length()
    assert cache.get_cache_length() == CAPACITY
    reference = naive_streaming_logits(llama_model, conversation[:-1], N_SINK, WINDOW_SIZE)
    for first, logits in turn_logits.items():
        assert max_abs_diff(logits, reference[first - 1 : first - 1 + new_tokens]) <= TOLERANCE


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "smollm3", "exaone4", "afmoe", "cohere", "cohere2",
                                        "glm", "gpt_oss"])
def test_generate_with_per_layer_rope_and_soft_capping(model_type):
    """model.generate rotates q and k at the stream positions, which the cache undoes: Gemma 3 with a RoPE per layer
    type, SmolLM3, EXAONE 4 and AFMoE, which pass no cos/sin to the cache (taken from the position ids) and have a layer
    without RoPE, Gemma 2's soft-capped scores, interleaved rotary with the angles interleaved (Cohere; Cohere 2 with a
    layer without RoPE that is passed them anyway) or not (GLM, partial); far past the capacity, each equals the naive
    reference."""
    from tiny_models import build_llama_family

    model = build_llama_family(model_type)
    prompt = random_ids(10, seed=41)[None]
    sequences, logits, recorder = greedy_generate(prepare_model(copy.deepcopy(model)),
                                                  StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE), prompt, 110)
    check_recorded_lengths(recorder)
    reference = naive_streaming_logits(model, sequences[0, :-1], N_SINK, WINDOW_SIZE)
    assert max_abs_diff(logits, reference[9:]) <= TOLERANCE


def test_a_prompt_far_longer_than_the_cache_is_attended_in_linear_space(llama_model, monkeypatch):
    """generate() gives the model the whole prompt as one block. Each layer attends it a piece of capacity + 1 tokens
    at a time, each piece over the held slots and itself, never the whole prompt (its scores against itself took
    3.6 GB and 12 s for an 8,192-token prompt at capacity 64 on a 2-layer model); the tokens are the wrapper's."""
    from streaming_llm import cache as cache_module

    widest = []
    attend_block = cache_module.StreamingLayer.attend_block

    def recording(self, query_raw, keys_raw, *args, **kwargs):
        output, stored_keys, new_positions = attend_block(self, query_raw, keys_raw, *args, **kwargs)
        widest.append((query_raw.shape[-2], int(new_positions[-1])))
        return output, stored_keys, new_positions

    monkeypatch.setattr(cache_module.StreamingLayer, "attend_block", recording)
    model = prepare_model(copy.deepcopy(llama_model))
    prompt = random_ids(1200, seed=44)[None]
    sequences, logits, _ = greedy_generate(model, StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE), prompt, 20)
    assert max(queries for queries, _ in widest) == CAPACITY + 1
    assert max(last for _, last in widest) == 1199  # the whole prompt went through attend_block, piece by piece
    monkeypatch.undo()
    expected_ids, expected_logits = wrapper_greedy(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), prompt[0], 20)
    assert torch.equal(sequences[0, 1200:], expected_ids)
    assert max_abs_diff(logits, expected_logits) <= TOLERANCE
