"""Prompt text to checked token ids, chat templates and token strings, on the request handlers' side.

The frontend works on its own copy of the tokenizer (like vLLM's API process): the engine thread decodes
with the original, and a shared Rust tokenizer used from two threads is one bug nobody wants to chase.
"""

from __future__ import annotations

import copy

from slimlm.serve.errors import APIError


class Tokens:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def _need_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompts as token ids", param)
        return self.tokenizer

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        return list(self._need_tokenizer(param).encode(text, add_special_tokens=add_special_tokens))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tokenizer = self._need_tokenizer("messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template's own raise_exception(...) and Jinja errors are the caller's input
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        # The template already holds any BOS token, so none is added again.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def info(self) -> dict:
        """The special tokens and chat template (vLLM's /tokenizer_info; lm-eval's remote tokenizer reads it)."""
        tokenizer = self._need_tokenizer("tokenizer")
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": self.max_model_len,
        }

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def check_ids(self, token_ids: list[int], param: str) -> list[int]:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)
        return token_ids

    def check_prompt(self, token_ids: list[int], param: str) -> list[int]:
        """A prompt the engine can continue: not empty, in the vocabulary, room for one generated token."""
        if not token_ids:
            raise APIError(400, "the prompt is empty: give at least one token", param)
        self.check_ids(token_ids, param)
        if len(token_ids) >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(token_ids)} tokens, which leaves no room for a completion. Please shorten the prompt.",
                param,
            )
        return token_ids
