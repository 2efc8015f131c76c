"""``POST /v1/completions``: OpenAI's completions, streamed or whole, with echo and per-token logprobs.

lm-evaluation-harness scores loglikelihood through this route: ``echo=True, logprobs=N, max_tokens=0 or 1``
and the prompt tokens' logprobs (the engine's prompt_logprobs) read back from ``token_logprobs``.
A streamed choice and a whole one are built by the same code: the whole response is the delta from
nothing to the final output.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from slimlm.outputs import CompletionOutput, RequestOutput
from slimlm.serve.async_engine import RequestGroup
from slimlm.serve.errors import APIError, as_api_error, error_body
from slimlm.serve.logprobs import clamp, token_string
from slimlm.serve.params import sampling_params
from slimlm.serve.schemas import CompletionRequest
from slimlm.serve.sse import DONE, EventStream, event
from slimlm.serve.state import ClientGone, ServeState, unless_disconnected


@dataclass
class _Sent:
    """How much of one choice the client already has."""

    echoed: bool = False
    text: int = 0
    tokens: int = 0
    offset: int = 0  # text_offset of the next token


class CompletionJob:
    def __init__(self, request: CompletionRequest, state: ServeState):
        self.request = request
        self.state = state
        self.tokens = state.tokens
        self.only_prompt = request.max_tokens == 0
        if self.only_prompt and not request.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 is only allowed with echo=true)", "max_tokens")
        if request.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of must equal n (this server returns every sample)", "best_of")
        self.prompts = [self._encode(p) for p in _prompt_list(request.prompt)]
        self.params = sampling_params(
            request,
            state,
            # Scoring a prompt still runs one step, whose token is dropped.
            max_tokens=1 if self.only_prompt else request.max_tokens,
            logprobs=None if self.only_prompt else request.logprobs,
            prompt_logprobs=request.logprobs if request.echo else None,
        )
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        ids = self.tokens.encode(prompt) if isinstance(prompt, str) else prompt
        return (prompt if isinstance(prompt, str) else None), self.tokens.check_prompt(ids, "prompt")

    async def respond(self, http_request: Request) -> Response:
        group = self.state.engine.submit([(ids, self.params) for _, ids in self.prompts], stream=self.request.stream)
        if self.request.stream:
            return EventStream(self._events(group), on_close=group.close)
        try:
            outputs = await unless_disconnected(http_request, group.final())
        except ClientGone:
            return Response(status_code=499)
        finally:
            group.close()
        return JSONResponse(self._whole(outputs))

    def _whole(self, outputs: list[RequestOutput]) -> dict:
        choices = [self._choice(_Sent(), i, out, c) for i, out in enumerate(outputs) for c in out.outputs]
        return {**self._head(choices), "usage": self._usage(outputs)}

    async def _events(self, group: RequestGroup) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], _Sent] = {}
        last: dict[int, RequestOutput] = {}
        include_usage = bool(self.request.stream_options and self.request.stream_options.include_usage)
        try:
            async for i, out in group:
                last[i] = out
                for c in out.outputs:
                    choice = self._choice(sent.setdefault((i, c.index), _Sent()), i, out, c)
                    if choice is not None:
                        chunk = self._head([choice])
                        if include_usage:
                            chunk["usage"] = None
                        yield event(chunk)
            if include_usage:
                yield event({**self._head([]), "usage": self._usage([last[i] for i in sorted(last)])})
        except Exception as e:  # this request's failure is this request's alone
            err = as_api_error(e)
            yield event(error_body(err.status, err.message, err.param))
        yield DONE

    def _head(self, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }

    def _usage(self, outputs: list[RequestOutput]) -> dict:
        prompt = sum(len(out.prompt_token_ids) for out in outputs)
        completion = 0 if self.only_prompt else sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, sent: _Sent, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        """The part of choice ``c`` of prompt ``i`` not sent yet, or None when nothing is new."""
        text, ids, entries = "", [], []
        if self.request.echo and not sent.echoed:
            sent.echoed = True
            prompt_text, prompt_ids = self.prompts[i]
            text = prompt_text if prompt_text is not None else self.tokens.decode(prompt_ids)
            ids = list(out.prompt_token_ids)
            entries = list(out.prompt_logprobs or [None] * len(ids))
        if self.only_prompt:
            finish = "length" if c.finished else None
        else:
            text += c.text[sent.text :]
            ids += c.token_ids[sent.tokens :]
            entries += (c.logprobs or [])[sent.tokens :]
            sent.text, sent.tokens = len(c.text), len(c.token_ids)
            finish = c.finish_reason
        if not text and not ids and finish is None:
            return None
        logprobs = None
        if self.request.logprobs is not None:
            logprobs, sent.offset = self._logprobs(ids, entries, sent.offset)
        return {
            "index": i * self.request.n + c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": c.stop_reason if not self.only_prompt else None,
        }

    def _logprobs(self, ids: list[int], entries: list[dict | None], offset: int) -> tuple[dict, int]:
        block: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        entries = entries + [None] * (len(ids) - len(entries))
        for token_id, entry in zip(ids, entries, strict=True):
            chosen = entry.get(token_id) if entry else None
            text = token_string(self.tokens, token_id, chosen)
            block["tokens"].append(text)
            block["token_logprobs"].append(clamp(chosen.logprob) if chosen is not None else None)
            top = None
            if entry:
                # The chosen token first, then the top-N (OpenAI's "chosen plus the N most likely").
                top = {}
                for tid, lp in entry.items():
                    top.setdefault(token_string(self.tokens, tid, lp), clamp(lp.logprob))
            block["top_logprobs"].append(top)
            block["text_offset"].append(offset)
            offset += len(text)
        return block, offset


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


async def create_completion(request: CompletionRequest, http_request: Request, state: ServeState) -> Response:
    state.check_model(request.model)
    return await CompletionJob(request, state).respond(http_request)
