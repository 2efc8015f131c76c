"""``build_app(engine)``: the OpenAI-compatible FastAPI app around one engine (run it with uvicorn)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import slimlm
from slimlm.engine.engine import Engine
from slimlm.serve.async_engine import AsyncEngine
from slimlm.serve.errors import install_error_handlers
from slimlm.serve.metrics import ServerMetrics
from slimlm.serve.middleware import APIKeyMiddleware, StatusMetricsMiddleware
from slimlm.serve.routes import ROUTES, router
from slimlm.serve.state import ServeState
from slimlm.serve.tokens import Tokens


def build_app(
    engine: Engine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int | None = None,
    stream_interval: int = 1,
    engine_thread: bool = True,
) -> FastAPI:
    """The app takes the engine over: from startup to shutdown only its engine thread touches it.

    ``max_queue``: requests allowed to wait beyond the engine's ``max_num_seqs`` (None: no limit); past it,
    429. ``api_key``: required as ``Authorization: Bearer KEY`` on every route but /health.
    ``stream_interval``: tokens per streamed chunk after the first (1: every token as it comes).
    ``engine_thread=False``: the caller runs the engine's loop itself, on the thread that loaded the model
    (``app.state.serve.engine.run_engine_loop()``, see ``slimlm.serve.engine_loop``).
    """
    metrics = ServerMetrics()
    frontend = AsyncEngine(engine, metrics, max_queue, stream_interval, engine_thread)
    state = ServeState(
        engine=frontend,
        tokens=Tokens(engine.tokenizer, engine.model_config.vocab_size, engine.max_model_len),
        metrics=metrics,
        model_name=served_model_name or engine.config.model,
        model_path=engine.config.model,
        max_model_len=engine.max_model_len,
        defaults=engine.default_sampling_params(),
        eos_token_ids=tuple(engine.eos_token_ids),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        frontend.start()
        try:
            yield
        finally:
            # uvicorn calls this after draining in-flight requests (SIGTERM's graceful shutdown).
            await frontend.stop()

    app = FastAPI(title="slimlm", version=getattr(slimlm, "__version__", "0"), lifespan=lifespan)
    app.state.serve = state
    install_error_handlers(app)
    app.include_router(router)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(StatusMetricsMiddleware, metrics=metrics, routes=ROUTES)  # outermost: 401s count too
    return app
