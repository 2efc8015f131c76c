"""Speculative decoding inside the engine's step: proposals before the forward, acceptance after it.

``plan`` (after scheduling) picks k for this step, reserves KV slots for k more tokens of every decoding
sequence, asks the proposer and puts the proposals on the sequences, so the model runner runs
[last token + proposals] as one causal multi-token query per sequence: all verification is in the one
target forward. ``sample`` (after the forward) accepts a prefix of each sequence's proposals, rolls
``num_computed_tokens`` back to the accepted length (the rejected positions' KV is overwritten later), gives
back blocks that only rejected tokens used, and appends the emitted tokens one at a time through the
engine's own stop checks, so stop tokens, stop strings and max_tokens end a run exactly where plain
decoding would have ended.
"""

from __future__ import annotations

import time

import torch

from slimlm.engine.model_runner import ModelOutput
from slimlm.engine.scheduler import ScheduledBatch
from slimlm.engine.sequence import Sequence
from slimlm.engine.speculative.adaptive import AdaptiveController
from slimlm.engine.speculative.config import SpeculativeConfig
from slimlm.engine.speculative.metrics import SpeculativeStats
from slimlm.engine.speculative.proposer import Proposer
from slimlm.engine.speculative.verify import emitted_logprobs, verify
from slimlm.sampling_params import SAMPLING_EPS


def build_proposer(config: SpeculativeConfig, engine) -> Proposer:
    if config.method == "ngram":
        from slimlm.engine.speculative.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft":
        from slimlm.engine.speculative.draft import DraftModelProposer

        return DraftModelProposer.load(
            config.model,
            engine.loaded,
            engine.block_manager.num_blocks,
            engine.config.block_size,
            engine.max_model_len,
            engine.config.kernels,
        )
    from slimlm.engine.speculative.medusa import MedusaProposer, load_medusa_heads

    heads = load_medusa_heads(config.model, engine.loaded) if isinstance(config.model, str) else config.model
    proposer = MedusaProposer(heads, project=engine.loaded.model.compute_logits)
    if proposer.num_heads is not None and proposer.num_heads < config.num_speculative_tokens:
        raise ValueError(
            f"num_speculative_tokens is {config.num_speculative_tokens} but the Medusa heads have only "
            f"{proposer.num_heads} heads"
        )
    return proposer


