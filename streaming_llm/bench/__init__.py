"""Benchmarks: decode latency and memory side by side (latency.py), profiling (profile.py), plots."""

# The decode methods `streaming-llm bench` times (implemented in latency.py).
METHODS = (
    "dense_static", "dense_static_compiled", "dense_static_compiled_frozen", "dense_dynamic", "streaming_pos_shift",
    "streaming_rerotate", "streaming_absolute", "streaming_static", "streaming_compiled", "streaming_compiled_frozen",
    "mit", "kvpress_decode", "recompute",
)
# Compiled methods spend a compilation per cache size (about a minute on a GPU machine, more on a small CPU):
# by default they run on CUDA only, where the compiled step is the one users would run.
COMPILED_METHODS = ("dense_static_compiled", "dense_static_compiled_frozen", "streaming_compiled",
                    "streaming_compiled_frozen")
