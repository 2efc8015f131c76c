"""Fused ops behind one small interface, so faster kernels can replace the reference ones per device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from slimlm.kernels import reference


def _reference_rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    reference.apply_rope(q, k, positions, cos_sin)
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@dataclass(frozen=True)
class Ops:
    """The model's non-matmul ops; see ``reference`` for their exact semantics."""

    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    apply_rope: Callable
    rope_and_cache: Callable
    paged_attention: Callable
    silu_and_mul: Callable


REFERENCE_OPS = Ops(
    name="torch",
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    apply_rope=reference.apply_rope,
    rope_and_cache=_reference_rope_and_cache,
    paged_attention=reference.paged_attention,
    silu_and_mul=reference.silu_and_mul,
)


def get_ops(device: torch.device | str, backend: str = "auto") -> Ops:
    """Ops for ``device``: ``backend`` is "auto" (fastest available), "torch" (reference) or "cpu"."""
    return REFERENCE_OPS
