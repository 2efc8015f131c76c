"""A tiny random checkpoint with a real tokenizer, and live servers on it (uvicorn in a thread, free port)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn

from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.serve.app import build_app
from tests.conftest import SMALL_SHAPE

API_KEY = "test-key"
MODEL = "tiny"
ENGINE = dict(dtype="float32", max_model_len=256, num_kv_blocks=512)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from slimlm.data.tokenizer import train_tokenizer
    from slimlm.model.new_model import new_model

    text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 100
    tok = train_tokenizer([text], vocab_size=320)
    path = tmp_path_factory.mktemp("serve") / "tiny"
    overrides = {**SMALL_SHAPE, "vocab_size": len(tok)}
    new_model("smollm2-135m", path, num_layers=2, seed=3, dtype="float32", overrides=overrides, tokenizer=tok)
    return path


@dataclass
class LiveServer:
    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread
    app: object

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(30)


def start_server(
    model_path, api_key: str | None = None, max_queue: int | None = None, stream_interval: int = 1, **engine
) -> LiveServer:
    engine = Engine(EngineConfig(model=str(model_path), **{**ENGINE, **engine}))
    app = build_app(
        engine, served_model_name=MODEL, api_key=api_key, max_queue=max_queue, stream_interval=stream_interval
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread, app)


@contextlib.contextmanager
def running_server(model_path, **kwargs):
    live = start_server(model_path, **kwargs)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def server(tiny_model):
    """The shared server: API key on, no queue limit."""
    with running_server(tiny_model, api_key=API_KEY) as live:
        yield live


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def offline(tiny_model):
    from slimlm import LLM

    return LLM(str(tiny_model), **ENGINE)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
