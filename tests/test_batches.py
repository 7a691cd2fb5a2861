"""Several independent streams in one batch equal each stream run alone (SEMANTICS §6: max |Δlogit| <= 1e-4, fp32).

Every row of a batch is its own stream with its own sinks and window; rows share only the step count (equal
lengths). Padding has no meaning in a stream (a pad token would become a sink or a window entry), so a batch
with an attention mask that hides tokens must be refused, not silently run.
"""

import copy

import pytest
import torch
from streaming_llm import StreamingKVCache, prepare_model
from tiny_models import block_sizes_covering, feed_stream, make_wrapper, max_abs_diff, random_ids

N_SINK, WINDOW_SIZE = 2, 9  # capacity 11: a 40-token stream evicts, and pos_shift re-bases its frame (every ~12 tokens)
LENGTH, BATCH = 40, 3
TOLERANCE = 1e-4
POSITION_MODES = ("pos_shift", "rerotate", "absolute")
STREAMING_MODES = ("ours", "mit")
FEEDS = {"token_by_token": [1], "blocks": [5, 1, 13, 2, 1, 18]}


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("streaming_mode", STREAMING_MODES)
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_batch_equals_each_stream_alone(model, position_mode, streaming_mode, feed):
    ids = random_ids(LENGTH, seed=11, batch=BATCH)
    blocks = block_sizes_covering(LENGTH, FEEDS[feed])
    modes = {"position_mode": position_mode, "streaming_mode": streaming_mode}
    batched = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE, **modes), ids, blocks)
    assert batched.shape[:2] == (BATCH, LENGTH)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE, **modes)
    for row in range(BATCH):
        wrapper.reset()
        alone = feed_stream(wrapper, ids[row], blocks)
        assert max_abs_diff(batched[row], alone) <= TOLERANCE, (row, max_abs_diff(batched[row], alone))


def test_rows_do_not_leak_into_each_other(llama_model):
    """Changing one row's tokens changes no other row's logits (bit for bit)."""
    ids = random_ids(40, seed=12, batch=BATCH)
    changed = ids.clone()
    changed[1] = random_ids(40, seed=13)
    first = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids, [7, 1, 32])
    second = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), changed, [7, 1, 32])
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert not torch.equal(first[1], second[1])


def test_no_sinks_batch(llama_model):
    ids = random_ids(50, seed=14, batch=2)
    batched = feed_stream(make_wrapper(llama_model, 0, 9), ids, [4, 1, 45])
    wrapper = make_wrapper(llama_model, 0, 9)
    for row in range(2):
        wrapper.reset()
        assert max_abs_diff(batched[row], feed_stream(wrapper, ids[row], [4, 1, 45])) <= TOLERANCE


def test_generate_batch_equals_each_prompt_alone(llama_model):
    """model.generate() on a batch of equal-length prompts (all-ones mask) through a StreamingKVCache."""
    model = prepare_model(copy.deepcopy(llama_model))
    prompts = random_ids(12, seed=15, batch=2)

    def greedy(input_ids):
        cache = StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache, max_new_tokens=40,
            do_sample=False, return_dict_in_generate=True, output_logits=True,
        )
        return output.sequences, torch.stack(output.logits, dim=1).float()  # [b, steps, vocab]

    sequences, logits = greedy(prompts)
    for row in range(2):
        alone_sequences, alone_logits = greedy(prompts[row : row + 1])
        assert torch.equal(sequences[row], alone_sequences[0])
        assert max_abs_diff(logits[row], alone_logits[0]) <= TOLERANCE


@pytest.mark.parametrize("streaming_mode", STREAMING_MODES)
def test_rows_given_different_positions_are_each_undone_with_their_own(llama_model, streaming_mode):
    """The cache undoes whatever rotation the model applied (docs/semantics.md §7), row by row: a batch whose second
    row the caller rotates 37 positions further equals each stream alone, in blocks and in one-token steps (these
    undid every row with the first row's angles: 6.2 off)."""
    ids = random_ids(20, seed=14, batch=2)
    model = prepare_model(copy.deepcopy(llama_model))
    cache = StreamingKVCache(N_SINK, WINDOW_SIZE, streaming_mode=streaming_mode)
    logits = []
    with torch.no_grad():
        for start, end in [(0, 12), *((t, t + 1) for t in range(12, 20))]:
            positions = torch.arange(start, end).expand(2, -1) + torch.tensor([[0], [37]])
            logits.append(model(ids[:, start:end], position_ids=positions, past_key_values=cache).logits)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE, streaming_mode=streaming_mode), ids)
    assert max_abs_diff(torch.cat(logits, dim=1), expected) <= TOLERANCE


def test_batch_size_change_needs_reset(llama_model):
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    wrapper(random_ids(5, seed=16, batch=2))
    with pytest.raises(ValueError, match="reset"):
        wrapper(random_ids(1, seed=17, batch=3))
    wrapper.reset()
    assert wrapper(random_ids(5, seed=18, batch=3)).shape[0] == 3


def test_wrapper_takes_no_attention_mask(llama_model):
    """The wrapper's only input is the token ids: there is no way to pass padding to it."""
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    ids = random_ids(6, seed=19, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(TypeError):
        wrapper(ids, attention_mask=mask)


# The padding refusal itself: "pad|mask" also matched the "attention_mask covers N tokens" error, a wrong diagnosis.
PADDED_BATCH_REFUSAL = r"^StreamingKVCache does not support padded batches \(an attention_mask with zeros\)"


def _left_padded():
    ids = random_ids(8, seed=20, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # row 1: three pad tokens on the left
    return ids, mask


def test_padded_forward_is_refused(llama_model):
    model = prepare_model(copy.deepcopy(llama_model))
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match=PADDED_BATCH_REFUSAL):
        model(ids, attention_mask=mask, past_key_values=StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE))


def test_padded_generate_is_refused(llama_model):
    model = prepare_model(copy.deepcopy(llama_model))
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match=PADDED_BATCH_REFUSAL):
        model.generate(
            ids, attention_mask=mask, past_key_values=StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE),
            max_new_tokens=3, do_sample=False,
        )
