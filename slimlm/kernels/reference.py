"""Pure-PyTorch reference implementations of the model's fused ops.

These run on any torch device and define the semantics that faster kernels (the C++ CPU kernels in
``slimlm/kernels/cpu``, flash attention on CUDA) must reproduce. Rounding follows transformers' Llama
code so that float32 results agree with it to the last few ulps.

Paged KV cache layout, per layer: ``k_cache``/``v_cache`` of shape
``[num_blocks, num_kv_heads, block_size, head_dim]``; a *slot* is ``block * block_size + offset``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in float32, cast back, then scale (transformers' order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then ``x = rms_norm(residual)``, both in place; returns ``(x, residual)``."""
    residual.add_(x)
    x.copy_(rms_norm(residual, weight, eps))
    return x, residual


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place (neox / rotate-half style).

    ``cos_sin [max_positions, D]`` is float32 with cos in the first half of the last dim and sin in the
    second; like transformers, the tables are cast to the activations' dtype before the products.
    """
    half = q.shape[-1] // 2
    table = cos_sin.index_select(0, positions).to(q.dtype)
    cos = torch.cat([table[:, :half], table[:, :half]], dim=-1).unsqueeze(1)
    sin = torch.cat([table[:, half:], table[:, half:]], dim=-1).unsqueeze(1)
    for t in (q, k):
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        t.copy_(t * cos + rotated * sin)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k, v [T, Hk, D]`` at ``slot_mapping [T]`` (int64); negative slots are skipped."""
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values as ``[Hk, seq_len, D]`` each."""
    block_size = k_cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:n_blocks].long()
    k = k_cache.index_select(0, ids).transpose(0, 1).flatten(1, 2)[:, :seq_len]
    v = v_cache.index_select(0, ids).transpose(0, 1).flatten(1, 2)[:, :seq_len]
    return k, v


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Causal attention of a flattened batch of queries over the paged cache.

    ``q [T, Hq, D]``; sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` and has
    ``seq_lens[i]`` tokens in the cache *including* this step's, so its query row ``j`` sits at position
    ``seq_lens[i] - q_len_i + j``. A key at position ``kp`` is visible to a query at ``qp`` when
    ``kp <= qp`` and, with a sliding window ``w > 0``, ``qp - kp < w`` (transformers' convention).
    Softmax in float32; returns ``[T, Hq, D]`` in q's dtype.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[i], seq_len)
        q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        visible = k_pos <= q_pos
        if sliding_window > 0:
            visible &= (q_pos - k_pos) < sliding_window
        qi = q[s:e].transpose(0, 1)  # [Hq, q_len, D]
        groups = qi.shape[0] // k.shape[0]
        k = k.to(q.dtype).repeat_interleave(groups, dim=0)
        v = v.to(q.dtype).repeat_interleave(groups, dim=0)
        scores = torch.matmul(qi, k.transpose(1, 2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[s:e] = torch.matmul(probs, v).transpose(0, 1)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for the merged gate/up projection output ``[..., 2I]``."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]
