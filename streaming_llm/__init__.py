"""streaming-llm: endless generation and evaluation with attention sinks (StreamingLLM, Xiao et al. 2024).

The public names are imported on first use (PEP 562), so that `import streaming_llm` and the command line's
entry point do not load torch and transformers before they are needed (a Ctrl-C in the first seconds of a
command is then an ordinary interrupt, not a traceback from inside an import).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "ATTN_IMPLEMENTATION": "streaming_llm.attention",
    "prepare_model": "streaming_llm.attention",
    "StreamingKVCache": "streaming_llm.cache",
    "FastStreamingWrapper": "streaming_llm.fast",
    "StartRecentKVCache": "streaming_llm.mit_cache",
    "rerotate_keys": "streaming_llm.rope",
    "StreamingLLMWrapper": "streaming_llm.wrapper",
    "load_model": "streaming_llm.loading",
    "generate_stream": "streaming_llm.generation",
    "StreamingChat": "streaming_llm.generation",
    "SamplingConfig": "streaming_llm.sampling",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'streaming_llm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
