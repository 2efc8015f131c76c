"""A smaller model with the target's tokenizer proposes k tokens by k batched decode steps of its own.

The draft writes its KV at the same block ids and slots as the target (same block tables, same block size
and count, its own smaller storage), so no second block manager exists and every block the target owns is
a block the draft can write. A sequence's draft KV is trusted only for the tokens the draft itself has
processed for that sequence (``Sequence.num_draft_computed_tokens``, reset whenever its blocks are freed);
the first draft call of each sequence catches up on everything before, in the same batched forward that
proposes the first token. Blocks shared by prefix caching are recomputed too (same tokens and positions,
so the values written are the same): the draft never trusts KV that it cannot prove it wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from slimlm.engine.model_runner import KVCache
from slimlm.engine.sampler import (
    Sampler,
    SamplingState,
    _argmax,
    _keep_rows_drawable,
    apply_min_tokens,
    apply_penalties,
    sample_from_probs,
)
from slimlm.engine.sequence import Sequence
from slimlm.engine.speculative.proposer import Proposals, Proposer
from slimlm.engine.speculative.verify import RowState, needs_processing
from slimlm.model.layers import AttentionMetadata
from slimlm.model.loader import LoadedModel, load_model
from slimlm.sampling_params import SAMPLING_EPS

logger = logging.getLogger(__name__)


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    with open(file) as f:
        data = json.load(f)
    vocab = dict(data.get("model", {}).get("vocab") or {})
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def check_vocab_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Proposals are token ids, so both models must give every id the same meaning."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"the draft model {draft.path} has vocab_size {dv} but the target {target.path} has {tv}: a draft "
            f"must share the target's tokenizer and vocabulary size"
        )
    t_vocab, d_vocab = _tokenizer_vocab(target.path), _tokenizer_vocab(draft.path)
    if t_vocab is not None and d_vocab is not None and t_vocab != d_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda x: x[1])[:1]
        token, tid = diff[0] if diff else ("?", -1)
        raise ValueError(
            f"the draft model {draft.path} has a different tokenizer from the target {target.path} (they disagree "
            f"on token {token!r} / id {tid}): a draft must use the target's tokenizer"
        )


class DraftModelProposer(Proposer):
    method = "draft"

    def __init__(self, draft: LoadedModel, num_blocks: int, block_size: int):
        self._history: dict[int, list[int]] = {}
        model = draft.model
        dtype = model.embed_tokens.weight.dtype
        self.model = model
        self.kv = KVCache(model, num_blocks, block_size, dtype, model.embed_tokens.weight.device)
        self.block_size = block_size
        self.max_positions = model.max_positions
        self.device = self.kv.storage.device
        logger.info(
            "draft model %s: KV cache %.2f GiB more (same %d blocks as the target)",
            draft.path,
            self.kv.storage.numel() * self.kv.storage.element_size() / 2**30,
            num_blocks,
        )

    @classmethod
    def load(cls, path: str, target: LoadedModel, num_blocks: int, block_size: int, max_model_len: int, kernels: str):
        weight = target.model.embed_tokens.weight
        draft = load_model(
            path,
            dtype=weight.dtype,
            device=weight.device,
            kernels=kernels,
            max_positions=max_model_len,
            load_tokenizer_files=False,
        )
        check_vocab_compatible(target, draft)
        return cls(draft, num_blocks, block_size)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        # Longest first: at step j the sequences still drafting are a prefix, so tensors are sliced, not gathered.
        order = sorted((i for i, k in enumerate(num_tokens) if k > 0), key=lambda i: -num_tokens[i])
        if not order:
            return Proposals([[] for _ in seqs])
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        later_pos: list[list[int]] = [[] for _ in range(num_tokens[order[0]] - 1)]  # steps 2..k
        later_slots: list[list[int]] = [[] for _ in later_pos]
        for i in order:
            seq, k = seqs[i], num_tokens[i]
            end = seq.num_tokens
            start = min(seq.num_draft_computed_tokens, end - 1)
            table = seq.block_table
            ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + end - start)
            seq_lens.append(end)
            for j in range(1, k):
                p = end - 1 + j
                later_pos[j - 1].append(p)
                later_slots[j - 1].append(table[p // bs] * bs + p % bs)
            # Positions up to end + k - 2 get written below; verification later lowers this to what was accepted.
            seq.num_draft_computed_tokens = end + k - 1
        dev = self.device
        width = max(len(seqs[i].block_table) for i in order)
        tables = torch.tensor(
            [seqs[i].block_table + [0] * (width - len(seqs[i].block_table)) for i in order],
            dtype=torch.int32,
            device=dev,
        )
        states = [seqs[i].sampling for i in order]
        random_rows = [r for r, s in enumerate(states) if s.params.temperature >= SAMPLING_EPS]
        # Rows whose target distribution has penalties or a min_tokens mask get them in the draft too (with the
        # draft's own proposals counted as output), or a greedy draft would propose what the target rejects.
        self._history = {r: [] for r, s in enumerate(states) if needs_processing(s)}
        q = None
        if random_rows:
            q = torch.zeros(len(seqs), len(later_pos) + 1, self.model.config.vocab_size, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                meta,
                self.kv.layers,
            )
            if hidden.shape[0] != len(order):
                hidden = hidden[torch.tensor(query_start[1:], device=dev) - 1]
            tok = self._choose(hidden, states, random_rows, q, order, 0)
            steps = [tok]
            for j, (pos, slot) in enumerate(zip(later_pos, later_slots, strict=True), 1):
                m = len(pos)
                pos_t = torch.tensor(pos, dtype=torch.int64, device=dev)
                meta = AttentionMetadata(
                    slot_mapping=torch.tensor(slot, dtype=torch.int64, device=dev),
                    block_tables=tables[:m],
                    seq_lens=(pos_t + 1).to(torch.int32),
                    query_start_loc=torch.arange(m + 1, dtype=torch.int32, device=dev),
                )
                hidden = self.model(tok[:m], pos_t, meta, self.kv.layers)
                rows = [r for r in random_rows if r < m]
                tok = self._choose(hidden, states[:m], rows, q, order, j)
                steps.append(tok)
        proposals: list[list[int]] = [[] for _ in seqs]
        for step in steps:
            for r, t in enumerate(step.tolist()):
                proposals[order[r]].append(t)
        return Proposals(proposals, q)

    def _choose(
        self,
        hidden: torch.Tensor,
        states: list[SamplingState],
        random_rows: list[int],
        q: torch.Tensor | None,
        order: list[int],
        step: int,
    ) -> torch.Tensor:
        """Greedy rows take the draft's argmax; random rows draw from q = the draft's tempered distribution."""
        logits = self.model.compute_logits(hidden).float()
        history = self._history
        if history:
            raw = logits.clone()
            rows = [RowState(s, history[r]) if r in history else s for r, s in enumerate(states)]
            apply_penalties(logits, rows)
            apply_min_tokens(logits, rows)
            _keep_rows_drawable(logits, raw)
        tok = _argmax(logits).to(logits.device)
        if random_rows:
            probs = Sampler.random_probs(logits, random_rows, states)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            tok[random_rows] = sample_from_probs(probs, [states[r].generator for r in random_rows])
            q[torch.tensor([order[r] for r in random_rows], device=q.device), step] = probs
        if history:
            values = tok.tolist()
            for r in history:
                if r < len(values):
                    history[r].append(values[r])
        return tok
