"""Validation and test perplexity: every token of a split predicted once, in non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimlm.model.causal_lm import CausalLM
from slimlm.train.autocast import autocast_context
from slimlm.train.data import eval_windows

__all__ = ["evaluate_perplexity"]


@torch.no_grad()
def evaluate_perplexity(
    model: CausalLM,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean next-token NLL (nats), perplexity and the number of predicted tokens of ``tokens``.

    ``max_tokens`` > 0 evaluates only the first ``max_tokens`` predictions. The model is left in the
    train/eval mode it was in.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in eval_windows(tokens, seq_len, batch_size, max_tokens):
            batch = batch.to(device)
            with autocast_context(device, autocast_dtype):
                logits = model.forward_dense(batch.input_ids)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="sum")
            total += float(nll)
            count += batch.num_tokens
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    # exp overflows a float past ~709 nats (a diverged model); the cap keeps the result finite.
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}
