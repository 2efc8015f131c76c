"""What the route handlers share: the engine's frontend, the tokenizer copy and the server's fixed facts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from slimlm.sampling_params import SamplingParams
from slimlm.serve.async_engine import AsyncEngine
from slimlm.serve.errors import APIError
from slimlm.serve.metrics import ServerMetrics
from slimlm.serve.tokens import Tokens

T = TypeVar("T")


@dataclass
class ServeState:
    engine: AsyncEngine
    tokens: Tokens
    metrics: ServerMetrics
    model_name: str
    model_path: str
    max_model_len: int
    defaults: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.", "model")


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client hangs up first (its ``finally`` then aborts the request):
    a non-streaming request would otherwise keep generating for nobody."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientGone()
