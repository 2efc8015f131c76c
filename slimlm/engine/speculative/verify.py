"""Verification: which proposals the target accepts, and the one token it adds after them.

Row j of a sequence's verification rows is the target's distribution for the token after its newest token
and its first j proposals, so it is processed exactly as the plain sampler would process that position:
the same penalties and min_tokens mask with those j proposals counted as output (``RowState``), the same
temperature / top-k / top-p / min-p. Greedy rows accept the longest prefix equal to the argmax and then emit
the argmax. Random rows do rejection sampling (Leviathan et al. 2023): accept proposal x with probability
min(1, p(x) / q(x)); at the first rejection draw from normalize(max(0, p - q)); after K acceptances draw the
bonus token from p. The emitted tokens are then distributed exactly as plain sampling from p would make
them. Deterministic proposers have q = one-hot, so the residual is p without the rejected token.
"""

from __future__ import annotations

import numpy as np
import torch

from slimlm.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingState,
    _argmax,
    _keep_rows_drawable,
    apply_min_tokens,
    apply_penalties,
    logprobs_tensors,
    sample_from_probs,
)
from slimlm.engine.sequence import Sequence
from slimlm.sampling_params import SAMPLING_EPS


class RowState:
    """A sequence's sampling state as seen from verification row j: its first j proposals count as output."""

    __slots__ = ("params", "generator", "eos_token_ids", "output_token_ids", "_state", "_extra")

    def __init__(self, state: SamplingState, extra: list[int]):
        self.params = state.params
        self.generator = state.generator
        self.eos_token_ids = state.eos_token_ids
        self.output_token_ids = state.output_token_ids + extra
        self._state = state
        self._extra = extra

    def penalty_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        toks, cnts = self._state.penalty_arrays()
        if not self._extra:
            return toks, cnts
        toks, cnts = list(toks), list(cnts)
        where = {t: i for i, t in enumerate(toks)}
        for t in self._extra:
            i = where.get(t)
            if i is None:
                where[t] = len(toks)
                toks.append(t)
                cnts.append(1.0)
            else:
                cnts[i] += 1.0
        return np.asarray(toks, dtype=np.int64), np.asarray(cnts, dtype=np.float32)


def needs_processing(state: SamplingState) -> bool:
    p = state.params
    penalties = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
    return penalties or bool(p.min_tokens and len(state.output_token_ids) < p.min_tokens)


