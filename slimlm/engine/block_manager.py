"""Fixed-size KV blocks: allocation, ref counts, and prefix caching by chained block hashes.

A block that fills up gets a hash chained from its predecessor's and its own token ids, so equal hashes
mean equal prefixes. Freed blocks keep their contents and hash and go to the back of an LRU free queue;
a later request with the same prefix takes them back (a cache hit), and allocation evicts from the front.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from slimlm.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks holding ``seq``'s leading full blocks; returns the tokens they cover.

        At least one token is always left to compute, since the last token's logits are needed.
        """
        assert not seq.block_table, "match_prefix runs before a sequence owns blocks"
        num_tokens = seq.num_tokens
        self.stats.queried_tokens += num_tokens
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = None
        for i in range((num_tokens - 1) // bs):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            key = hash((parent, tokens))
            block_id = self.hash_to_block.get(key)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(key)
            parent = key
        cached = len(seq.block_table) * bs
        seq.num_computed_tokens = cached
        self.stats.hit_tokens += cached
        return cached

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Ensure blocks for ``num_new_tokens`` more tokens; False (and nothing taken) if too few are free."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free_queue):
            return False
        for _ in range(need):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that this step filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            key = hash((parent, tokens))
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = key, tokens
            self.hash_to_block.setdefault(key, block.block_id)
            seq.block_hashes.append(key)
            parent = key

    def free(self, seq: Sequence) -> None:
        # Tail blocks go to the free queue first so they are evicted before the shared prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0

    def free_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens (slots of rejected speculative tokens)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                # Never hashed, so nothing to keep: reused first, before blocks a prefix may still hit.
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1
