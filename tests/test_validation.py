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


def test_capacity_must_fit_the_model_positions(llama_model):
    """A step attends to capacity + 1 keys at positions 0..capacity: capacity < max_position_embeddings."""
    max_positions = llama_model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_wrapper(llama_model, 4, max_positions - 4)
    assert make_wrapper(llama_model, 4, max_positions - 5).cache_capacity == max_positions - 1


def test_generate_path_checks_capacity_too(llama_model):
    import copy

    import torch
    from streaming_llm import prepare_model

    model = prepare_model(copy.deepcopy(llama_model))
    cache = StreamingKVCache(n_sink=0, window_size=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 2, dtype=torch.long), past_key_values=cache)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from streaming_llm import StreamingLLMWrapper

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="llama.*gpt_neox"):
        StreamingLLMWrapper(model, 4, 8)


def test_model_without_rotary_features_is_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from streaming_llm import StreamingLLMWrapper

    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=64, rotary_pct=0.0)
    with pytest.raises(ValueError, match="rotary"):
        StreamingLLMWrapper(GPTNeoXForCausalLM(config).eval(), 4, 8)


@pytest.mark.parametrize("bad_ids, reason", [
    ("out_of_range", r"\[0, 128\)"), ("negative", r"\[0, 128\)"), ("float", "integer"), ("empty", "batch, n >= 1"),
])
def test_bad_token_ids_are_clear_errors(llama_model, bad_ids, reason):
    import torch

    ids = {"out_of_range": torch.tensor([[200]]), "negative": torch.tensor([[-1]]),
           "float": torch.tensor([[1.0]]), "empty": torch.zeros(0, 3, dtype=torch.long)}[bad_ids]
    with pytest.raises(ValueError, match=reason):
        make_wrapper(llama_model, 4, 8)(ids)


def test_empty_model_folder_is_a_clear_error(tmp_path):
    from streaming_llm import load_model

    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_compress_before_any_token_is_a_clear_error():
    for cache in (StreamingKVCache(2, 8), StreamingKVCache(2, 8, num_layers=2)):
        with pytest.raises(ValueError, match="holds nothing yet"):
            cache.compress(0)
