"""``POST /v1/chat/completions``: the tokenizer's chat template, then generation, streamed as OpenAI deltas.

A stream sends each choice's role first (before any token, so clients show the turn at once), then
content deltas, then a chunk with the finish reason; ``stream_options.include_usage`` adds a usage chunk.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from slimlm.outputs import CompletionOutput, Logprob, RequestOutput
from slimlm.serve.async_engine import RequestGroup
from slimlm.serve.errors import APIError, as_api_error, error_body
from slimlm.serve.logprobs import LOGPROB_FLOOR, clamp, token_string
from slimlm.serve.params import sampling_params
from slimlm.serve.schemas import ChatCompletionRequest, ChatMessage
from slimlm.serve.sse import DONE, EventStream, event
from slimlm.serve.state import ClientGone, ServeState, unless_disconnected


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them: content as one string (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


class ChatJob:
    def __init__(self, request: ChatCompletionRequest, state: ServeState):
        self.request = request
        self.state = state
        self.tokens = state.tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        messages = template_messages(request.messages)
        self.prompt_ids = self.tokens.check_prompt(
            self.tokens.chat_ids(messages, request.add_generation_prompt), "messages"
        )
        self.top_n = (request.top_logprobs or 0) if request.logprobs else None
        self.params = sampling_params(
            request,
            state,
            max_tokens=request.max_completion_tokens or request.max_tokens,
            logprobs=self.top_n,
            rename={"logprobs": "top_logprobs"},
        )
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def respond(self, http_request: Request) -> Response:
        group = self.state.engine.submit([(self.prompt_ids, self.params)], stream=self.request.stream)
        if self.request.stream:
            return EventStream(self._events(group), on_close=group.close)
        try:
            outputs = await unless_disconnected(http_request, group.final())
        except ClientGone:
            return Response(status_code=499)
        finally:
            group.close()
        return JSONResponse(self._whole(outputs[0]))

    def _head(self, kind: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }

    def _usage(self, out: RequestOutput) -> dict:
        prompt = len(out.prompt_token_ids)
        completion = sum(len(c.token_ids) for c in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self, out: RequestOutput) -> dict:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return {**self._head("chat.completion", choices), "usage": self._usage(out)}

    async def _events(self, group: RequestGroup) -> AsyncIterator[str]:
        include_usage = bool(self.request.stream_options and self.request.stream_options.include_usage)
        usage = {"usage": None} if include_usage else {}
        sent: dict[int, tuple[int, int]] = {}  # choice -> (characters, tokens) already sent
        last = None
        try:
            for index in range(self.request.n):
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                yield event({**self._head("chat.completion.chunk", [{**role, "finish_reason": None}]), **usage})
            async for _, out in group:
                last = out
                for c in out.outputs:
                    choice = self._delta(c, sent)
                    if choice is not None:
                        yield event({**self._head("chat.completion.chunk", [choice]), **usage})
            if include_usage and last is not None:
                yield event({**self._head("chat.completion.chunk", []), "usage": self._usage(last)})
        except Exception as e:  # this request's failure is this request's alone
            err = as_api_error(e)
            yield event(error_body(err.status, err.message, err.param))
        yield DONE

    def _delta(self, c: CompletionOutput, sent: dict[int, tuple[int, int]]) -> dict | None:
        chars, count = sent.get(c.index, (0, 0))
        text = c.text[chars:]
        new_ids = c.token_ids[count:]
        sent[c.index] = (len(c.text), len(c.token_ids))
        if not text and not new_ids and c.finish_reason is None:
            return None
        return {
            "index": c.index,
            "delta": {"content": text} if text else {},
            "logprobs": self._logprobs(new_ids, (c.logprobs or [])[count:]),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def _logprobs(self, ids: list[int], entries: list[dict[int, Logprob]] | None) -> dict | None:
        if self.top_n is None or entries is None:
            return None
        content = []
        for token_id, entry in zip(ids, entries, strict=False):
            chosen = entry.get(token_id)
            # The true top-N by rank (the chosen token comes first in the entry whatever its rank).
            top = sorted(
                (lp.rank, tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= self.top_n
            )
            content.append(
                {
                    **self._token(token_id, chosen),
                    "top_logprobs": [self._token(tid, lp) for _, tid, lp in top],
                }
            )
        return {"content": content}

    def _token(self, token_id: int, lp: Logprob | None) -> dict:
        text = token_string(self.tokens, token_id, lp)
        logprob = clamp(lp.logprob) if lp is not None else LOGPROB_FLOOR
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def create_chat_completion(request: ChatCompletionRequest, http_request: Request, state: ServeState) -> Response:
    state.check_model(request.model)
    return await ChatJob(request, state).respond(http_request)
