"""The engine's loop: once the server runs, the only code that touches the ``Engine``.

The engine is not thread-safe and one step can take tens of milliseconds, so it cannot run on the event
loop. Handlers send commands through a thread-safe queue, picked up between steps; each step's outputs
go back in a single ``deliver`` call (the frontend hops to its event loop once per step, not once per
request). The loop blocks on the queue when there is nothing to run, so an idle server costs nothing.

``start`` runs the loop on a thread of its own; ``run`` runs it on the calling thread, which should be the
thread that loaded the model when it can (``slimlm serve`` does this): OpenMP keeps one worker pool per
thread that opens parallel regions, and with two pools on a 2-core machine libgomp counts more threads
than cores and stops spin-waiting, so every parallel region waits for a sleeping worker. Measured on
py-target at 16 sequences: the same engine 25% slower stepped from a second thread (silu_and_mul at
16 x 1024: 15 us on the loading thread, 63 us on another).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from slimlm.engine.engine import Engine
from slimlm.outputs import RequestOutput
from slimlm.sampling_params import SamplingParams
from slimlm.serve.errors import EngineStopped
from slimlm.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# outputs of one step, and errors of individual requests (request id -> exception)
Deliver = Callable[[list[RequestOutput], dict[str, BaseException]], None]


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class EngineLoop:
    def __init__(self, engine: Engine, deliver: Deliver, metrics: ServerMetrics | None = None):
        self.engine = engine
        self._deliver = deliver
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self.run, name="slimlm-engine", daemon=True)
        self._running = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None

    # ---- called from other threads -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._commands.put(_Add(request_id, prompt_token_ids, params, time.monotonic()))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop(self, timeout: float | None = None) -> None:
        """Ends the loop after the commands already queued; waits for it unless called from the loop itself."""
        self._commands.put(_STOP)
        if self._running.is_set() and threading.current_thread() is not self._loop_thread:
            self._done.wait(timeout)

    @property
    def alive(self) -> bool:
        """Running or about to: started, or to be run by its owner (``run``), and not ended."""
        return not self._done.is_set() and self.error is None

    def run(self) -> None:
        """The loop, on the calling thread, until ``stop``."""
        self._loop_thread = threading.current_thread()
        self._running.set()
        try:
            self._run()
        finally:
            self._done.set()

    # ---- the engine thread ---------------------------------------------------------------------------

    _loop_thread: threading.Thread | None = None

    def _run(self) -> None:
        wait: float | None = None
        try:
            while self._handle_commands(wait):
                steps = self.engine.stats.steps
                if self.engine.has_unfinished_requests():
                    self._step()
                if self.metrics is not None:
                    self.metrics.record_engine(self.engine)
                # Nothing to run: sleep on the queue. Requests that could not be scheduled: do not spin.
                if not self.engine.has_unfinished_requests():
                    wait = None
                else:
                    wait = 0.0 if self.engine.stats.steps != steps else 0.005
        except BaseException as e:  # a bug in the loop itself: fail what is in flight, never hang clients
            logger.exception("the engine loop stopped")
            self.error = e
        finally:
            self._fail_all(EngineStopped("the server is shutting down"))

    def _handle_commands(self, wait: float | None) -> bool:
        """Apply the queued commands (waiting up to ``wait`` seconds for one; None: until one comes)."""
        outputs: list[RequestOutput] = []
        errors: dict[str, BaseException] = {}
        running = True
        try:
            command = self._commands.get(timeout=wait) if wait != 0.0 else self._commands.get_nowait()
            while True:
                if command is _STOP:
                    running = False
                elif isinstance(command, _Add):
                    self._add(command, errors)
                elif isinstance(command, _Abort):
                    self._abort(command, outputs)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if outputs or errors:
            self._publish(outputs, errors)
        return running

    def _add(self, command: _Add, errors: dict[str, BaseException]) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as e:  # reported to that request alone
            errors[command.request_id] = e
            return
        if self.metrics is not None:
            self.metrics.request_added(command.request_id, command.arrival)

    def _abort(self, command: _Abort, outputs: list[RequestOutput]) -> None:
        try:
            output = self.engine.abort_request(command.request_id)
        except Exception:
            logger.exception("could not abort request %s", command.request_id)
            return
        if output is not None:
            outputs.append(output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # The batch's state is unknown after a failed step: end every request rather than compute on it.
            logger.exception("engine step failed; aborting the requests in flight")
            self._fail_all(e)
            return
        self._publish(outputs, {})

    def _publish(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        if self.metrics is not None:
            self.metrics.record_outputs(outputs, errors, time.monotonic())
        try:
            self._deliver(outputs, errors)
        except Exception:  # e.g. the event loop has closed: nobody is left to tell
            logger.exception("could not deliver engine outputs")

    def _fail_all(self, error: BaseException) -> None:
        ids = list(self.engine.requests)
        for request_id in ids:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort request %s", request_id)
        if ids:
            self._publish([], {request_id: error for request_id in ids})
