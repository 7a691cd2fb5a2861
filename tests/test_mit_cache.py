"""StartRecentKVCache: MIT's public form (mit-han-lab/streaming-llm, streaming_llm/kv_cache.py).

Each past is a list of (key, value) per layer; tensors hold their stream index in every entry so that what is
kept can be read off directly, and the expectation is an explicit index list.
"""

import pytest
import torch
from streaming_llm import StartRecentKVCache


def make_past(seq_len: int, n_layers: int = 2, seq_dim: int = 2, value_seq_dim: int | None = None):
    """[(key, value)] per layer, [batch=1, heads=2, seq, head_dim=3] (seq moved to seq_dim); entry = index + layer/10,
    values negated."""
    value_seq_dim = seq_dim if value_seq_dim is None else value_seq_dim

    def tensor(layer, dim, sign):
        entries = sign * (torch.arange(seq_len, dtype=torch.float32) + layer / 10)
        full = entries.view(1, 1, seq_len, 1).expand(1, 2, seq_len, 3)
        return full.movedim(2, dim).contiguous()

    return [(tensor(layer, seq_dim, 1.0), tensor(layer, value_seq_dim, -1.0)) for layer in range(n_layers)]


def kept_indices(tensor: torch.Tensor, seq_dim: int) -> list[int]:
    """The stream indices a tensor made by make_past still holds, in order."""
    first = tensor.movedim(seq_dim, 2)[0, 0, :, 0]
    return first.abs().floor().long().tolist()


def assert_keeps(past, expected: list[int], seq_dim: int = 2, value_seq_dim: int = 2):
    for layer, (key, value) in enumerate(past):
        assert kept_indices(key, seq_dim) == expected
        assert kept_indices(value, value_seq_dim) == expected
        # Every entry of a kept slice travelled with it (all heads, all features, the layer's own tensors).
        reference = make_past(max(expected) + 1 if expected else 1, len(past), seq_dim, value_seq_dim)[layer]
        index = torch.tensor(expected, dtype=torch.long)
        assert torch.equal(key, reference[0].index_select(seq_dim, index))
        assert torch.equal(value, reference[1].index_select(value_seq_dim, index))


@pytest.mark.parametrize("start_size, recent_size, seq_len", [(4, 8, 20), (0, 5, 9), (2, 1, 30), (4, 8, 13)])
def test_call_keeps_start_and_recent(start_size, recent_size, seq_len):
    cache = StartRecentKVCache(start_size=start_size, recent_size=recent_size, k_seq_dim=2, v_seq_dim=2)
    kept = cache(make_past(seq_len))
    assert_keeps(kept, list(range(start_size)) + list(range(seq_len - recent_size, seq_len)))


@pytest.mark.parametrize("seq_len", [0, 1, 11, 12])
def test_call_leaves_short_pasts_alone(seq_len):
    cache = StartRecentKVCache(start_size=4, recent_size=8)
    past = make_past(seq_len)
    kept = cache(past)
    assert len(kept) == len(past)
    for (key, value), (old_key, old_value) in zip(kept, past):
        assert torch.equal(key, old_key) and torch.equal(value, old_value)


def test_none_passes_through():
    cache = StartRecentKVCache(start_size=4, recent_size=8)
    assert cache(None) is None
    assert cache.evict_for_space(None, 3) is None
    assert cache.evict_range(None, 0, 1) is None


@pytest.mark.parametrize("seq_len, num_coming", [(12, 1), (12, 5), (10, 3), (30, 4), (9, 3)])
def test_evict_for_space_makes_room(seq_len, num_coming):
    """Room for num_coming tokens: keep the start and the last recent_size - num_coming, unless it already fits."""
    start_size, recent_size = 4, 8
    cache = StartRecentKVCache(start_size=start_size, recent_size=recent_size)
    kept = cache.evict_for_space(make_past(seq_len), num_coming)
    if seq_len + num_coming <= start_size + recent_size:
        expected = list(range(seq_len))
    else:
        expected = list(range(start_size)) + list(range(seq_len - recent_size + num_coming, seq_len))
    assert_keeps(kept, expected)


