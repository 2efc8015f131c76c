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
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from slimlm.cli import _engine_kwargs
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import Engine
    from slimlm.serve.app import build_app

    if a.max_queue is not None and a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
    config = EngineConfig(model=str(a.model), **_engine_kwargs(a))
    torch.manual_seed(config.seed)
    engine = Engine(config)
    app = build_app(engine, a.served_model_name, a.api_key, a.max_queue)
    # uvicorn's SIGTERM/SIGINT handling is the graceful shutdown: stop accepting, let in-flight requests
    # finish, then the app's lifespan stops the engine thread.
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0
