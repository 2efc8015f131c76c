"""``LLM``: the offline API, shaped like vLLM's (``from slimlm import LLM, SamplingParams``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.outputs import RequestOutput
from slimlm.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


def _ensure_log_handler() -> None:
    # Like vLLM, show the engine's start-up facts (KV cache size, dtype) unless the app configured logging.
    root = logging.getLogger("slimlm")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s slimlm: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        _ensure_log_handler()
        torch.manual_seed(seed)
        config = EngineConfig(model=str(model), dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_kwargs)
        self.engine = Engine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion (batched continuously) and returns outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params or self.engine.default_sampling_params(), len(prompts))
        ids = self._add(prompts, params)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's output after every step that changed it; the last one has ``finished``."""
        (request_id,) = self._add([prompt], [sampling_params or self.engine.default_sampling_params()])
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[int]:
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model was loaded without one")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template=... (a Jinja string)")
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )
        # The template already holds any BOS token, so none is added again.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _add(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        added: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, _prompt_value(prompt), p)
                added.append(request_id)
        except BaseException:
            # A bad prompt rejects the whole call and leaves nothing of it queued.
            for request_id in added:
                self.engine.abort_request(request_id)
            raise
        return added


def _prompt_value(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
    return prompt


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
