"""Medusa: extra heads on the target's final hidden state guess the tokens after the next one.

Contract with the heads (``slimlm.train.medusa.MedusaHeads``): ``heads(hidden [T, H]) -> logits [K, T, vocab]``
where ``hidden[t]`` is the target's final (normed) hidden state at some position p, whose LM-head logits
predict the token at p + 1, and head k (0-based) predicts the token at p + 2 + k. The engine keeps, per
sequence, the hidden state that produced its newest token (position N - 2 for a sequence of N tokens), so
head k proposes the token at position N + k: exactly the k-th token after the newest one. Proposals are
each head's argmax (deterministic, so rejection sampling treats q as one-hot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimlm.engine.sampler import _argmax
from slimlm.engine.sequence import Sequence
from slimlm.engine.speculative.proposer import Proposals, Proposer


def load_medusa_heads(path: str, device: torch.device) -> Callable:
    try:
        from slimlm.train.medusa import MedusaHeads
    except ImportError as e:
        raise ValueError(f"method 'medusa' needs slimlm.train.medusa.MedusaHeads, which cannot be imported: {e}") from e
    heads = MedusaHeads.from_pretrained(path)
    return heads.to(device).eval()


class _Hidden:
    """A sequence's newest hidden state: one row of a step's tensor (shared by the step's sequences)."""

    __slots__ = ("rows", "index")

    def __init__(self, rows: torch.Tensor, index: int):
        self.rows = rows
        self.index = index


class MedusaProposer(Proposer):
    method = "medusa"
    wants_hidden = True

    def __init__(self, heads: Callable, num_heads: int | None = None):
        self.heads = heads
        self.num_heads = num_heads if num_heads is not None else getattr(heads, "num_heads", None)
        params = list(heads.parameters()) if isinstance(heads, torch.nn.Module) else []
        self.dtype = params[0].dtype if params else None

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        for i, seq in enumerate(seqs):
            seq.spec_state = _Hidden(hidden, i)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        picked = [i for i, (s, k) in enumerate(zip(seqs, num_tokens, strict=True)) if k > 0 and s.spec_state]
        proposals: list[list[int]] = [[] for _ in seqs]
        if not picked:
            return Proposals(proposals)
        states = [seqs[i].spec_state for i in picked]
        rows = states[0].rows
        if all(s.rows is rows for s in states):  # the usual case: everyone was sampled in the same step
            index = [s.index for s in states]
            hidden = rows if index == list(range(rows.shape[0])) else rows[torch.tensor(index, device=rows.device)]
        else:
            hidden = torch.stack([s.rows[s.index] for s in states])
        if self.dtype is not None and hidden.dtype != self.dtype:
            hidden = hidden.to(self.dtype)
        with torch.inference_mode():
            logits = self.heads(hidden)  # [K, T, V]
        k_max = min(max(num_tokens[i] for i in picked), logits.shape[0])
        tokens = _argmax(logits[:k_max].reshape(k_max * len(picked), -1)).view(k_max, len(picked)).T.tolist()
        for r, i in enumerate(picked):
            proposals[i] = tokens[r][: num_tokens[i]]
        return Proposals(proposals)
