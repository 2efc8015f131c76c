"""Mixed precision: bf16 autocast only where it was measured faster than float32."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context", "choose_autocast"]


def choose_autocast(device: torch.device, requested: str = "auto") -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for plain float32, why). "auto": bf16 only where it measures faster."""
    if requested == "fp32":
        return None, "float32 (requested)"
    if requested == "bf16":
        return torch.bfloat16, "bf16 autocast (requested)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (CUDA device with bf16 support)"
        return None, "float32 (this CUDA device has no bf16)"
    if device.type == "cpu":
        from slimlm.model.dtype import fastest_dtype

        fastest = fastest_dtype("cpu")
        if fastest == torch.bfloat16:
            return torch.bfloat16, "bf16 autocast (bf16 matmul measured faster than float32 on this CPU)"
        name = str(fastest).removeprefix("torch.")
        return None, f"float32 (measured fastest matmul dtype on this CPU: {name}; bf16 would be slower)"
    return None, f"float32 (no autocast on {device.type})"


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op for plain float32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
