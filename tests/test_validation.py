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


@pytest.fixture
def saved_llama(llama_model, tmp_path):
    """A model folder with config.json and weights, and no tokenizer files."""
    folder = tmp_path / "llama"
    llama_model.save_pretrained(folder)
    return folder


def test_model_folder_without_tokenizer_is_a_clear_error(saved_llama):
    """transformers loads an "empty" 8-token tokenizer there, which turns every text into <unk>."""
    from streaming_llm import load_model

    with pytest.raises(ValueError, match=r"llama has no tokenizer \(tokenizer.json, tokenizer.model"):
        load_model(saved_llama)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "garbage_bin"])
def test_corrupt_weights_are_a_clear_error(saved_llama, damage):
    import re

    from streaming_llm import load_model

    weights = saved_llama / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(bytes(range(256)) * 8)
        if damage == "garbage_bin":
            weights.rename(saved_llama / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"could not load model '{re.escape(str(saved_llama))}' \\(a corrupt or truncated file"):
        load_model(saved_llama)


def test_unavailable_devices_are_clear_errors(monkeypatch):
    import torch

    from streaming_llm.loading import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'mps' requested but MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:1' requested but there are only 1 CUDA devices"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("field, value", [
    ("temperature", float("inf")), ("temperature", float("nan")), ("repetition_penalty", float("inf")),
    ("repetition_penalty", float("nan")), ("seed", -1), ("seed", 2**63), ("seed", 1.5),
])
def test_sampling_config_refuses_values_the_sampler_cannot_use(field, value):
    from streaming_llm.generation import SamplingConfig

    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})
    assert SamplingConfig(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("options", [
    dict(temperature=1e-45), dict(temperature=1e-320), dict(temperature=1e-40, top_k=5), dict(temperature=1e-40, top_p=0.9),
    dict(temperature=1.0, repetition_penalty=1e300), dict(temperature=0.5, repetition_penalty=1e-300),
    dict(temperature=1e-30, repetition_penalty=1e-300, top_p=0.9), dict(temperature=1.0, repetition_penalty=1e-30, top_k=3),
])
def test_sampler_is_numerically_safe_for_every_accepted_value(options):
    """Extreme values once overflowed to inf (softmax: NaN) and crashed torch.multinomial. A tiny temperature is
    greedy; a penalty of 1e300 makes 0 * inf (a zero logit) and one of 1e-300 makes positive logits inf."""
    import torch

    from streaming_llm.generation import SamplingConfig, TokenSampler

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    recent = [int(i) for i in logits.topk(3).indices] + [7]
    logits[7] = 0.0
    sampler = TokenSampler(SamplingConfig(seed=0, **options))
    tokens = [sampler(logits, recent) for _ in range(20)]
    assert all(0 <= token < 1000 for token in tokens)
    if options["temperature"] < 1e-20 and "repetition_penalty" not in options:  # greedy
        assert tokens == [int(logits.argmax())] * 20
    if options.get("repetition_penalty", 1.0) < 1e-20:  # the recent positive logits dominate
        assert set(tokens) <= set(recent[:3])


def test_a_cache_refuses_keys_it_was_not_made_for():
    """Found by the API audit: one StreamingKVCache passed to another model (other kv heads), or to the same model
    in another dtype, failed inside torch.cat / the attention kernel; a num_layers below the model's gave an
    IndexError from transformers. Each is now a ValueError that says what to do."""
    import torch

    from streaming_llm import StreamingLLMWrapper, prepare_model
    from streaming_llm.models import describe

    from tiny_models import build_gpt_neox, build_llama

    llama_model, gpt_neox_model = build_llama(), build_gpt_neox()  # their own: one is moved to bfloat16 below
    ids = torch.randint(0, 100, (1, 12))
    for model in (llama_model, gpt_neox_model):
        prepare_model(model)
    cache = StreamingKVCache(n_sink=2, window_size=8)
    llama_model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds keys of another shape, dtype or device"):
        gpt_neox_model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds keys of another shape, dtype or device"):
        llama_model.to(torch.bfloat16)(ids, past_key_values=cache, use_cache=True)
    llama_model = build_llama()
    prepare_model(llama_model)
    with pytest.raises(ValueError, match="made for 1 layers"):
        llama_model(ids, past_key_values=StreamingKVCache(n_sink=2, window_size=8, num_layers=1), use_cache=True)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_layers must be None"):
            StreamingKVCache(n_sink=2, window_size=8, num_layers=bad)
    with pytest.raises(ValueError, match="max_block must be an integer >= 1, got 2.5"):
        StreamingLLMWrapper(llama_model, n_sink=2, window_size=8, max_block=2.5)
    for not_a_model in (None, "EleutherAI/pythia-70m"):
        with pytest.raises(TypeError, match="expected a Hugging Face causal language model"):
            describe(not_a_model)


def test_generation_arguments_are_taken_as_documented_or_refused():
    """Found by the API audit, each a silent wrong result before: stop="THE END" was split into characters (it
    stopped at the first space), a [2, n] prompt was flattened into one stream, float ids were truncated, and
    StreamingChat.send(max_new_tokens=0) used the default instead."""
    import torch

    from streaming_llm.generation import prompt_token_ids, stop_strings

    assert stop_strings("THE END") == ["THE END"] and stop_strings(["a", "b"]) == ["a", "b"] and stop_strings(None) == []
    with pytest.raises(ValueError, match="non-empty strings"):
        stop_strings(["ok", ""])
    assert prompt_token_ids([[5, 6, 7]]).tolist() == [5, 6, 7] and prompt_token_ids(torch.tensor([5, 6])).dtype == torch.long
    with pytest.raises(ValueError, match="one stream"):
        prompt_token_ids(torch.tensor([[1, 2], [3, 4]]))
    for bad in ([1.9, 2.9], torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="integer token ids"):
            prompt_token_ids(bad)
    assert prompt_token_ids([]).numel() == 0  # refused later as an empty prompt, with that message

