"""Sampling parameters for text generation, modelled on vLLM's ``SamplingParams``.

Field names, defaults and meaning follow vLLM (v1) so that code written against
``vllm.SamplingParams`` works unchanged for the fields listed here.  Every field is
validated in ``__post_init__``; an invalid value raises ``ValueError`` whose message
names the field and the allowed range or type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Temperatures below this are treated as greedy decoding (same constant as vLLM).
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Args:
        n: number of output sequences to return for the prompt (>= 1).
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token that
            already appears in the generated text (> 0 favours new tokens).
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it
            appears in the generated text.
        repetition_penalty: > 0; for tokens seen in the prompt or the generated text,
            positive logits are divided by it and negative logits multiplied by it
            (> 1 discourages repetition, 1 = off).
        temperature: >= 0; values below 1e-5 mean greedy decoding.
        top_p: in (0, 1]; nucleus sampling, 1 = off.
        top_k: int >= -1; keep the k most likely tokens, 0 or -1 = off (-1 is stored as 0).
        min_p: in [0, 1]; drop tokens whose probability is below ``min_p`` times the
            probability of the most likely token, 0 = off.
        seed: int or None; seeds this request's own random stream.
        stop: str, list of str or None; generation stops when one of them is produced.
            Normalised to a list.
        stop_token_ids: token ids that stop generation (the stop token is kept in the
            output token ids).
        include_stop_str_in_output: keep the matched stop string in the output text.
        ignore_eos: keep generating after the EOS token.
        max_tokens: int >= 1, or None for "up to the context length".
        min_tokens: int >= 0 (and <= max_tokens); EOS and ``stop_token_ids`` cannot be
            generated before this many tokens.
        logprobs: int >= 0 or None; number of top log-probabilities to return per generated
            token, in addition to the sampled token's own log-probability.
        prompt_logprobs: int >= 0 or None; same for the prompt tokens.
        skip_special_tokens: drop special tokens from the output text.
        spaces_between_special_tokens: accepted for vLLM compatibility; fast tokenizers
            (the only kind slimlm uses) ignore it, as in vLLM and transformers.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._verify_and_normalise()

    # ------------------------------------------------------------------ validation
    def _verify_and_normalise(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{name} must be {what}, got {getattr(self, name)!r}.")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an int >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", "a finite number > 0")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < float("inf"):
            raise bad("temperature", "a finite number >= 0")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an int >= -1 (0 or -1 disables top-k)")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an int or None")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise bad("stop", "a str, a list of str or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {self.stop!r}.")

        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise bad("stop_token_ids", "a list of ints >= 0 or None")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {self.stop_token_ids!r}.")

        for name in (
            "include_stop_str_in_output",
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        ):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise bad(name, "an int >= 0 or None")

        # Normalisation (as vLLM): -1 means "off" for top_k, stored as 0; greedy requests
        # ignore the truncation knobs, so reset them to make ``is_greedy`` rows cheap.
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < SAMPLING_EPS:
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.presence_penalty = float(self.presence_penalty)
        self.frequency_penalty = float(self.frequency_penalty)
        self.repetition_penalty = float(self.repetition_penalty)

    # ------------------------------------------------------------------ properties
    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a streaming caller holds back: the tail that could still turn out
        to be the start of a stop string (vLLM's definition: ``max(len(stop)) - 1``)."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def all_stop_token_ids(self) -> set[int]:
        """``stop_token_ids`` as a set (EOS is added by the engine, which knows it)."""
        return set(self.stop_token_ids)

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)
