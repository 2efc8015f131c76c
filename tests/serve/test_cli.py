"""``slimlm serve`` as a process: SIGTERM lets the request in flight finish, then the server exits cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.serve.conftest import wait_until

LAUNCH = (
    "import argparse, sys\n"
    "from slimlm.serve.cli import register\n"
    "parser = argparse.ArgumentParser()\n"
    "register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_sigterm_drains_the_stream_in_flight_then_exits(tiny_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["serve", str(tiny_model), "--port", str(port), "--dtype", "float32", "--max-model-len", "256"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: healthy(url) or proc.poll() is not None, timeout=120) and proc.poll() is None
        body = {"prompt": "The quick", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once shut down, so the exit status says "terminated by SIGTERM".
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log.seek(0)
        assert "Application shutdown complete" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