@pytest.mark.parametrize("start, end", [(0, 0), (2, 5), (0, 10), (9, 10), (4, 4)])
def test_evict_range_removes_exactly_that_range(start, end):
    cache = StartRecentKVCache(start_size=4, recent_size=8)
    kept = cache.evict_range(make_past(10), start, end)
    assert_keeps(kept, list(range(start)) + list(range(end, 10)))


@pytest.mark.parametrize("start, end", [(5, 3), (2, 11)])
def test_evict_range_rejects_bad_ranges(start, end):
    cache = StartRecentKVCache(start_size=4, recent_size=8)
    with pytest.raises((AssertionError, ValueError, IndexError)):
        cache.evict_range(make_past(10), start, end)


@pytest.mark.parametrize("k_seq_dim, v_seq_dim", [(1, 1), (3, 2)])
def test_other_sequence_dims(k_seq_dim, v_seq_dim):
    """MIT supports the sequence axis at dims 1, 2 or 3, separately for keys and values."""
    cache = StartRecentKVCache(start_size=3, recent_size=4, k_seq_dim=k_seq_dim, v_seq_dim=v_seq_dim)
    kept = cache(make_past(15, seq_dim=k_seq_dim, value_seq_dim=v_seq_dim))
    assert_keeps(kept, [0, 1, 2, 11, 12, 13, 14], seq_dim=k_seq_dim, value_seq_dim=v_seq_dim)


def test_evict_for_space_slices_as_mits_code_does():
    """MIT's evict_for_space slices the keys (k[:, :, 0:start_size], k[:, :, seq_len - recent + coming:seq_len]), so
    a cache holding fewer entries than start_size keeps them all; `narrow` raised there ("start (0) + length (2)
    exceeds dimension size (1)"). Every small case against those Python slices."""
    for start_size in range(5):
        for recent_size in range(1, 6):
            cache = StartRecentKVCache(start_size=start_size, recent_size=recent_size)
            for seq_len in range(1, 12):
                for num_coming in range(9):
                    held = list(range(seq_len))
                    if seq_len + num_coming <= start_size + recent_size:
                        expected = held
                    else:
                        expected = held[0:start_size] + held[seq_len - recent_size + num_coming : seq_len]
                    assert_keeps(cache.evict_for_space(make_past(seq_len), num_coming), expected)


