"""Batched token sampler (one call per engine step).

The engine calls :class:`Sampler` with the logits of the last position of every running
sequence (``Tensor[B, V]``, float32 or bf16, any device) and one :class:`SamplingState`
per row.  The processing order is vLLM's:

1. log-probabilities, if any row asks for them, from the RAW logits
   (``log_softmax`` before penalties and temperature; vLLM v1's default ``raw_logprobs``);
2. penalties: repetition (tokens seen in prompt + output: positive logits divided by the
   penalty, negative ones multiplied), then frequency and presence (output tokens only:
   ``logit -= frequency * count + presence * (count > 0)``);
3. ``min_tokens``: EOS and ``stop_token_ids`` are masked until the row has generated
   ``min_tokens`` tokens (EOS is not masked when ``ignore_eos`` is set);
4. greedy rows: ``argmax`` (ties -> lowest index, as ``torch.argmax``);
5. random rows: temperature, top-k, top-p, min-p, then a draw.

The draw is inverse-CDF sampling with ONE uniform per row (``searchsorted`` in the
row's cumulative sum): on CPU this is ~20x cheaper than an exponential race
(which needs V exponentials per row).  A seeded row draws its uniform from its own
``torch.Generator`` and every step is row-wise, so its tokens do not depend on the rest
of the batch or on its row position; unseeded rows share the global torch RNG.

Cost: the all-greedy, no-logprobs, no-penalty case is one argmax (numpy's on CPU) and
one ``.tolist()``; everything else is vectorised over the rows that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from slimlm.sampling_params import SAMPLING_EPS, SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, index: int = 0) -> int:
    """The seed of the ``index``-th sample of a request seeded with ``seed``.

    ``index == 0`` keeps ``seed`` itself (so an n=1 request seeded with s draws from the
    same stream as ``torch.Generator().manual_seed(s)``); other indices get a well-mixed
    64-bit seed so that neighbouring (seed, index) pairs do not share streams.
    """
    if index == 0:
        return seed & _MASK64
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))


def make_generator(seed: int | None, index: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private random stream for the ``index``-th sample of a request seeded with ``seed``.

    Returns None when ``seed`` is None (the row then uses the global RNG).  ``device`` must
    be the device of the logits the sampler will see.
    """
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, index))
    return g


@dataclass
class SamplingState:
    """What the sampler needs to know about one running sequence.

    The engine owns it and appends each sampled token to ``output_token_ids`` (append-only:
    the penalty bookkeeping below is incremental; it is rebuilt if the list shrinks).
    ``eos_token_ids`` is used for ``min_tokens`` masking (EOS is not masked when
    ``params.ignore_eos``).
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Incremental penalty bookkeeping (private): the distinct tokens of prompt + output
    # and their output counts, as numpy arrays grown in place.
    _pen_pos: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)
    _pen_toks: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _pen_cnts: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _pen_n: int = field(default=0, init=False, repr=False, compare=False)
    _counted: int = field(default=0, init=False, repr=False, compare=False)

    def penalty_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct token ids of prompt + output int64, their output counts float32).

        Updated incrementally from the tokens appended since the last call (O(new tokens));
        rebuilt from scratch if ``output_token_ids`` got shorter.
        """
        out = self.output_token_ids
        if self._pen_pos is None or len(out) < self._counted:
            uniq = dict.fromkeys(self.prompt_token_ids)
            n = len(uniq)
            self._pen_pos = {t: i for i, t in enumerate(uniq)}
            self._pen_toks = np.empty(max(16, 2 * n), dtype=np.int64)
            self._pen_toks[:n] = np.fromiter(uniq, dtype=np.int64, count=n)
            self._pen_cnts = np.zeros(len(self._pen_toks), dtype=np.float32)
            self._pen_n = n
            self._counted = 0
        pos, toks, cnts = self._pen_pos, self._pen_toks, self._pen_cnts
        for t in out[self._counted :]:
            i = pos.get(t)
            if i is None:
                i = self._pen_n
                if i == len(toks):
                    toks = self._pen_toks = np.concatenate([toks, np.empty_like(toks)])
                    cnts = self._pen_cnts = np.concatenate([cnts, np.zeros_like(cnts)])
                pos[t] = i
                toks[i] = t
                self._pen_n += 1
            cnts[i] += 1.0
        self._counted = len(out)
        return toks[: self._pen_n], cnts[: self._pen_n]


