"""``slimlm serve MODEL``: argument parsing and start-up; the server itself is :mod:`slimlm.serve.app`.

FastAPI and uvicorn are imported only when the command runs, so building the ``slimlm`` parser stays cheap.
"""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    from slimlm.cli import _engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    p.add_argument("model", help="checkpoint directory or Hugging Face hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("SLIMLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $SLIMLM_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="requests that may wait beyond --max-num-seqs; more get 429 (default: no limit)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="streamed chunks carry this many tokens after the first (default 1: each token as it comes); "
        "larger values cost the server and its clients less CPU per token",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    import signal
    import threading

    import torch
    import uvicorn

    from slimlm.cli import _engine_kwargs
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import Engine
    from slimlm.serve.app import build_app

    if a.max_queue is not None and a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
    if a.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1, got {a.stream_interval}")
    config = EngineConfig(model=str(a.model), **_engine_kwargs(a))
    torch.manual_seed(config.seed)
    engine = Engine(config)
    app = build_app(engine, a.served_model_name, a.api_key, a.max_queue, a.stream_interval, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level))
    # The engine steps on this thread, the one that loaded it (one OpenMP pool: see slimlm.serve.engine_loop);
    # HTTP is served from a second thread. SIGTERM/SIGINT reach only this thread, so it hands them to
    # uvicorn's own handler: stop accepting, let in-flight requests finish, then the app's lifespan stops
    # the engine's loop here.
    http = threading.Thread(target=server.run, name="slimlm-http")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http.start()
    while not server.started:
        if not http.is_alive():  # e.g. the port is taken: uvicorn has logged why
            return 1
        http.join(0.05)
    app.state.serve.engine.run_engine_loop()
    http.join()
    return 0