def test_a_transformers_cache_is_refused_with_the_way_out():
    """MIT's recipe, past = kv_cache(outputs.past_key_values), gets a DynamicCache from transformers 5, whose layers
    iterate as more than (keys, values): it failed with "too many values to unpack (expected 2)"."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 9, 3), torch.ones(1, 2, 9, 3), 0)
    for cut in (lambda c: c(cache), lambda c: c.evict_for_space(cache, 1), lambda c: c.evict_range(cache, 0, 1)):
        with pytest.raises(TypeError, match=r"list of \(keys, values\) per layer.* got DynamicCache.*"
                                            r"StreamingKVCache\(n_sink, window_size, streaming_mode='mit'\)"):
            cut(StartRecentKVCache(2, 4))
    assert kept_indices(StartRecentKVCache(2, 4)(tuple(make_past(9)))[0][0], 2) == [0, 1, 5, 6, 7, 8]  # a tuple works


def test_as_past_key_values_it_says_it_is_no_cache():
    """StartRecentKVCache passed as past_key_values of model(...) or model.generate(...) failed inside transformers
    with "'StartRecentKVCache' object has no attribute 'get_seq_length'" (or 'get_mask_sizes')."""
    import copy

    from streaming_llm import prepare_model

    from tiny_models import build_llama, random_ids

    model = build_llama()
    ids = random_ids(8, seed=3)[None]
    runs = (lambda model: model(ids, past_key_values=StartRecentKVCache(2, 4)),
            lambda model: model(ids, past_key_values=StartRecentKVCache(2, 4), cache_position=torch.arange(8)),
            lambda model: model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=StartRecentKVCache(2, 4),
                                         max_new_tokens=2, do_sample=False))
    for model in (model, prepare_model(copy.deepcopy(model))):
        for run in runs:
            with pytest.raises(TypeError, match=r"StartRecentKVCache is MIT's eviction policy .* not a transformers "
                                                r"Cache.*StreamingKVCache\(n_sink, window_size, streaming_mode='mit'\)"):
                run(model)


def test_the_defaults_are_mits():
    """StartRecentKVCache() is MIT's StartRecentKVCache(): start_size=4, recent_size=512, sequence axis 2 of keys and
    values (transformers 4.33's [batch, heads, seq, head_dim])."""
    kept = StartRecentKVCache()(make_past(520))
    assert_keeps(kept, list(range(4)) + list(range(8, 520)))


def test_the_sequence_axis_may_be_the_first():
    """A past laid out [seq, ...] (k_seq_dim=0, v_seq_dim=0) is cut along that axis, as any other."""
    cache = StartRecentKVCache(start_size=3, recent_size=4, k_seq_dim=0, v_seq_dim=0)
    kept = cache(make_past(15, seq_dim=0))
    assert_keeps(kept, [0, 1, 2, 11, 12, 13, 14], seq_dim=0, value_seq_dim=0)


def test_layers_of_different_lengths_are_refused():
    """Every layer must hold as many entries as the first: the cut reads the length once for all of them."""
    past = make_past(9)[:1] + make_past(10)[1:]
    for cut in (lambda c: c(past), lambda c: c.evict_for_space(past, 1), lambda c: c.evict_range(past, 0, 1)):
        with pytest.raises(ValueError, match=r"as many keys as values .* lengths \[\(9, 9\), \(10, 10\)\]"):
            cut(StartRecentKVCache(2, 4))


def test_a_past_that_is_no_list_of_pairs_is_refused_even_if_it_iterates_as_pairs():
    """A transformers Cache of 4.x iterated as (keys, values) per layer; only a list or tuple is taken, the form MIT's
    code indexes (past[0][0])."""

    class IteratesAsPairs:
        def __iter__(self):
            return iter(make_past(9))

    for cut in (lambda c: c(IteratesAsPairs()), lambda c: c.evict_for_space(IteratesAsPairs(), 1),
                lambda c: c.evict_range(IteratesAsPairs(), 0, 1)):
        with pytest.raises(TypeError, match=r"list of \(keys, values\) per layer.* got IteratesAsPairs"):
            cut(StartRecentKVCache(2, 4))


def test_a_list_of_a_transformers_caches_layers_is_refused():
    """list(DynamicCache) is a list of (keys, values, sliding window) per layer in transformers 5: refused as a past
    of another form, not cut (nor a ValueError from unpacking three into two)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 9, 3), torch.ones(1, 2, 9, 3), 0)
    assert len(list(cache)[0]) == 3
    for cut in (lambda c: c(list(cache)), lambda c: c.evict_for_space(list(cache), 1),
                lambda c: c.evict_range(list(cache), 0, 1)):
        with pytest.raises(TypeError, match=r"list of \(keys, values\) per layer.* got list"):
            cut(StartRecentKVCache(2, 4))


# MIT's evaluation (examples/eval_long_ppl.py --enable_start_recent_kv_cache --enable_pos_shift), ported onto
# transformers 5's modules as MIT ported transformers 4.33's: each attention module's forward replaced by its
# pos_shift/modify_llama.py (modify_gpt_neox.py) forward, which caches keys unrotated, rotates every cached key at its
# index in the cache on every step and the query at the past length (4.33's position_ids); after each step the
# (keys, values) of every layer are cut by StartRecentKVCache. Written from MIT's code, not from this package's.
def _mit_pos_shift_forward(self, hidden_states, *args, rotary_emb, **kwargs):
    from transformers.models.llama.modeling_llama import rotate_half

    batch, q_len, _ = hidden_states.shape
    assert q_len == 1  # eval_long_ppl feeds one token a step: no causal mask needed
    if hasattr(self, "query_key_value"):  # GPT-NeoX: [b, n, heads, 3 * head_size], partial rotary
        qkv = self.query_key_value(hidden_states).view(batch, q_len, -1, 3 * self.head_size).transpose(1, 2)
        query, key, value = qkv.chunk(3, dim=-1)
        rotary_ndims, output_projection = self.rotary_ndims, self.dense
    else:
        shape = (batch, q_len, -1, self.head_dim)
        query, key, value = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        rotary_ndims, output_projection = self.head_dim, self.o_proj
    if self.mit_past is not None:
        key, value = torch.cat([self.mit_past[0], key], dim=2), torch.cat([self.mit_past[1], value], dim=2)
    self.mit_present = (key, value)  # what the 4.33 layer returned as present: unrotated keys
    kv_seq_len = key.shape[2]

    def rotate(x, positions):
        cos, sin = rotary_emb(x, positions[None])
        rotated = x[..., :rotary_ndims] * cos[:, None] + rotate_half(x[..., :rotary_ndims]) * sin[:, None]
        return torch.cat([rotated, x[..., rotary_ndims:]], dim=-1)

    query = rotate(query, torch.tensor([kv_seq_len - 1]))
    key = rotate(key, torch.arange(kv_seq_len))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.softmax(query @ key.transpose(2, 3) / query.shape[-1] ** 0.5, dim=-1, dtype=torch.float32)
    output = (weights.to(value.dtype) @ value).transpose(1, 2).reshape(batch, q_len, -1)
    return output_projection(output), None


@torch.no_grad()
def mit_eval_long_ppl(model, input_ids: torch.Tensor, start_size: int, recent_size: int) -> torch.Tensor:
    """NLLs float64 [T - 1] of MIT's loop: token idx fed alone, NLL of idx + 1, then past = kv_cache(past)."""
    import copy
    import functools
    import types

    model = copy.deepcopy(model)
    body = model.gpt_neox if hasattr(model, "gpt_neox") else model.model
    attentions = [getattr(layer, "attention", None) or layer.self_attn for layer in body.layers]
    for attention in attentions:
        forward = functools.partial(_mit_pos_shift_forward, rotary_emb=body.rotary_emb)
        attention.forward, attention.mit_past = types.MethodType(forward, attention), None
    kv_cache = StartRecentKVCache(start_size=start_size, recent_size=recent_size)
    past_key_values, nlls = None, []
    for idx in range(input_ids.shape[1] - 1):
        for layer_idx, attention in enumerate(attentions):
            attention.mit_past = None if past_key_values is None else past_key_values[layer_idx]
        logits = model(input_ids[:, idx : idx + 1], use_cache=False).logits[0, -1]
        nlls.append(torch.nn.functional.cross_entropy(logits.double(), input_ids[0, idx + 1]))
        past_key_values = kv_cache([attention.mit_present for attention in attentions])
    return torch.stack(nlls)


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
@pytest.mark.parametrize("start_size, recent_size", [(4, 8), (0, 6), (2, 1)])
def test_mit_mode_equals_mits_own_evaluation_loop(architecture, start_size, recent_size):
    """streaming_mode="mit" (and our own storage) with n_sink = start_size, window_size = recent_size gives the NLLs of
    MIT's loop, fed one token at a time or in blocks; MIT cuts after the step, so recent_size +- 1 is another method."""
    from streaming_llm.eval.perplexity import compute_perplexity

    from tiny_models import build_gpt_neox, build_llama, make_wrapper, max_abs_diff, random_ids

    model = build_llama() if architecture == "llama" else build_gpt_neox()
    input_ids = random_ids(48, seed=11)[None]
    expected = mit_eval_long_ppl(model, input_ids, start_size, recent_size)
    for streaming_mode, block_size in (("mit", 1), ("mit", 16), ("ours", 1), ("ours", 16)):
        wrapper = make_wrapper(model, start_size, recent_size, streaming_mode=streaming_mode)
        assert max_abs_diff(compute_perplexity(wrapper, input_ids, block_size=block_size).nlls, expected) <= 1e-4
    for window_size in (recent_size - 1, recent_size + 1):
        if window_size >= 1:
            other = compute_perplexity(make_wrapper(model, start_size, window_size), input_ids, block_size=16).nlls
            assert max_abs_diff(other, expected) > 1e-2
