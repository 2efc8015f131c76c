"""What every proposer provides: up to k guessed next tokens per decoding sequence, in one batched call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.engine.sequence import Sequence


@dataclass
class Proposals:
    # Per sequence (in the order asked), at most the number of tokens asked for; fewer (even none) is fine.
    token_ids: list[list[int]]
    # [sequences, max k, vocab]: the distribution each proposal was drawn from, for sequences that sample at
    # temperature > 0 (rejection sampling needs q). None: proposals are deterministic (q is one-hot).
    probs: torch.Tensor | None = None


class Proposer(ABC):
    method: ClassVar[str]
    # True: the engine passes the target's final hidden state of each sequence's newest token to observe().
    wants_hidden: ClassVar[bool] = False
    # Positions the proposer can handle (a draft model's rope table); None: no limit of its own.
    max_positions: int | None = None

    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        """Propose up to ``num_tokens[i]`` tokens to follow ``seqs[i]``'s last token.

        Every sequence's KV blocks already cover ``num_computed_tokens + 1 + num_tokens[i]`` positions.
        """

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """``hidden[i]``: the target's final hidden state that produced ``seqs[i]``'s newest token."""
