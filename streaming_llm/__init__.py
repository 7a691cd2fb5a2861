"""streaming-llm: endless generation and evaluation with attention sinks (StreamingLLM, Xiao et al. 2024)."""

from streaming_llm.attention import ATTN_IMPLEMENTATION, prepare_model
from streaming_llm.cache import StreamingKVCache
from streaming_llm.fast import FastStreamingWrapper
from streaming_llm.mit_cache import StartRecentKVCache
from streaming_llm.rope import rerotate_keys
from streaming_llm.wrapper import StreamingLLMWrapper

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FastStreamingWrapper",
    "SamplingConfig",
    "StartRecentKVCache",
    "StreamingChat",
    "StreamingKVCache",
    "StreamingLLMWrapper",
    "generate_stream",
    "load_model",
    "prepare_model",
    "rerotate_keys",
]


def __getattr__(name):
    """The generation helpers, imported on first use (generation.py pulls in the tokenizer machinery)."""
    if name in ("generate_stream", "StreamingChat", "SamplingConfig"):
        from streaming_llm import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'streaming_llm' has no attribute {name!r}")


def load_model(*args, **kwargs):
    """Load a model and tokenizer (the embedded SmolLM2 default when no name is given); see loading.py."""
    from streaming_llm.loading import load_model as _load_model

    return _load_model(*args, **kwargs)
