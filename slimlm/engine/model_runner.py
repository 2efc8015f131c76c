"""Runs one scheduled batch: builds the flattened inputs, runs the model on the paged cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.engine.scheduler import ScheduledBatch
from slimlm.model.causal_lm import CausalLM
from slimlm.model.layers import AttentionMetadata


@dataclass
class ModelOutput:
    sample_rows: list[int]  # positions in batch.seqs of the sequences that get a new token
    sample_logits: torch.Tensor  # [len(sample_rows), vocab] float32 (more rows with proposals: sample_counts)
    prompt_logits: dict[int, torch.Tensor]  # batch position -> logits of every row it ran this step
    # Rows per sampled sequence when some carry speculative proposals (1 + their count), else None (all 1).
    sample_counts: list[int] | None = None
    sample_hidden: torch.Tensor | None = None  # the final hidden states behind sample_logits (Medusa heads)


class KVCache:
    """All layers' K and V blocks in one allocation: ``[layers, 2, blocks, kv_heads, block_size, head_dim]``."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        cfg = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.storage = torch.empty(
            cfg.num_layers,
            2,
            num_blocks,
            cfg.num_kv_heads,
            block_size,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )
        self.layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        return model.config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache):
        self.model = model
        self.kv = kv_cache
        self.device = kv_cache.storage.device

    def execute(self, batch: ScheduledBatch, want_prompt_logits: set[int] | None = None) -> ModelOutput:
        """``want_prompt_logits``: batch positions whose every row's logits are needed (prompt logprobs)."""
        bs = self.kv.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        num_spec = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            spec = seq.spec_token_ids  # proposals to verify: they follow the sequence's last token
            if n == 1:
                input_ids.append(seq.token_at(start))
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_slice(start, end - len(spec)))
                input_ids.extend(spec)
                span = range(start, end)
                positions.extend(span)
                slots.extend(table[p // bs] * bs + p % bs for p in span)
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens + len(spec):
                sample_rows.append(i)
                num_spec += len(spec)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                meta,
                self.kv.layers,
            )
            # A sequence with k proposals samples its last k + 1 rows (one per verified position).
            counts = [1 + len(batch.seqs[i].spec_token_ids) for i in sample_rows] if num_spec else None
            if len(sample_rows) + num_spec == hidden.shape[0]:
                sample_hidden = hidden  # all decodes: every row is sampled
            else:
                ends = [query_start[i + 1] for i in sample_rows]
                last_rows = (
                    [e - 1 for e in ends]
                    if not num_spec
                    else [r for e, c in zip(ends, counts, strict=True) for r in range(e - c, e)]
                )
                sample_hidden = hidden[torch.tensor(last_rows, dtype=torch.int64, device=dev)]
            sample_logits = self.model.compute_logits(sample_hidden).float()
            prompt_logits = {
                i: self.model.compute_logits(hidden[query_start[i] : query_start[i + 1]]).float()
                for i in want_prompt_logits or ()
            }
        return ModelOutput(sample_rows, sample_logits, prompt_logits, counts, sample_hidden)
