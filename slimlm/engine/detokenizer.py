"""Incremental detokenization and stop-string handling.

:class:`IncrementalDetokenizer` turns generated token ids into text deltas as they
arrive.  It uses vLLM's prefix_offset / read_offset method: each step decodes a short
window of the most recent tokens twice (with and without the new tokens) and emits the
difference; when the window's text ends in U+FFFD (an incomplete UTF-8 sequence, e.g. a
multi-byte character split across byte-level tokens) nothing is emitted and the tokens
stay in the window until the character is complete.  The window starts with the last few
prompt tokens, as in vLLM, so the output is the text that continues the prompt: a
SentencePiece-style tokenizer (Llama, Mistral) drops the space of a word-initial token at the
very start of a decode, and without that context "Hello" + " world" would come out as
"world".  For byte-level BPE tokenizers the concatenated deltas plus
:meth:`IncrementalDetokenizer.flush` equal ``tokenizer.decode(output_ids,
skip_special_tokens=...)``.

:class:`StopStringMatcher` accumulates the text, detects stop strings (also ones that
span several deltas), truncates the text at the match and tells a streaming caller how
much text is safe to send: text that could still turn out to be the start of a stop
string is held back, so a streaming caller never sees text that is later cut.

:class:`StreamingDetokenizer` combines both for one sequence, driven by its
:class:`~slimlm.sampling_params.SamplingParams`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_REPLACEMENT = "\ufffd"


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or itself)."""
    for attr in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attr, None)
        if backend is not None and hasattr(backend, "decode") and hasattr(backend, "id_to_token"):
            return backend
    if hasattr(tokenizer, "decode") and hasattr(tokenizer, "id_to_token"):
        return tokenizer  # already a tokenizers.Tokenizer
    raise TypeError(
        f"expected a transformers PreTrainedTokenizerFast or a tokenizers.Tokenizer, got {type(tokenizer)!r}"
    )


class IncrementalDetokenizer:
    """Decode one sequence's generated tokens incrementally.

    Args:
        tokenizer: a ``transformers.PreTrainedTokenizerFast`` (or a ``tokenizers.Tokenizer``).
        prompt_token_ids: the prompt; its last :attr:`PROMPT_CONTEXT` tokens open the decode
            window (unless they end inside a multi-byte character, then no context is used).
        skip_special_tokens: drop special tokens from the text.
        spaces_between_special_tokens: accepted for vLLM compatibility; fast tokenizers
            have no such option (vLLM and transformers ignore it for them too).

    Note: transformers' ``clean_up_tokenization_spaces`` post-processing (WordPiece-era,
    off for the BPE tokenizers of current LLMs) is not applied.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tok = _backend(tokenizer)
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.token_ids: list[int] = []  # the generated tokens
        self.output_text = ""  # everything returned so far
        # The decode window runs over context + generated tokens; offsets index that list.
        context = self.prompt_token_ids[-self.PROMPT_CONTEXT :] if self.prompt_token_ids else []
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: its completion belongs to the output, and a
            # length-based diff against the U+FFFD would cut it. Decode the output on its own.
            context, context_text = [], ""
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        # decode(_ids[prefix_offset:read_offset]), cached between steps.
        self._prefix_text = context_text

    PROMPT_CONTEXT = 5  # prompt tokens that open the window (vLLM's choice)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: int | Iterable[int]) -> str:
        """Append generated token id(s); return the newly decodable text (possibly "")."""
        new = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_ids.extend(new)
        self._ids.extend(new)
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            # Nothing new yet (e.g. skipped special tokens) or a possibly incomplete
            # multi-byte character at the end: wait for more tokens.
            return ""
        delta = new_text[len(self._prefix_text) :]
        # Keep the just-read tokens as context for the next window.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (the sequence has ended).

        Bytes that never formed a complete character come out as U+FFFD, exactly as in
        a full ``decode``.  Safe to call more than once.
        """
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(self._prefix_text) :] if len(new_text) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self.output_text += delta
        return delta


def find_stop_string(
    text: str, new_char_count: int, stop: Sequence[str], include_stop_str_in_output: bool = False
) -> tuple[str, int] | None:
    """Look for a stop string that ends inside the last ``new_char_count`` chars of ``text``.

    Returns ``(stop_str, truncate_to)`` — the output text is ``text[:truncate_to]`` — or
    None.  Matches may start before the new chars (a stop string spanning several tokens).
    When several stop strings occur, the one that is completed first (smallest end
    position) wins, ties going to the one that starts first; this is what a caller
    receiving the text one character at a time would see, so the result does not depend
    on how the text was split into deltas.
    """
    if not stop or new_char_count <= 0:
        return None
    n = len(text)
    new_start = n - min(new_char_count, n)
    best: tuple[int, int, str] | None = None  # (end, start, stop_str)
    for s in stop:
        # Earliest occurrence of s that ends in the new region (end > new_start).
        i = text.find(s, max(0, new_start - len(s) + 1))
        if i == -1:
            continue
        end = i + len(s)
        if best is None or (end, i) < best[:2]:
            best = (end, i, s)
    if best is None:
        return None
    end, start, s = best
    return s, (end if include_stop_str_in_output else start)


