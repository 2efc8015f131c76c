"""Model quality measurements: perplexity (GPTQ protocol) and KL divergence against a base model."""

from slimlm.eval.kl_div import KLResult, kl_divergence
from slimlm.eval.perplexity import PerplexityResult, perplexity

__all__ = ["KLResult", "PerplexityResult", "kl_divergence", "perplexity"]