def verify(
    logits: torch.Tensor,
    seqs: list[Sequence],
    draft_probs: torch.Tensor | None = None,
    draft_index: dict[int, int] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """``logits``: ``[sum(1 + len(spec)), V]``, each sequence's rows in order. ``draft_probs[draft_index[seq_id]]``
    holds q for the proposals of random-sampling sequences (None or absent: one-hot).

    Returns the tokens each sequence emits (its accepted proposals, then the target's own token) and the
    first row of each sequence (emitted token j came from row ``offset + j``).
    """
    offsets: list[int] = []
    row_states: list = []
    processed = False
    all_greedy = True
    for seq in seqs:
        offsets.append(len(row_states))
        spec = seq.spec_token_ids
        state = seq.sampling
        if state.params.temperature >= SAMPLING_EPS:
            all_greedy = False
        if needs_processing(state):
            processed = True
            row_states.extend(RowState(state, spec[:j]) for j in range(len(spec) + 1))
        else:
            row_states.extend([state] * (len(spec) + 1))
    if logits.shape[0] != len(row_states):
        raise ValueError(f"verification expects {len(row_states)} logit rows, got {logits.shape[0]}")

    work = logits
    if processed:
        work = logits.float().clone()
        apply_penalties(work, row_states)
        apply_min_tokens(work, row_states)
        _keep_rows_drawable(work, logits)  # as the plain sampler does
    greedy_seqs = [i for i, s in enumerate(seqs) if s.sampling.params.temperature < SAMPLING_EPS]
    emitted: list[list[int]] = [[] for _ in seqs]
    if greedy_seqs:
        target = _argmax(work).tolist()
        for i in greedy_seqs:
            spec, o = seqs[i].spec_token_ids, offsets[i]
            a = 0
            while a < len(spec) and spec[a] == target[o + a]:
                a += 1
            emitted[i] = target[o : o + a + 1]
    if not all_greedy:
        random_seqs = [i for i, s in enumerate(seqs) if s.sampling.params.temperature >= SAMPLING_EPS]
        _rejection_sample(work, seqs, random_seqs, offsets, row_states, draft_probs, draft_index or {}, emitted)
    return emitted, offsets


def _rejection_sample(
    work: torch.Tensor,
    seqs: list[Sequence],
    chosen: list[int],
    offsets: list[int],
    row_states: list,
    draft_probs: torch.Tensor | None,
    draft_index: dict[int, int],
    emitted: list[list[int]],
) -> None:
    device = work.device
    rows: list[int] = []
    local: list[int] = []  # each chosen sequence's first row within probs
    for i in chosen:
        local.append(len(rows))
        rows.extend(range(offsets[i], offsets[i] + len(seqs[i].spec_token_ids) + 1))
    probs = Sampler.random_probs(work, rows, row_states)
    probs = probs / probs.sum(dim=-1, keepdim=True)

    # One uniform per proposal, drawn from the sequence's own stream (seeded requests reproduce).
    p_rows: list[int] = []
    p_toks: list[int] = []
    q_seq: list[int] = []  # row of draft_probs, or -1 for a one-hot q
    q_pos: list[int] = []
    uniforms: list[torch.Tensor] = []
    for c, i in enumerate(chosen):
        spec = seqs[i].spec_token_ids
        if not spec:
            continue
        p_rows.extend(range(local[c], local[c] + len(spec)))
        p_toks.extend(spec)
        qi = draft_index.get(seqs[i].seq_id, -1) if draft_probs is not None else -1
        q_seq.extend([qi] * len(spec))
        q_pos.extend(range(len(spec)))
        gen = seqs[i].sampling.generator
        uniforms.append(torch.rand(len(spec), device=device, generator=gen))
    accepted: list[bool] = []
    if p_rows:
        toks_t = torch.tensor(p_toks, dtype=torch.int64, device=device)
        p_vals = probs[torch.tensor(p_rows, device=device), toks_t]
        q_vals = torch.ones_like(p_vals)
        with_q = [r for r, qi in enumerate(q_seq) if qi >= 0]
        if with_q:
            sel = torch.tensor(with_q, device=device)
            q_vals[sel] = draft_probs[
                torch.tensor([q_seq[r] for r in with_q], device=device),
                torch.tensor([q_pos[r] for r in with_q], device=device),
                toks_t[sel],
            ]
        # u < p / q without dividing (q > 0: a proposal is never drawn where q is zero).
        accepted = (torch.cat(uniforms) * q_vals < p_vals).tolist()

    final_rows: list[int] = []
    rejected: list[tuple[int, int, int, int]] = []  # (row of final, rejected token, draft_probs row or -1, j)
    cursor = 0
    for c, i in enumerate(chosen):
        spec = seqs[i].spec_token_ids
        a = 0
        while a < len(spec) and accepted[cursor + a]:
            a += 1
        cursor += len(spec)
        emitted[i] = spec[:a]
        final_rows.append(local[c] + a)
        if a < len(spec):
            qi = draft_index.get(seqs[i].seq_id, -1) if draft_probs is not None else -1
            rejected.append((len(final_rows) - 1, spec[a], qi, a))
    final = probs[torch.tensor(final_rows, device=device)]
    if rejected:
        for f, tok, qi, a in rejected:
            if qi >= 0:
                final[f] = (final[f] - draft_probs[qi, a]).clamp_(min=0.0)
            else:
                final[f, tok] = 0.0
        # Rounding can leave nothing when p == q; the residual is then p itself.
        empty = final.sum(dim=-1) <= 0
        if bool(empty.any()):
            final[empty] = probs[torch.tensor(final_rows, device=device)][empty]
    tokens = sample_from_probs(final, [seqs[i].sampling.generator for i in chosen]).tolist()
    for c, i in enumerate(chosen):
        emitted[i].append(tokens[c])


def emitted_logprobs(logits: torch.Tensor, seqs: list[Sequence], offsets: list[int], emitted: list[list[int]]):
    """Per sequence, a SamplerOutput of its emitted tokens, with raw logprobs from each token's own row when
    the request asks for logprobs (as the plain sampler reports them)."""
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    outputs = [SamplerOutput(token_ids=toks) for toks in emitted]
    if not want:
        return outputs
    rows = [offsets[i] + j for i in want for j in range(len(emitted[i]))]
    toks = [t for i in want for t in emitted[i]]
    num_top = max(seqs[i].params.logprobs or 0 for i in want)
    lp, ranks, top_ids, top_lp = logprobs_tensors(logits[torch.tensor(rows, device=logits.device)], toks, num_top)
    lp, ranks, top_ids, top_lp = lp.tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist()
    r = 0
    for i in want:
        n, top = len(emitted[i]), seqs[i].params.logprobs or 0
        outputs[i] = SamplerOutput(
            token_ids=emitted[i],
            logprobs=lp[r : r + n],
            ranks=ranks[r : r + n],
            top_token_ids=[row[:top] for row in top_ids[r : r + n]],
            top_logprobs=[row[:top] for row in top_lp[r : r + n]],
        )
        r += n
    return outputs
