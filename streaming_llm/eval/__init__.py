"""Evaluation: decode-loop perplexity, the exact parallel evaluator, baselines and comparisons."""

__all__ = ["PerplexityResult", "compute_perplexity"]


def __getattr__(name: str):
    # Imported on first use: the command line imports this package's modules to build its parser, without torch.
    if name in __all__:
        from streaming_llm.eval import perplexity

        return getattr(perplexity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
