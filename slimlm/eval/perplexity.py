"""Perplexity by the GPTQ protocol.

The documents are joined with ``"\\n\\n"`` and tokenized once (the caller's job: :func:`tokenize`); the
ids are cut into non-overlapping windows of ``seq_len`` tokens (the tail that does not fill a window is
dropped), each window runs through the model's dense forward on its own, and the perplexity is
``exp`` of the mean next-token NLL over every predicted token (``seq_len - 1`` per window). ``seq_len``
is clamped to what the model supports (``max_position_embeddings`` and its RoPE table), with a logged
note, and shrunk to the data when there are fewer tokens than one window.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.model.causal_lm import CausalLM

__all__ = ["PerplexityResult", "model_device", "perplexity", "prepare_windows", "tokenize"]

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood, nats
    tokens: int  # tokens in the windows
    predicted_tokens: int  # windows * (seq_len - 1)
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str) -> list[int]:
    """The whole text in one call, as the GPTQ protocol does (special tokens as the tokenizer adds them)."""
    return list(tokenizer(text, return_attention_mask=False)["input_ids"])


def model_device(model: CausalLM) -> torch.device:
    return model.embed_tokens.weight.device


def max_seq_len(model: CausalLM) -> int:
    return min(model.config.max_position_embeddings, model.max_positions)


def prepare_windows(models: Sequence[CausalLM], token_ids, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[windows, seq_len]`` int64 ids on the first model's device (seq_len clamped as the module says)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"the evaluation data has {ids.numel()} token(s); at least 2 are needed")
    limit = min(max_seq_len(m) for m in models)
    if seq_len > limit:
        logger.warning("seq_len %d exceeds the model's %d positions; using windows of %d tokens", seq_len, limit, limit)
        seq_len = limit
    if ids.numel() < seq_len:
        logger.warning(
            "only %d tokens of data: one window of %d tokens instead of %d", ids.numel(), ids.numel(), seq_len
        )
        seq_len = ids.numel()
    vocab = min(m.config.vocab_size for m in models)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab}); the tokenizer does not fit the model")
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len).to(model_device(models[0]))


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one window (float32 log-softmax whatever the model dtype)."""
    return F.cross_entropy(logits[:-1].float(), window[1:], reduction="sum")


def perplexity(
    model: CausalLM,
    token_ids,
    seq_len: int = 2048,
    *,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (a list or 1-D tensor of the whole tokenized text)."""
    start = time.perf_counter()
    windows = prepare_windows([model], token_ids, seq_len, max_tokens)
    count, length = windows.shape
    total = 0.0
    with torch.inference_mode():
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            logits = model.forward_dense(window.unsqueeze(0))[0]
            total += float(window_nll(logits, window))
    predicted = count * (length - 1)
    nll = total / predicted
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count * length,
        predicted_tokens=predicted,
        windows=count,
        seq_len=length,
        seconds=time.perf_counter() - start,
    )
