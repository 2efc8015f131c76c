"""The event loop's side of the engine: admission (429 past the queue limit) and per-request output streams.

Everything here runs on the event loop thread, so its bookkeeping needs no locks: the engine thread only
calls ``_deliver_threadsafe``, which hops onto the loop. Outputs are cumulative snapshots, so a stream
that a slow client drains late keeps only the newest one per request (coalescing, never a backlog).

For the same reason the engine thread may skip snapshots before the hop (``_Cadence``): a whole
(non-streamed) response needs only its final output, and a stream with ``stream_interval`` N needs one
every N tokens (vLLM's ``--stream-interval``). Each snapshot the loop handles costs it a wake-up, a JSON
chunk and a socket write, on the same cores as the engine.
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


class _Cadence:
    """Which snapshots reach the loop. Written by the loop (``expect``, ``forget``) and read by the engine
    thread (``wanted``): single dict operations, atomic under the GIL, and a request is registered before
    its add command is queued, so the engine thread never sees outputs of a request it does not know."""

    def __init__(self):
        self._every: dict[str, int | None] = {}  # request id -> tokens between snapshots; None: final only
        self._sent: dict[str, int] = {}  # request id -> tokens in the last snapshot let through (engine thread)

    def expect(self, request_id: str, every: int | None) -> None:
        self._every[request_id] = every

    def forget(self, request_id: str) -> None:
        self._every.pop(request_id, None)

    def wanted(self, output: RequestOutput) -> bool:
        rid = output.request_id
        every = self._every.get(rid, 1)  # unknown (already released): let it through, the loop drops it
        if output.finished:
            self._sent.pop(rid, None)
            return True
        if every == 1:
            return True
        if every is None:
            return False
        tokens = sum(len(c.token_ids) for c in output.outputs)
        sent = self._sent.get(rid, 0)
        # The first tokens go at once (time to first token); then every `every` tokens.
        if tokens > sent and (sent == 0 or tokens - sent >= every):
            self._sent[rid] = tokens
            return True
        return False


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics | None = None,
        max_queue: int | None = None,
        stream_interval: int = 1,
        engine_thread: bool = True,
    ):
        """``engine_thread=False``: ``start`` does not start the engine's loop; the owner runs it on a
        thread of its choice with ``run_engine_loop`` (see ``slimlm.serve.engine_loop`` for why)."""
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval
        self._cadence = _Cadence()
        self.max_num_seqs = engine.config.max_num_seqs
        # Up to max_num_seqs requests run; max_queue more may wait; beyond that a request is refused.
        self.capacity = None if max_queue is None else self.max_num_seqs + max_queue
        self._engine_loop = EngineLoop(engine, self._deliver_threadsafe, metrics)
        self._engine_thread = engine_thread
        self._owners: dict[str, tuple[RequestGroup, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._engine_thread:
            self._engine_loop.start()

    def run_engine_loop(self) -> None:
        """Runs the engine's loop on the calling thread until the server stops it (``engine_thread=False``)."""
        self._engine_loop.run()

    async def stop(self) -> None:
        await asyncio.to_thread(self._engine_loop.stop)
        self._dispatch([], {rid: EngineStopped("the server is shutting down") for rid in self._owners})

    @property
    def alive(self) -> bool:
        return self._loop is not None and self._engine_loop.alive

    @property
    def num_in_flight(self) -> int:
        return len(self._owners)

    def submit(self, prompts: list[tuple[list[int], SamplingParams]], stream: bool = True) -> RequestGroup:
        """Starts the prompts' requests. ``stream=False``: only each request's final output is delivered."""
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
            self._cadence.expect(request_id, self.stream_interval if stream else None)
            self._engine_loop.add(request_id, token_ids, params)
        return group

    def _release(self, group: RequestGroup) -> None:
        for index, request_id in enumerate(group.request_ids):
            self._cadence.forget(request_id)
            if self._owners.pop(request_id, None) is not None and index not in group.finished:
                self._engine_loop.abort(request_id)

    def _deliver_threadsafe(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        wanted = self._cadence.wanted
        outputs = [output for output in outputs if wanted(output)]
        if outputs or errors:
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