def stop_prefix_holdback(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    That tail may still become part of a stop string and must not be streamed yet.  It is
    at most ``max(len(s) for s in stop) - 1`` (vLLM's fixed hold-back length).
    """
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopStringMatcher:
    """Accumulate output text, stop at the first stop string, and meter streaming.

    >>> m = StopStringMatcher(["</end>"])
    >>> m.append("Hello </e"), m.stream()
    (None, 'Hello ')
    >>> m.append("nd> trailing"), m.text, m.stream(finished=True)
    ('</end>', 'Hello ', '')

    ``append(delta)`` returns the matched stop string (the sequence should then finish)
    or None.  ``stream(finished)`` returns the text not yet streamed, holding back a tail
    that could still be the start of a stop string unless ``finished``.  With
    ``fixed_holdback=False`` (default) only a tail that really is a prefix of some stop
    string is held back; with ``True`` the fixed vLLM length ``max(len(stop)) - 1`` is.
    With ``include_stop_str_in_output`` nothing needs holding back (text is only ever cut
    after the end of a stop string, which lies in text not yet seen).
    """

    def __init__(
        self,
        stop: Sequence[str] | None,
        include_stop_str_in_output: bool = False,
        fixed_holdback: bool = False,
    ) -> None:
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.fixed_holdback = fixed_holdback
        self.max_holdback = max(len(s) for s in self.stop) - 1 if self.stop and not include_stop_str_in_output else 0
        self.text = ""
        self.stop_reason: str | None = None
        self._streamed = 0

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def append(self, delta: str) -> str | None:
        """Add newly decoded text; return the stop string if one has just completed."""
        if self.stop_reason is not None or not delta:
            return None
        self.text += delta
        hit = find_stop_string(self.text, len(delta), self.stop, self.include_stop_str_in_output)
        if hit is not None:
            self.stop_reason, cut = hit
            self.text = self.text[:cut]
        return self.stop_reason if hit is not None else None

    def streamable_length(self, finished: bool = False) -> int:
        """How many chars of ``text`` can be shown without risk of being cut later."""
        if finished or self.stop_reason is not None or self.max_holdback == 0:
            return len(self.text)
        if self.fixed_holdback:
            return max(0, len(self.text) - self.max_holdback)
        return len(self.text) - stop_prefix_holdback(self.text, self.stop)

    def stream(self, finished: bool = False) -> str:
        """The text to send now (never text that a later stop string would cut)."""
        end = max(self._streamed, self.streamable_length(finished))
        delta = self.text[self._streamed : end]
        self._streamed = end
        return delta


@dataclass
class DetokenizerStep:
    delta: str  # text to stream now (already held back / truncated as needed)
    stop_str: str | None  # the stop string matched in this step, if any


class StreamingDetokenizer:
    """One sequence's text: incremental detokenization + stop strings + safe streaming.

    ``step(new_token_ids, finished=False, stop_token_terminated=False)``: feed the tokens
    sampled this step.  ``finished`` says the engine is ending the sequence for another
    reason (EOS, stop token id, length); then held-back text is flushed.  With
    ``stop_token_terminated`` (the last token is EOS or a stop token id) that token's text
    is left out unless ``include_stop_str_in_output``, as vLLM does.  If the returned
    ``stop_str`` is not None the sequence must finish (``finish_reason="stop"``,
    ``stop_reason=stop_str``).  ``text`` is the full output text so far.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        self.matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.include_stop_str_in_output = params.include_stop_str_in_output

    @property
    def text(self) -> str:
        return self.matcher.text

    @property
    def stop_reason(self) -> str | None:
        return self.matcher.stop_reason

    def step(
        self, new_token_ids: int | Sequence[int], finished: bool = False, stop_token_terminated: bool = False
    ) -> DetokenizerStep:
        ids = [new_token_ids] if isinstance(new_token_ids, int) else list(new_token_ids)
        if stop_token_terminated and ids and not self.include_stop_str_in_output:
            ids = ids[:-1]
            finished = True
        stop_str = None
        if not self.matcher.stopped:
            stop_str = self.matcher.append(self.detokenizer.add_tokens(ids))
            if stop_str is None and finished:
                stop_str = self.matcher.append(self.detokenizer.flush())
        return DetokenizerStep(self.matcher.stream(finished or stop_str is not None), stop_str)
