"""Acceptance item 6: the real embedded model on the real embedded text.

On a stream longer than the cache, streaming with 4 sinks must beat window attention without sinks,
and keep the cache at capacity. A few hundred tokens, scored with the exact block path.
"""

from __future__ import annotations

import torch

from streaming_llm import StreamingLLMWrapper
from streaming_llm.data import load_tokens
from streaming_llm.eval import compute_perplexity


def test_sinks_beat_window_attention_on_the_embedded_model(embedded_model):
    model, tokenizer = embedded_model
    tokens = load_tokens(tokenizer, None, num_tokens=400)
    n_sink, window = 4, 60  # stream of 400 tokens: over 6x the capacity of 64

    streaming = StreamingLLMWrapper(model, n_sink=n_sink, window_size=window)
    with_sinks = compute_perplexity(streaming, tokens, block_size=100)
    window_only = compute_perplexity(StreamingLLMWrapper(model, n_sink=0, window_size=n_sink + window), tokens, block_size=100)

    assert streaming.cache.get_cache_length() == n_sink + window
    assert torch.isfinite(with_sinks.nlls).all() and torch.isfinite(window_only.nlls).all()
    # Both see the same number of keys; only the sinks differ. The gap is large once the first tokens
    # are evicted (measured: see docs/evaluation.md), so a clear margin is required, not a tie.
    assert with_sinks.perplexity * 1.5 < window_only.perplexity, (with_sinks.perplexity, window_only.perplexity)
    # Before anything is evicted the two are the same model.
    assert torch.allclose(with_sinks.nlls[: n_sink + window - 1], window_only.nlls[: n_sink + window - 1], atol=1e-4)


def test_the_embedded_tokenizer_ends_and_pads_with_the_files_tokens(embedded_model):
    """transformers' GGUF reader (5.2) gives the embedded tokenizer the BOS, <|im_start|>, as its eos and no pad
    token; the GGUF file names <|im_end|> for both, as the model's generation config does. The tokenizer follows the
    file, and still puts the BOS first (the streams of the committed results begin with it: docs/evaluation.md)."""
    import gguf

    from streaming_llm.generation import end_of_turn_ids
    from streaming_llm.loading import embedded_model_path, gguf_metadata

    model, tokenizer = embedded_model
    fields = gguf.GGUFReader(embedded_model_path()).fields
    declared = {key: int(fields[key].parts[fields[key].data[0]][0])
                for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")}
    # loading.gguf_metadata, which reads them for the tokenizer, holds every scalar and string of the header as the
    # gguf package reads it (arrays skipped)
    expected = {}
    for key, field in fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the file's header counts
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            expected[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        elif field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            expected[key] = field.parts[field.data[0]][0].item()
    assert gguf_metadata(embedded_model_path()) == expected and len(expected) > 20
    assert tokenizer.eos_token_id == declared["tokenizer.ggml.eos_token_id"] == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == declared["tokenizer.ggml.padding_token_id"]
    assert tokenizer.eos_token == "<|im_end|>" != tokenizer.bos_token
    assert end_of_turn_ids(tokenizer, model) == {tokenizer.eos_token_id}
    text = "doctor 'she' said: \"to be, or not to be\""
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == declared["tokenizer.ggml.bos_token_id"]
    assert tokenizer.decode(ids[1:]) == text  # no lossy clean-up of spaces
