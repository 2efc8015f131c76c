"""``speculative_config``: which proposer, how many tokens, and how the engine adapts (vLLM's key names)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft", "medusa")


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4  # K: the most proposals verified per sequence and step
    # "draft": the draft checkpoint directory; "medusa": the heads directory, or a heads module itself.
    model: Any = None
    prompt_lookup_max: int = 3  # "ngram": the longest suffix matched against the context ...
    prompt_lookup_min: int = 1  # ... and the shortest
    adaptive: bool = True  # choose K per step from measured acceptance and step costs (0 = plain decode)
    disable_by_batch_size: int | None = None  # plain decode whenever the batch has at least this many sequences
    probe_interval: int = 32  # adaptive: every this many decode steps, re-measure the option not in use
    ewma_weight: float = 0.1  # adaptive: weight of the newest step in the running acceptance average
    min_speedup: float = 1.0  # adaptive: speculate only when the predicted speedup exceeds this
    # adaptive: once off, a batch size turns speculation back on only above min_speedup * (1 + switch_margin)
    switch_margin: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "probe_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        batch = self.disable_by_batch_size
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise ValueError(f"disable_by_batch_size must be a positive integer or None, got {batch!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {self.adaptive!r}")
        if not 0.0 < self.ewma_weight <= 1.0:
            raise ValueError(f"ewma_weight must be in (0, 1], got {self.ewma_weight!r}")
        if not self.min_speedup > 0:
            raise ValueError(f"min_speedup must be positive, got {self.min_speedup!r}")
        if not self.switch_margin >= 0:
            raise ValueError(f"switch_margin must be >= 0, got {self.switch_margin!r}")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("model must be None for method 'ngram' (prompt lookup needs no model)")
        if self.method == "draft" and not isinstance(self.model, str):
            raise ValueError("model must be the draft checkpoint's directory (a string) for method 'draft'")
        if self.method == "medusa" and self.model is None:
            raise ValueError("model must be the Medusa heads directory (or a heads module) for method 'medusa'")

    @classmethod
    def from_value(cls, value: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
        """Accepts the config itself, vLLM's dict form, or None (no speculation)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
        if "method" not in value:
            raise ValueError(f"speculative_config needs 'method' (one of {', '.join(METHODS)})")
        model = value.get("model")
        return cls(**{**value, "model": str(model) if hasattr(model, "__fspath__") else model})