@dataclass
class SamplerOutput:
    """Result of one sampler call.

    ``token_ids[i]`` is the token sampled for row i.  The logprob fields are None unless
    some row asked for logprobs; then, for every row: ``logprobs[i]`` is the sampled token's
    raw log-probability, ``ranks[i]`` its 1-based rank (1 + number of tokens with a strictly
    larger logprob), and ``top_token_ids[i]`` / ``top_logprobs[i]`` the row's
    ``params.logprobs`` most likely tokens in decreasing order (empty for rows whose
    ``params.logprobs`` is None or 0).
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    ranks: list[int] | None = None
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def logprobs_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor | list[int], num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensor version of :func:`compute_logprobs` (results stay on ``logits.device``).

    Returns ``(token_logprobs [T] float32, ranks [T] int64, top_ids [T, num_top] int64,
    top_logprobs [T, num_top] float32)``.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if not isinstance(token_ids, torch.Tensor):
        token_ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    token_ids = token_ids.to(device=logits.device, dtype=torch.long)
    token_logprobs = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    ranks = (logprobs > token_logprobs.unsqueeze(-1)).sum(-1) + 1
    num_top = min(num_top, logprobs.shape[-1])
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    else:
        top_logprobs = logprobs.new_empty((*logprobs.shape[:-1], 0))
        top_ids = token_ids.new_empty((*logprobs.shape[:-1], 0))
    return token_logprobs, ranks, top_ids, top_logprobs


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor | list[int], num_top: int
) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
    """Log-probabilities of ``token_ids`` under ``logits`` (``[T, V]``) plus the top ``num_top``.

    Returns plain Python lists: ``token_logprobs[t]`` (``log_softmax(logits[t])[token_ids[t]]``),
    ``ranks[t]`` (1-based: 1 + number of tokens with a strictly larger logprob),
    ``top_ids[t]`` / ``top_logprobs[t]`` (the ``num_top`` most likely tokens, decreasing).
    For prompt logprobs pass the logits of positions ``0..T-1`` and the prompt tokens
    ``1..T``.  Memory: one float32 ``[T, V]`` temporary — chunk very long prompts.
    """
    lp, ranks, top_ids, top_lp = logprobs_tensors(logits, token_ids, num_top)
    return lp.tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist()


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Apply repetition / frequency / presence penalties in place (float32 ``[B, V]``).

    For every token t seen in the prompt or the output of a row (vLLM's formulas)::

        logit = logit / rep if logit > 0 else logit * rep        (prompt + output tokens)
        logit -= frequency * count_out(t) + presence * (count_out(t) > 0)

    Sparse: only the (row, token) pairs that occur are gathered, updated and scattered
    back, so the cost is O(distinct tokens), not O(V).  Rows without penalties are untouched.
    """
    V = logits.shape[1]
    rows: list[int] = []
    toks: list[np.ndarray] = []
    cnts: list[np.ndarray] = []
    params: list[tuple[float, float, float]] = []
    for i, s in enumerate(states):
        p = s.params
        if p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0:
            continue
        t, c = s.penalty_arrays()
        if len(t):
            rows.append(i)
            toks.append(t)
            cnts.append(c)
            params.append((p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
    if not rows:
        return logits
    lens = [len(t) for t in toks]
    col = np.concatenate(toks) if len(toks) > 1 else toks[0]
    cnt = np.concatenate(cnts) if len(cnts) > 1 else cnts[0]
    row = np.repeat(np.asarray(rows, dtype=np.int64), lens)
    per_tok = np.repeat(np.asarray(params, dtype=np.float32), lens, axis=0)  # [N, 3]
    if col.max() >= V or col.min() < 0:  # ids the model has no logit for
        ok = (col >= 0) & (col < V)
        col, cnt, row, per_tok = col[ok], cnt[ok], row[ok], per_tok[ok]
    dev = logits.device
    r = torch.from_numpy(row).to(dev)
    c = torch.from_numpy(np.ascontiguousarray(col)).to(dev)
    n = torch.from_numpy(np.ascontiguousarray(cnt)).to(dev)
    pt = torch.from_numpy(per_tok).to(dev)
    rep, freq, pres = pt[:, 0], pt[:, 1], pt[:, 2]
    vals = logits[r, c]
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    vals = vals - freq * n - pres * (n > 0).float()
    logits[r, c] = vals
    return logits


def _min_tokens_ids(state: SamplingState) -> list[int]:
    p = state.params
    if p.min_tokens == 0 or len(state.output_token_ids) >= p.min_tokens:
        return []
    ids = list(p.stop_token_ids)
    if not p.ignore_eos:
        ids.extend(state.eos_token_ids)
    return ids


def apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Mask EOS / stop token ids (to -inf, in place) for rows below their ``min_tokens``."""
    r_idx: list[int] = []
    c_idx: list[int] = []
    V = logits.shape[1]
    for i, s in enumerate(states):
        for t in _min_tokens_ids(s):
            if 0 <= t < V:
                r_idx.append(i)
                c_idx.append(t)
    if r_idx:
        logits[r_idx, c_idx] = float("-inf")
    return logits


def _sorted_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each row of ``x``, in decreasing order.

    ``torch.topk`` for a partial window; a full sort uses numpy on CPU (torch's CPU sort
    is ~10x slower at V=49152; ``np.partition`` is avoided: it degrades badly on rows
    with many equal values, e.g. masked ones).
    """
    V = x.shape[1]
    if k < V:
        return x.topk(k, dim=-1).values
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1)[:, ::-1].copy())
    return x.sort(dim=-1, descending=True).values


