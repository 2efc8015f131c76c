"""KL divergence of a (compressed) model from its base model, on the perplexity windows.

For every predicted position of every window (see :mod:`slimlm.eval.perplexity`) it computes
``KL(base || model) = sum_v p_base(v) * (log p_base(v) - log p_model(v))`` over the next-token
distributions, in float32, and reports the mean. A model against itself gives exactly 0. Both models'
perplexities come out of the same pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.eval.perplexity import prepare_windows
from slimlm.model.causal_lm import CausalLM

__all__ = ["KLResult", "kl_divergence", "kl_divergences"]


@dataclass
class KLResult:
    kl_div: float  # mean KL(base || model) per predicted token, nats
    perplexity: float  # of the model
    base_perplexity: float
    tokens: int
    predicted_tokens: int
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def kl_divergence(
    model: CausalLM,
    base: CausalLM,
    token_ids,
    seq_len: int = 2048,
    *,
    max_tokens: int | None = None,
    progress: bool = True,
) -> KLResult:
    """Mean KL(base || model) of next-token distributions over the GPTQ-protocol windows of ``token_ids``."""
    return kl_divergences({"model": model}, base, token_ids, seq_len, max_tokens=max_tokens, progress=progress)["model"]


def kl_divergences(
    models: Mapping[str, CausalLM],
    base: CausalLM,
    token_ids,
    seq_len: int = 2048,
    *,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, KLResult]:
    """:func:`kl_divergence` of several models against one base, whose forward runs once per window."""
    for name, model in models.items():
        if model.config.vocab_size != base.config.vocab_size:
            raise ValueError(
                f"{name} has {model.config.vocab_size} vocabulary entries and the base {base.config.vocab_size}; "
                f"KL divergence needs the same vocabulary"
            )
    start = time.perf_counter()
    windows = prepare_windows([*models.values(), base], token_ids, seq_len, max_tokens)
    base_device = base.embed_tokens.weight.device
    count, length = windows.shape
    kl = dict.fromkeys(models, 0.0)
    nll = dict.fromkeys(models, 0.0)
    base_nll = 0.0
    with torch.inference_mode():
        for window in tqdm(windows, desc="kl-div", unit="window", disable=not progress):
            targets = window[1:].unsqueeze(-1)
            base_logp = base.forward_dense(window.to(base_device).unsqueeze(0))[0, :-1].float().log_softmax(-1)
            base_nll -= float(base_logp.gather(-1, targets.to(base_device)).sum())
            for name, model in models.items():
                logp = model.forward_dense(window.unsqueeze(0))[0, :-1].float().log_softmax(-1)
                kl[name] += float(F.kl_div(logp, base_logp.to(logp.device), log_target=True, reduction="sum"))
                nll[name] -= float(logp.gather(-1, targets).sum())
    predicted = count * (length - 1)
    seconds = time.perf_counter() - start
    return {
        name: KLResult(
            kl_div=kl[name] / predicted,
            perplexity=math.exp(nll[name] / predicted),
            base_perplexity=math.exp(base_nll / predicted),
            tokens=count * length,
            predicted_tokens=predicted,
            windows=count,
            seq_len=length,
            seconds=seconds,
        )
        for name in models
    }
