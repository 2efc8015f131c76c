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


def load_medusa_heads(path: str, target) -> Callable:
    """The heads in ``path``, borrowing ``target``'s output projection (a ``LoadedModel`` or ``CausalLM``)."""
    try:
        from slimlm.train.medusa import MedusaHeads
    except ImportError as e:
        raise ValueError(f"method 'medusa' needs slimlm.train.medusa.MedusaHeads, which cannot be imported: {e}") from e
    return MedusaHeads.from_pretrained(path, target=target)


class _StackedBlocks:
    """Every head's residual block ``h + silu(W_k h + b_k)`` as one ``[K*H, H]`` matmul.

    K separate small matmuls cost more in per-call overhead than in arithmetic (4 x 384^2 on a CPU: ~115 us as
    four calls). The heads are frozen while the engine runs, so the stacked copy is made once.
    """

    def __init__(self, blocks):
        linears = [block.linear for block in blocks]
        self.weight = torch.cat([lin.weight.detach() for lin in linears]).float()
        self.bias = torch.cat([lin.bias.detach() for lin in linears]).float()
        self.hidden_size = linears[0].weight.shape[1]

    def __call__(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """``hidden [T, H]`` -> the first ``k`` heads' block outputs, ``[k * T, H]`` (head-major), float32."""
        h = hidden.float()
        size = k * self.hidden_size
        y = torch.nn.functional.linear(h, self.weight[:size], self.bias[:size])
        out = h.unsqueeze(1) + torch.nn.functional.silu(y.view(h.shape[0], k, self.hidden_size))
        return out.transpose(0, 1).reshape(k * h.shape[0], self.hidden_size)


class _Hidden:
    """A sequence's newest hidden state: one row of a step's tensor (shared by the step's sequences)."""

    __slots__ = ("rows", "index")

    def __init__(self, rows: torch.Tensor, index: int):
        self.rows = rows
        self.index = index


class MedusaProposer(Proposer):
    method = "medusa"
    wants_hidden = True

    def __init__(
        self,
        heads: Callable,
        num_heads: int | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``project``: the target's own hidden -> logits (its fast kernel and weights). With it, heads of
        the ``MedusaHeads`` kind run as one stacked block matmul plus one projection of only the rows asked
        for; without it (or for any other heads callable), ``heads(hidden)`` is called as the contract says."""
        self.heads = heads
        self.num_heads = num_heads if num_heads is not None else getattr(heads, "num_heads", None)
        params = list(heads.parameters()) if isinstance(heads, torch.nn.Module) else []
        self.dtype = params[0].dtype if params else None
        blocks = getattr(heads, "blocks", None)
        self._stacked = _StackedBlocks(blocks) if project is not None and blocks is not None else None
        self._project = project

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
        k_max = max(num_tokens[i] for i in picked)
        with torch.inference_mode():
            if self._stacked is not None:
                k_max = min(k_max, self.num_heads)
                rows = self._stacked(hidden, k_max)
                logits = self._project(rows.to(hidden.dtype))  # [k_max * T, V]
            else:
                if self.dtype is not None and hidden.dtype != self.dtype:
                    hidden = hidden.to(self.dtype)
                logits = self.heads(hidden)  # [K, T, V]
                k_max = min(k_max, logits.shape[0])
                logits = logits[:k_max].reshape(k_max * len(picked), -1)
        tokens = _argmax(logits).view(k_max, len(picked)).T.tolist()
        for r, i in enumerate(picked):
            proposals[i] = tokens[r][: num_tokens[i]]
        return Proposals(proposals)