def apply_top_k_top_p(
    logits: torch.Tensor,
    k: torch.Tensor | list[int] | None,
    p: torch.Tensor | list[float] | None,
    first_k: int = 64,
) -> torch.Tensor:
    """Mask (to -inf, in place) the logits outside each row's top-k set, then its nucleus.

    ``k``: ``[B]`` ints or None; a value <= 0 or >= V means no top-k for that row.  Tokens
    tied with the k-th largest logit are kept (as in vLLM).  ``p``: ``[B]`` floats or None;
    a value >= 1 means no top-p.  The nucleus is computed on the distribution left after
    top-k: the smallest set of most likely tokens whose probability sums to at least p (a
    token is kept iff the tokens more likely than it sum to less than p: vLLM's rule;
    tokens tied with the least likely kept one are kept too).  Python lists avoid
    device syncs for the bookkeeping.

    Nothing sorts the vocabulary unless it must: one ``topk`` with window ``max(k, first_k)``
    serves both; rows without top-k whose nucleus does not fit in the window are retried
    alone with a 16x wider window, then with a full sort (64 -> 1024 -> V at V=49152).
    """
    B, V = logits.shape
    device = logits.device
    k_list = [0] * B if k is None else (k.tolist() if isinstance(k, torch.Tensor) else list(k))
    p_list = [1.0] * B if p is None else (p.tolist() if isinstance(p, torch.Tensor) else list(p))
    k_flags = [0 < x < V for x in k_list]
    p_flags = [x < 1.0 for x in p_list]
    any_k, any_p = any(k_flags), any(p_flags)
    if not (any_k or any_p):
        return logits
    kk_list = [x if f else V for x, f in zip(k_list, k_flags, strict=True)]
    window = max(
        max((x for x, f in zip(kk_list, k_flags, strict=True) if f), default=1),
        first_k if any(fp and not fk for fp, fk in zip(p_flags, k_flags, strict=True)) else 1,
    )
    window = min(window, V)
    kk = torch.tensor(kk_list, dtype=torch.long, device=device)
    k_on = torch.tensor(k_flags, dtype=torch.bool, device=device)
    vals = _sorted_top(logits, window)
    thresh = torch.full((B, 1), float("-inf"), dtype=logits.dtype, device=device)
    if any_k:
        thresh_k = vals.gather(1, (kk.clamp(max=window) - 1).unsqueeze(1))
        thresh = torch.where(k_on.unsqueeze(1), thresh_k, thresh)
    if any_p:
        if all(p_flags):
            rows, sub, sub_vals, sub_k, sub_k_on = None, logits, vals, kk, k_on
            sub_p = torch.tensor(p_list, dtype=torch.float32, device=device).unsqueeze(1)
        else:
            idx = [i for i, f in enumerate(p_flags) if f]
            rows = torch.tensor(idx, dtype=torch.long, device=device)
            sub, sub_vals, sub_k, sub_k_on = logits[rows], vals[rows], kk[rows], k_on[rows]
            sub_p = torch.tensor([p_list[i] for i in idx], dtype=torch.float32, device=device).unsqueeze(1)
        all_sub_k = all(fk for fp, fk in zip(p_flags, k_flags, strict=True) if fp)
        lse_full = None
        while True:
            w = sub_vals.shape[1]
            pos = torch.arange(w, device=device).unsqueeze(0)
            v = sub_vals.masked_fill(pos >= sub_k.unsqueeze(1), float("-inf")) if any_k else sub_vals
            # Normaliser: a top-k row's whole support is in the window; others need the row's.
            if all_sub_k:
                lse = torch.logsumexp(v, dim=-1, keepdim=True)
            else:
                if lse_full is None:
                    lse_full = torch.logsumexp(sub, dim=-1, keepdim=True)
                lse = torch.where(sub_k_on.unsqueeze(1), torch.logsumexp(v, dim=-1, keepdim=True), lse_full)
            csum = (v - lse).exp_().cumsum_(dim=-1)
            fits = sub_k_on | (csum[:, -1] >= sub_p.squeeze(1)) | (w >= V)
            last = (csum < sub_p).sum(dim=-1).clamp_(max=sub_k.clamp(max=w) - 1).unsqueeze(1)
            t_p = v.gather(1, last)
            if rows is None and bool(fits.all()):
                thresh = torch.maximum(thresh, t_p)
                break
            if rows is None:
                rows = torch.arange(B, device=device)
            thresh[rows[fits]] = torch.maximum(thresh[rows[fits]], t_p[fits])
            if bool(fits.all()):
                break
            # Rows whose nucleus is wider than the window: retry them with a wider one.
            keep = ~fits
            rows, sub, sub_k, sub_k_on, sub_p = (
                rows[keep],
                sub[keep],
                sub_k[keep],
                sub_k_on[keep],
                sub_p[keep],
            )
            lse_full = lse_full[keep] if lse_full is not None else None
            wider = V if w * 16 >= V // 4 else w * 16
            sub_vals = _sorted_top(sub, wider)
    return logits.masked_fill_(logits < thresh, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero (in place) probabilities below ``min_p * max_prob`` (rows with min_p=0 untouched).

    Works on normalised or unnormalised probabilities (the rule is relative to the max).
    """
    thresh = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill_(probs < thresh, 0.0)


def _uniforms(n: int, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) float32 per row: from the row's generator if it has one, else global RNG."""
    if all(g is not None for g in generators):
        u = torch.empty(n, dtype=torch.float32, device=device)
    else:
        u = torch.rand(n, dtype=torch.float32, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i : i + 1] = torch.rand(1, dtype=torch.float32, device=device, generator=g)
    return u


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row from (possibly unnormalised, zero-masked) ``probs`` ``[B, V]``.

    Inverse-CDF sampling: one uniform per row, located in the row's cumulative sum (float32:
    each token's interval is off by at most one ulp of the running sum, ~6e-8 absolute; a
    zero-probability token has an exactly empty interval and can never be drawn).  Each
    row's result depends only on its own probabilities and its own random stream (its
    generator, or the global RNG), so a seeded row is independent of the rest of the batch.
    """
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = _uniforms(probs.shape[0], generators, probs.device).unsqueeze(1)
    # Keep the target strictly below the total: the last non-zero token stays reachable
    # and nothing after it can be returned.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax, ties to the lowest index (NaN counts as the maximum, as in torch).

    On CPU numpy's SIMD argmax is used: torch's CPU argmax is ~15x slower at LLM
    vocabulary sizes (~130 us vs ~9 us for V=49152).
    """
    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            x = x.float()
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _keep_rows_drawable(work: torch.Tensor, raw: torch.Tensor) -> None:
    """Rows that penalties or min_tokens left without a finite logit (a repetition penalty that underflows
    float32, stop ids that cover the whole vocabulary) fall back to their raw logits: one odd request
    must yield some token rather than an out-of-range id that fails the whole batch."""
    work.nan_to_num_(nan=float("-inf"))
    dead = ~torch.isfinite(work).any(dim=-1)
    if bool(dead.any()):
        work[dead] = raw[dead].float()


