"""What ``training.json`` records about a run besides its losses: model size, tokenizer, software."""

from __future__ import annotations

import platform
from typing import Any

import torch
from torch import nn

from slimlm.train.data import tokenizer_fingerprint

__all__ = ["count_parameters", "software_versions", "tokenizer_summary"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed_tokens.weight.numel() if hasattr(model, "embed_tokens") else 0
    if getattr(model, "lm_head", None) is not None:
        embed += model.lm_head.weight.numel()
    return {"parameters": total, "non_embedding_parameters": total - embed}


def tokenizer_summary(tokenizer, source: str) -> dict[str, Any]:
    return {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer), "source": source}


def software_versions() -> dict[str, str]:
    import transformers  # not at import time: slimlm.train stays cheap to import

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
