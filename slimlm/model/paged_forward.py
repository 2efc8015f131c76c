"""The inference forward: a flattened batch through every layer against the paged KV cache.

It is a plain function over pre-gathered weight tensors rather than nested ``nn.Module`` calls, because
at batch 1 a step is bound by per-op overhead: module dispatch and parameter lookups cost as much as the
small ops themselves. The modules in ``layers.py`` still own the parameters (loading, saving,
quantization, training); ``LayerWeights`` only holds references to them, so in-place weight updates show
through, and ``CausalLM.refresh_inference_weights()`` re-gathers after parameters are replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimlm.kernels import Ops
from slimlm.model.layers import AttentionMetadata, DecoderLayer
from slimlm.model.quantized_linear import linear_weight

Weight = torch.Tensor | Callable  # dense [N, K], or a quantized kernel (x, bias) -> y


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight
    qkv_bias: torch.Tensor | None
    o: Weight
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: Weight
    gate_up_bias: torch.Tensor | None
    down: Weight
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
            qkv=linear_weight(attn.qkv_proj),
            qkv_bias=attn.qkv_proj.bias,
            o=linear_weight(attn.o_proj),
            o_bias=attn.o_proj.bias,
            q_norm=attn.q_norm.weight if attn.q_norm is not None else None,
            k_norm=attn.k_norm.weight if attn.k_norm is not None else None,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=linear_weight(mlp.gate_up_proj),
            gate_up_bias=mlp.gate_up_proj.bias,
            down=linear_weight(mlp.down_proj),
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


def linear(ops: Ops, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return ops.linear(x, weight, bias)
    return weight(x, bias)


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
    qkv = linear(ops, x, w.qkv, w.qkv_bias)
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
    x = linear(ops, attn.view(tokens, w.q_size), w.o, w.o_bias)
    x, residual = ops.fused_add_rms_norm(x, residual, w.post_norm, w.eps)
    h = ops.silu_and_mul(linear(ops, x, w.gate_up, w.gate_up_bias))
    return linear(ops, h, w.down, w.down_bias), residual