class Sampler:
    """Turns a step's logits into next tokens (and optional logprobs); stateless."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        return self.sample(logits, states)

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [B, V] with B={len(states)} rows, got {tuple(logits.shape)}")
        all_greedy = True
        need_logprobs = False
        need_penalties = False
        need_min_tokens = False
        for s in states:
            p = s.params
            if p.temperature >= SAMPLING_EPS:
                all_greedy = False
            if p.logprobs is not None:
                need_logprobs = True
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
                need_penalties = True
            if p.min_tokens and len(s.output_token_ids) < p.min_tokens:
                need_min_tokens = True

        # Fast path: one argmax and one device->host copy.
        if all_greedy and not (need_logprobs or need_penalties or need_min_tokens):
            return SamplerOutput(token_ids=_argmax(logits).tolist())

        raw = logits
        work = logits.float()
        if need_penalties or need_min_tokens:
            if work is logits:
                work = work.clone()
            if need_penalties:
                apply_penalties(work, states)
            if need_min_tokens:
                apply_min_tokens(work, states)
            _keep_rows_drawable(work, raw)

        if all_greedy:
            sampled = _argmax(work).to(logits.device)
        else:
            rand_rows = [i for i, s in enumerate(states) if s.params.temperature >= SAMPLING_EPS]
            random_tokens = self._sample_random(work, rand_rows, states)
            if len(rand_rows) == len(states):
                sampled = random_tokens
            else:
                sampled = _argmax(work).to(logits.device)
                sampled[rand_rows] = random_tokens

        if not need_logprobs:
            return SamplerOutput(token_ids=sampled.tolist())

        num_top = [s.params.logprobs or 0 for s in states]
        tok_lp, ranks, top_ids, top_lp = logprobs_tensors(raw, sampled, max(num_top))
        top_ids_l = top_ids.tolist()
        top_lp_l = top_lp.tolist()
        return SamplerOutput(
            token_ids=sampled.tolist(),
            logprobs=tok_lp.tolist(),
            ranks=ranks.tolist(),
            top_token_ids=[row[:n] for row, n in zip(top_ids_l, num_top, strict=True)],
            top_logprobs=[row[:n] for row, n in zip(top_lp_l, num_top, strict=True)],
        )

    @staticmethod
    def _sample_random(work: torch.Tensor, rows: list[int], states: list[SamplingState]) -> torch.Tensor:
        """temperature -> top-k -> top-p -> min-p -> draw, for the random rows only."""
        probs = Sampler.random_probs(work, rows, states)
        return sample_from_probs(probs, [states[i].generator for i in rows])

    @staticmethod
    def random_probs(work: torch.Tensor, rows: list[int], states: list[SamplingState]) -> torch.Tensor:
        """The distribution a random row draws from (``[len(rows), V]``, zero-masked, not renormalised after
        min-p): temperature -> top-k -> top-p -> softmax -> min-p. Speculative verification needs it too."""
        device = work.device
        params = [states[i].params for i in rows]
        x = work[rows] if len(rows) != work.shape[0] else work
        # A float64 temperature past float32's range would become inf and turn masked (-inf) logits into
        # NaN; 1e30 already makes every unmasked token equally likely.
        temps = torch.tensor([min(p.temperature, 1e30) for p in params], dtype=torch.float32, device=device)
        x = x / temps.unsqueeze(1)  # new tensor: the caller's logits are never modified
        k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(v > 0 for v in k) or any(v < 1.0 for v in top_p):
            apply_top_k_top_p(x, k, top_p)
        probs = x.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(probs, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))
        return probs
