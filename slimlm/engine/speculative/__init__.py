"""Speculative decoding in the batched engine: proposers (prompt lookup, draft model, Medusa heads), one-forward
verification with exact greedy / rejection-sampling acceptance, and an adaptive choice of K.

Only the config is imported here, so ``slimlm.engine.config`` (and the CLI) stay free of torch imports.
"""

from slimlm.engine.speculative.config import METHODS, SpeculativeConfig

__all__ = ["METHODS", "SpeculativeConfig"]
