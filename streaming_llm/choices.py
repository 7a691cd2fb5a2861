"""Option values shared by the library and the command line, in a module that imports nothing heavy: the parser
is built from them, so `streaming-llm --help` and usage errors answer without loading torch or transformers."""

COMPILE_CHOICES = ("auto", "always", "never")  # FastStreamingWrapper(compile=...)
DECODE_ATTENTION = ("grouped", "gqa", "expanded_masked", "matmul")  # FastStreamingWrapper(decode_attention=...)
