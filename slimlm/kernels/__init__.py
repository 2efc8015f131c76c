"""Fused ops behind one small interface, so faster kernels can replace the reference ones per device."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    linear: Callable  # (x [.., K], weight [N, K], bias [N] | None) -> [.., N]


REFERENCE_OPS = Ops(
    name="torch",
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    apply_rope=reference.apply_rope,
    rope_and_cache=_reference_rope_and_cache,
    paged_attention=reference.paged_attention,
    silu_and_mul=reference.silu_and_mul,
    linear=F.linear,
)


logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu")
_cpu_lock = threading.Lock()
_cpu_ops: Ops | None = None
_cpu_error: BaseException | None = None


def _load_cpu_ops() -> Ops:
    """The C++ kernels (built on first use, then cached on disk); raises if they cannot be built."""
    global _cpu_ops, _cpu_error
    with _cpu_lock:
        if _cpu_ops is not None:
            return _cpu_ops
        if _cpu_error is not None:
            raise _cpu_error
        try:
            from slimlm.kernels import cpu, cpu_linear

            ext = cpu.load()
            linear = cpu_linear.load().linear
        except Exception as exc:  # compiler missing, build error, ...
            _cpu_error = exc
            raise
        _cpu_ops = Ops(
            name="cpu",
            rms_norm=ext.rms_norm,
            fused_add_rms_norm=ext.fused_add_rms_norm,
            apply_rope=ext.apply_rope,
            rope_and_cache=ext.rope_and_cache,
            paged_attention=ext.paged_attention,
            silu_and_mul=ext.silu_and_mul,
            linear=linear,
        )
        return _cpu_ops


_warned = False


def get_ops(device: torch.device | str, backend: str = "auto") -> Ops:
    """Ops for ``device``: ``backend`` is "auto" (fastest available), "torch" (reference) or "cpu".

    On a CPU device, "auto" and "cpu" give the fused C++ kernels of ``slimlm/kernels/cpu`` (compiled on
    first use, about half a minute, then loaded from ``~/.cache/slimlm``); if they cannot be built, "auto"
    logs one warning and falls back to the reference ops while "cpu" raises. Other devices get the
    reference ops. The environment variable ``SLIMLM_KERNELS=torch`` forces the reference ops everywhere.
    """
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if os.environ.get("SLIMLM_KERNELS", "").strip().lower() == "torch" or backend == "torch":
        return REFERENCE_OPS
    device = torch.device(device)
    if device.type != "cpu":
        if backend == "cpu":
            raise ValueError(f"kernel backend 'cpu' needs a CPU device, got {device}")
        return REFERENCE_OPS
    try:
        return _load_cpu_ops()
    except Exception as exc:
        if backend == "cpu":
            raise RuntimeError(
                f"could not build the C++ CPU kernels ({type(exc).__name__}: {exc}); "
                "use backend 'torch' or SLIMLM_KERNELS=torch for the reference ops"
            ) from exc
        if not _warned:
            _warned = True
            logger.warning(
                "C++ CPU kernels unavailable (%s: %s); using the slower reference ops",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
        return REFERENCE_OPS
