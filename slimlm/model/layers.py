"""Decoder building blocks shared by the Llama-family architectures.

The modules own the parameters and run ``forward_dense``: a ``[B, L]`` batch in plain autograd-friendly
PyTorch, for training and evaluation (linears without gradients take the model's kernels, see
:class:`Linear`). Inference over the paged KV cache is ``paged_forward.decoder_layer``, a plain function over
the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.kernels import REFERENCE_OPS, Ops, reference
from slimlm.model import rope
from slimlm.model.config import ModelConfig


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache (see ``slimlm.kernels.reference``)."""

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, cached tokens including this step's
    query_start_loc: torch.Tensor  # [B + 1] int32


class Linear(nn.Linear):
    """``nn.Linear`` whose calls without autograd run on the model's ``ops.linear`` (set by ``CausalLM``).

    Evaluation and calibration run the dense forward too, and on CPUs without AVX512-BF16 torch's bf16
    GEMM is emulated: 12 GFLOP/s against 116 for fp32 on a Zen 3, where slimlm's kernel converts W to fp32
    in chunks for sgemm. Calls that need gradients keep torch's own path.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.ops: Ops = REFERENCE_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(self.ops, x, self.weight, self.bias)


def dense_linear(ops: Ops, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``ops.linear``, or torch's where autograd must see the product."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)
    return ops.linear(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.split_sizes = [config.q_size, config.kv_size, config.kv_size]
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer_index] if config.sliding_windows else 0
        self.qkv_proj = Linear(config.hidden_size, sum(self.split_sizes), bias=config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def _project(self, x: torch.Tensor):
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward_dense(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self._project(x)
        q = rope.rotate(q, positions, cos_sin).transpose(1, 2)
        k = rope.rotate(k, positions, cos_sin).transpose(1, 2)
        v = v.transpose(1, 2)
        length = x.shape[1]
        mask = None
        if self.sliding_window and self.sliding_window < length:
            idx = torch.arange(length, device=x.device)
            diff = idx[:, None] - idx[None, :]
            mask = (diff >= 0) & (diff < self.sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(reference.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward_dense(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.forward_dense(self.input_layernorm(x), positions, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))
