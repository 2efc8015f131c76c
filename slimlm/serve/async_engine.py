"""The event loop's side of the engine: admission (429 past the queue limit) and per-request output streams.

Everything here runs on the event loop thread, so its bookkeeping needs no locks: the engine thread only
calls ``_deliver_threadsafe``, which hops onto the loop. Outputs are cumulative snapshots, so a stream
that a slow client drains late keeps only the newest one per request (coalescing, never a backlog).
"""

from __future__ import annotations

import asyncio
import itertools

from slimlm.engine.engine import Engine
from slimlm.outputs import RequestOutput
from slimlm.sampling_params import SamplingParams
from slimlm.serve.engine_loop import EngineLoop
from slimlm.serve.errors import APIError, EngineStopped, QueueFull
from slimlm.serve.metrics import ServerMetrics


class RequestGroup:
    """The engine requests of one HTTP request (one per prompt), iterated as ``(prompt index, output)``.

    At most one undelivered output is kept per request: a newer snapshot replaces it, so a stalled
    client costs one output's memory, not one per step.
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str]):
        self._owner = owner
        self.request_ids = request_ids
        self._pending: dict[int, RequestOutput] = {}
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self.finished: set[int] = set()

    def put(self, index: int, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            self._pending[index] = item
        self._wake.set()

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while True:
            if self._error is not None:
                raise self._error
            if self._pending:
                index = next(iter(self._pending))
                output = self._pending.pop(index)
                if output.finished:
                    self.finished.add(index)
                return index, output
            if len(self.finished) == len(self.request_ids):
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def final(self) -> list[RequestOutput]:
        """Each request's finished output, in prompt order."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self:
            last[index] = output
        return [last[i] for i in range(len(self.request_ids))]

    def close(self) -> None:
        """Release the requests; unfinished ones are aborted (their KV blocks freed). Idempotent."""
        self._owner._release(self)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, max_queue: int | None = None):
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_num_seqs = engine.config.max_num_seqs
        # Up to max_num_seqs requests run; max_queue more may wait; beyond that a request is refused.
        self.capacity = None if max_queue is None else self.max_num_seqs + max_queue
        self._thread = EngineLoop(engine, self._deliver_threadsafe, metrics)
        self._owners: dict[str, tuple[RequestGroup, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._thread.stop)
        self._dispatch([], {rid: EngineStopped("the server is shutting down") for rid in self._owners})

    @property
    def alive(self) -> bool:
        return self._loop is not None and self._thread.alive

    @property
    def num_in_flight(self) -> int:
        return len(self._owners)

    def submit(self, prompts: list[tuple[list[int], SamplingParams]]) -> RequestGroup:
        if not self.alive:
            raise EngineStopped("the engine is not running")
        if self.capacity is not None and len(prompts) > self.capacity:
            raise APIError(400, f"{len(prompts)} prompts in one request exceed the server's limit of {self.capacity}")
        if self.capacity is not None and len(self._owners) + len(prompts) > self.capacity:
            raise QueueFull(f"the server is at its limit of {self.capacity} requests in flight; retry later")
        base = f"r{next(self._ids)}"
        group = RequestGroup(self, [f"{base}-{i}" for i in range(len(prompts))])
        for index, (request_id, (token_ids, params)) in enumerate(zip(group.request_ids, prompts, strict=True)):
            self._owners[request_id] = (group, index)
            self._thread.add(request_id, token_ids, params)
        return group

    def _release(self, group: RequestGroup) -> None:
        for index, request_id in enumerate(group.request_ids):
            if self._owners.pop(request_id, None) is not None and index not in group.finished:
                self._thread.abort(request_id)

    def _deliver_threadsafe(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        self._loop.call_soon_threadsafe(self._dispatch, outputs, errors)

    def _dispatch(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        for output in outputs:
            owner = self._owners.get(output.request_id)
            if owner is not None:
                owner[0].put(owner[1], output)
        for request_id, error in errors.items():
            owner = self._owners.get(request_id)
            if owner is not None:
                owner[0].put(owner[1], error)
