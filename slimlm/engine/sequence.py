"""One generated sequence: its tokens, its place in the KV cache and its sampling state."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from slimlm.engine.sampler import SamplingState
from slimlm.outputs import Logprob
from slimlm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request with ``n`` samples is ``n`` sequences sharing one prompt (and, by prefix caching, its KV)."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    max_tokens: int
    arrival: float
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    first_token_time: float | None = None
    detokenizer: object | None = None
    skip_prefix_cache: bool = False  # prompt logprobs need every prompt row computed
    # Speculative decoding: this step's proposals (verified after the forward, never part of the output), the
    # proposer's own per-sequence state, and how many leading tokens a draft model has KV for in the blocks.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_state: object | None = None
    num_draft_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet (the prompt, or everything after a preemption)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def token_at(self, position: int) -> int:
        n_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n_prompt else self.output_token_ids[position - n_prompt]


class SequenceIds:
    """Hands out unique sequence ids for one engine."""

    def __init__(self):
        self._next = itertools.count()

    def __call__(self) -> int:
        return next(self._next)
