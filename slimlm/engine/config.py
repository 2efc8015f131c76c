"""Engine settings; ``LLM(model, **kwargs)`` takes these fields as keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimlm.engine.speculative.config import SpeculativeConfig


@dataclass
class EngineConfig:
    model: str
    dtype: str | None = None  # None / "auto": the fastest 16-bit type measured on the device
    device: str | None = None  # None: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings (lowered to fit the KV cache)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: kv_cache_fraction of free memory (at most 4 GiB on CPU)
    kv_cache_fraction: float = 0.3
    num_kv_blocks: int | None = None  # exact block count (overrides both budgets)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kernels: str = "auto"  # "auto", "torch" (reference ops) or "cpu" (compiled CPU kernels, required)
    skip_tokenizer_init: bool = False
    seed: int = 0
    # vLLM's form: {"method": "ngram" | "draft" | "medusa", "num_speculative_tokens": K, "model": DIR, ...}
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None

    def __post_init__(self):
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "kv_cache_memory", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.kernels not in ("auto", "torch", "cpu"):
            raise ValueError(f"kernels must be 'auto', 'torch' or 'cpu', got {self.kernels!r}")
