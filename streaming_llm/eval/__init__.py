"""Evaluation: decode-loop perplexity, the exact parallel evaluator, baselines and comparisons."""

from streaming_llm.eval.perplexity import PerplexityResult, compute_perplexity

__all__ = ["PerplexityResult", "compute_perplexity"]