class Speculator:
    def __init__(self, config: SpeculativeConfig, engine, proposer: Proposer | None = None):
        self.config = config
        self.engine = engine  # duck-typed: blocks, sampler, _append_token, limits
        self.proposer = proposer or build_proposer(config, engine)
        self.controller = AdaptiveController(
            config.num_speculative_tokens,
            config.adaptive,
            config.probe_interval,
            config.ewma_weight,
            config.min_speedup,
            config.disable_by_batch_size,
            config.switch_margin,
        )
        self.stats = SpeculativeStats(method=config.method, max_k=config.num_speculative_tokens)
        self.enabled = True  # False: plain decode (benchmarks compare both on one engine)
        self._start = 0.0
        self._k = 0
        self._decode_only = False
        self._batch_size = 0
        self._draft_probs: torch.Tensor | None = None
        self._draft_index: dict[int, int] = {}
        self._planned = 0
        self._forced = False  # seeded sampling requests ran the configured K this step, whatever k was

    # ---- before the forward ---------------------------------------------------------------------------

    def plan(self, batch: ScheduledBatch) -> None:
        self._start = time.perf_counter()
        self._k = self._planned = 0
        self._forced = False
        self._draft_probs = None
        decodes = [
            i
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True))
            if n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
        ]
        self._decode_only = bool(decodes) and len(decodes) == len(batch.seqs)
        self._batch_size = len(batch.seqs)
        if not decodes or not self.enabled:
            return
        k = self._k = self.controller.choose(len(batch.seqs))
        self.stats.current_k = k
        self.stats.predicted_speedup = self.controller.predicted_speedup
        self._forced = any(_seeded_random(batch.seqs[i]) for i in decodes)
        if k == 0 and not self._forced:
            return
        chosen, ks = self._reserve(batch, decodes, k)
        if not chosen:
            return
        seqs = [batch.seqs[i] for i in chosen]
        proposals = self.proposer.propose(seqs, ks)
        made = 0
        blocks = self.engine.block_manager
        for i, seq, toks, want in zip(chosen, seqs, proposals.token_ids, ks, strict=True):
            toks = toks[:want]
            if toks:
                seq.spec_token_ids = toks
                batch.num_tokens[i] += len(toks)
                made += len(toks)
            if len(toks) < want:
                blocks.free_tail(seq, seq.num_tokens + len(toks))
                if not toks:  # no verification will reconcile a draft's speculative KV: trust real tokens only
                    seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_tokens)
        if proposals.probs is not None:
            self._draft_probs = proposals.probs
            self._draft_index = {seq.seq_id: r for r, seq in enumerate(seqs)}
        self.stats.planned_tokens += sum(ks)
        self.stats.proposed_tokens += made
        self._planned = sum(ks)
        self.stats.propose_s += time.perf_counter() - self._start

    def _reserve(self, batch: ScheduledBatch, decodes: list[int], k: int) -> tuple[list[int], list[int]]:
        """KV slots for up to k proposals per decoding sequence, within the token budget and the free blocks
        (speculation never preempts anyone).

        Seeded sampling requests always get the configured K instead: how many random draws a step takes
        depends on how many proposals it verifies, so a K that followed timings or the rest of the batch
        would make their output irreproducible. (Still exact in distribution either way.)
        """
        fixed_k = self.config.num_speculative_tokens
        engine = self.engine
        blocks = engine.block_manager
        limit = engine.max_model_len
        if self.proposer.max_positions is not None:
            limit = min(limit, self.proposer.max_positions)
        budget = engine.config.max_num_batched_tokens - batch.total_tokens
        chosen: list[int] = []
        ks: list[int] = []
        for i in decodes:
            seq = batch.seqs[i]
            seeded = _seeded_random(seq)
            # Nothing past what could be emitted: max_tokens and max_model_len bound every accepted run.
            want = min(
                fixed_k if seeded else min(k, budget),
                seq.max_tokens - len(seq.output_token_ids) - 1,
                limit - seq.num_tokens - 1,
            )
            if want <= 0:
                continue
            if not blocks.allocate(seq, 1 + want):
                free_slots = (len(seq.block_table) + blocks.num_free_blocks) * blocks.block_size
                want = min(want, free_slots - seq.num_computed_tokens - 1)
                if want <= 0 or not blocks.allocate(seq, 1 + want):
                    continue
            chosen.append(i)
            ks.append(want)
            budget -= want
        return chosen, ks

    # ---- after the forward ----------------------------------------------------------------------------

    def sample(self, batch: ScheduledBatch, out: ModelOutput) -> float:
        """Appends this step's tokens (verifying proposals if there are any); returns the sampling seconds."""
        engine = self.engine
        seqs = [batch.seqs[i] for i in out.sample_rows]
        start = time.perf_counter()
        if out.sample_counts is None:
            result = engine.sampler(out.sample_logits, [seq.sampling for seq in seqs])
            spent = time.perf_counter() - start
            now = time.monotonic()
            for j, seq in enumerate(seqs):
                engine._append_token(seq, result, j, now)
            hidden_rows = None
            if self._decode_only and self.enabled:
                self.stats.plain_decode_steps += 1
        else:
            spent, hidden_rows = self._verify(seqs, out, start)
        if self.proposer.wants_hidden and out.sample_hidden is not None:
            hidden = out.sample_hidden
            if hidden_rows is not None:
                hidden = hidden[torch.tensor(hidden_rows, dtype=torch.int64, device=hidden.device)]
            self.proposer.observe(seqs, hidden)
        if self._decode_only and not self._forced:
            # Plain steps while switched off (benchmarks) are measurements of t(b, 0) all the same.
            elapsed = time.perf_counter() - self._start
            self.controller.record_cost(self._batch_size, self._k, elapsed)
            if self.enabled:
                self.stats.decode_step_s += elapsed
                self.stats.decode_steps += 1
        return spent

    def _verify(self, seqs: list[Sequence], out: ModelOutput, start: float) -> tuple[float, list[int]]:
        engine = self.engine
        blocks = engine.block_manager
        emitted, offsets = verify(out.sample_logits, seqs, self._draft_probs, self._draft_index)
        results = emitted_logprobs(out.sample_logits, seqs, offsets, emitted)
        spent = time.perf_counter() - start
        self.stats.verify_s += spent
        stats = self.stats
        now = time.monotonic()
        accepted = trials = proposed = 0
        hidden_rows = []
        for seq, toks, result, offset in zip(seqs, emitted, results, offsets, strict=True):
            spec = seq.spec_token_ids
            a = len(toks) - 1
            hidden_rows.append(offset + a)
            if spec:
                stats.verified_seqs += 1
                proposed += len(spec)
                accepted += a
                trials += a + (a < len(spec))
            seq.spec_token_ids = []
            # KV is valid through the last accepted proposal; the next step recomputes from the emitted token.
            kept = seq.num_tokens + a
            seq.num_computed_tokens = kept
            seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, kept)
            blocks.free_tail(seq, kept + 1)
            for j in range(len(toks)):
                engine._append_token(seq, result, j, now)
                stats.emitted_tokens += 1
                if seq.finished:
                    break
            if not seq.finished:
                blocks.commit(seq)
        stats.verify_steps += 1
        stats.accepted_tokens += accepted
        self.controller.record_acceptance(self._planned, proposed, accepted, trials)
        stats.acceptance_ewma = self.controller.acceptance
        return spent, hidden_rows


def _seeded_random(seq: Sequence) -> bool:
    return seq.params.seed is not None and seq.params.temperature >= SAMPLING_EPS
