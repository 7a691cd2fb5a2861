"""Invalid configurations are clear errors (SEMANTICS §2: n_sink >= 0, window_size >= 1)."""

import pytest
from streaming_llm import StreamingKVCache
from tiny_models import make_wrapper


@pytest.mark.parametrize("n_sink, window_size, bad_argument", [(-1, 8, "n_sink"), (4, 0, "window_size"),
                                                                (4, -3, "window_size")])
def test_cache_rejects_bad_sizes(n_sink, window_size, bad_argument):
    with pytest.raises(ValueError, match=bad_argument):
        StreamingKVCache(n_sink=n_sink, window_size=window_size)


@pytest.mark.parametrize("n_sink, window_size, bad_argument", [(-1, 8, "n_sink"), (4, 0, "window_size")])
def test_wrapper_rejects_bad_sizes(llama_model, n_sink, window_size, bad_argument):
    with pytest.raises(ValueError, match=bad_argument):
        make_wrapper(llama_model, n_sink, window_size)


def test_wrapper_rejects_unknown_position_mode(llama_model):
    with pytest.raises(ValueError, match="position_mode"):
        make_wrapper(llama_model, 4, 8, position_mode="foo")


def test_wrapper_rejects_unknown_streaming_mode(llama_model):
    with pytest.raises(ValueError, match="streaming_mode"):
        make_wrapper(llama_model, 4, 8, streaming_mode="foo")


def test_valid_edges_are_accepted():
    cache = StreamingKVCache(n_sink=0, window_size=1)
    assert cache.cache_capacity == 1
    assert StreamingKVCache(n_sink=4, window_size=60).cache_capacity == 64
