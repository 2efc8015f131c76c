"""Prompt lookup: if the context's last n tokens occurred before, propose what followed them then.

Each sequence keeps a dict from every n-gram of its context (n in [min, max]) to the end of its most recent
occurrence, extended by the tokens appended since the last call, so a lookup costs O(new tokens), not a
scan of the whole context per step.
"""

from __future__ import annotations

from slimlm.engine.sequence import Sequence
from slimlm.engine.speculative.proposer import Proposals, Proposer


class _NgramIndex:
    __slots__ = ("last_end", "indexed")

    def __init__(self):
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> exclusive end of its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in last_end


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 3):
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        return Proposals([self._lookup(seq, k) if k > 0 else [] for seq, k in zip(seqs, num_tokens, strict=True)])

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        index = seq.spec_state
        if not isinstance(index, _NgramIndex):
            index = seq.spec_state = _NgramIndex()
        length = seq.num_tokens
        lo, hi = self.min_n, self.max_n
        first = max(index.indexed, lo)
        base = max(0, min(first, length) - hi)
        toks = seq.token_slice(base, length)
        last_end = index.last_end
        # Only n-grams followed by at least one token (end < length) are indexed: the suffix itself is not,
        # so a lookup finds an earlier occurrence.
        for end in range(first, length):
            e = end - base
            for n in range(lo, min(hi, end) + 1):
                last_end[tuple(toks[e - n : e])] = end
        index.indexed = max(index.indexed, length)
        tail = length - base
        for n in range(min(hi, length), lo - 1, -1):
            end = last_end.get(tuple(toks[tail - n : tail]))
            if end is not None:
                found = seq.token_slice(end, min(end + k, length))
                # A match close to the end means the context repeats with period length - end; extending
                # that period (what the lookup itself predicts) keeps a repeated pattern's proposals K long.
                while len(found) < k:
                    found.append(found[len(found) - (length - end)])
                return found
        return []
