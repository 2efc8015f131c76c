"""One causal LM class for Llama, Mistral, Qwen2 and Qwen3 (they differ only in config flags)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.kernels import Ops
from slimlm.model.config import ModelConfig
from slimlm.model.layers import AttentionMetadata, DecoderLayer, Linear, RMSNorm, dense_linear
from slimlm.model.paged_forward import LayerWeights, decoder_layer, linear
from slimlm.model.quantized_linear import linear_weight
from slimlm.model.rope import cos_sin_table


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.ops = ops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_positions = max_positions or config.max_position_embeddings
        for module in self.modules():
            if isinstance(module, Linear):
                module.ops = ops
        self._inference_weights: list[LayerWeights] | None = None
        self.register_buffer("cos_sin", self.rope_table(), persistent=False)

    def rope_table(self) -> torch.Tensor:
        return cos_sin_table(self.config.rope, self.config.head_dim, self.max_positions)

    @property
    def output_weight(self) -> torch.Tensor:
        """The dense output projection (the tied embedding, or an unquantized lm_head)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _output_projection(self):
        return self.embed_tokens.weight if self.lm_head is None else linear_weight(self.lm_head)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of a flattened batch run against the paged cache."""
        ops = self.ops
        if self._inference_weights is None:
            self.refresh_inference_weights()
        x = F.embedding(input_ids, self.embed_tokens.weight)
        residual = None
        cos_sin = self.cos_sin
        for weights, (k_cache, v_cache) in zip(self._inference_weights, kv_caches, strict=True):
            x, residual = decoder_layer(ops, weights, x, residual, positions, cos_sin, meta, k_cache, v_cache)
        x, _ = ops.fused_add_rms_norm(x, residual, self.norm.weight, self.config.rms_norm_eps)
        return x

    def refresh_inference_weights(self) -> None:
        """Re-gather the tensors the inference forward reads (after parameters were replaced)."""
        self._inference_weights = [LayerWeights.gather(layer) for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.ops, hidden, self._output_projection(), None)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, vocab]`` for a padded-free ``[B, L]`` batch, without a cache (training, eval)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer.forward_dense(x, positions, self.cos_sin)
        x = self.norm(x)
        return dense_linear(self.ops, x, self.embed_tokens.weight, None) if self.lm_head is None else self.lm_head(x)
