"""The inference forward: a flattened batch through every layer against the paged KV cache.

It is a plain function over pre-gathered weight tensors rather than nested ``nn.Module`` calls, because
at batch 1 a step is bound by per-op overhead: module dispatch and parameter lookups cost as much as the
small ops themselves. The modules in ``layers.py`` still own the parameters (loading, saving,
quantization, training); ``LayerWeights`` only holds references to them, so in-place weight updates show
through, and ``CausalLM.refresh_inference_weights()`` re-gathers after parameters are replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.kernels import Ops
from slimlm.model.layers import AttentionMetadata, DecoderLayer


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    q_size: int
    kv_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int
    eps: float

    @classmethod
    def gather(cls, layer: DecoderLayer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            input_norm=layer.input_layernorm.weight,
            qkv=attn.qkv_proj.weight,
            qkv_bias=attn.qkv_proj.bias,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            q_norm=attn.q_norm.weight if attn.q_norm is not None else None,
            k_norm=attn.k_norm.weight if attn.k_norm is not None else None,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=mlp.gate_up_proj.weight,
            gate_up_bias=mlp.gate_up_proj.bias,
            down=mlp.down_proj.weight,
            down_bias=mlp.down_proj.bias,
            q_size=attn.split_sizes[0],
            kv_size=attn.split_sizes[1],
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            scale=attn.scale,
            sliding_window=attn.sliding_window,
            eps=layer.eps,
        )


def decoder_layer(
    ops: Ops,
    w: LayerWeights,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    meta: AttentionMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The residual stream is carried separately so each norm fuses the add before it.
    if residual is None:
        residual = x
        x = ops.rms_norm(x, w.input_norm, w.eps)
    else:
        x, residual = ops.fused_add_rms_norm(x, residual, w.input_norm, w.eps)
    tokens = x.shape[0]
    qkv = ops.linear(x, w.qkv, w.qkv_bias)
    q = qkv[:, : w.q_size].view(tokens, w.num_heads, w.head_dim)
    k = qkv[:, w.q_size : w.q_size + w.kv_size].view(tokens, w.num_kv_heads, w.head_dim)
    v = qkv[:, w.q_size + w.kv_size :].view(tokens, w.num_kv_heads, w.head_dim)
    if w.q_norm is not None:
        q = ops.rms_norm(q, w.q_norm, w.eps)
        k = ops.rms_norm(k, w.k_norm, w.eps)
    ops.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
    attn = ops.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, w.scale, w.sliding_window
    )
    x = ops.linear(attn.view(tokens, w.q_size), w.o, w.o_bias)
    x, residual = ops.fused_add_rms_norm(x, residual, w.post_norm, w.eps)
    h = ops.silu_and_mul(ops.linear(x, w.gate_up, w.gate_up_bias))
    return ops.linear(h, w.down, w.down_bias), residual
