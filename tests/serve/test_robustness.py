"""Bad input, hung-up clients, overload and shutdown: 4xx for the caller, nobody else affected.

A "gate" on the engine's step makes the timing-sensitive cases deterministic: with it closed the engine
thread blocks before its next step, so a request is provably still in flight.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from slimlm.serve import completions
from tests.serve.conftest import API_KEY, MODEL, running_server, start_server, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Gate:
    """Patch ``engine.step`` so that it runs only while the gate is open."""

    def __init__(self, engine, monkeypatch):
        self.open_ = threading.Event()
        self.open_.set()
        step = engine.step

        def gated_step():
            self.open_.wait()
            return step()

        monkeypatch.setattr(engine, "step", gated_step)

    def close(self):
        self.open_.clear()

    def open(self):
        self.open_.set()


def in_flight(live) -> int:
    return live.app.state.serve.engine.num_in_flight


def all_blocks_free(engine) -> bool:
    return not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def aborted(live) -> float:
    return live.app.state.serve.metrics.requests_finished.labels("abort")._value.get()


def raw_request(url: str, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a request and leave the connection open without reading: a client that may hang up later."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(payload)}", "", ""]
    sock.sendall("\r\n".join(lines).encode() + payload)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, str]:
    """Status and body of a (non-chunked) HTTP/1.1 reply."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body.decode()


MALFORMED = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 3000}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 10**6}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 100}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-4]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 9}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, "seed"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 100}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
]


@pytest.mark.parametrize("path, body, param", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_get_an_openai_400(http, path, body, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_server_still_serves_after_bad_requests(client):
    for _ in range(2):
        out = client.completions.create(model=MODEL, prompt="The quick", max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason == "length"


def test_api_key_required_except_health(server):
    with httpx.Client(base_url=server.url) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models", headers=AUTH).status_code == 200


def test_closing_a_stream_aborts_it_and_frees_its_blocks(server, client, monkeypatch):
    gate = Gate(server.engine, monkeypatch)
    before = aborted(server)
    stream = client.completions.create(
        model=MODEL, prompt="The quick", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    try:
        next(iter(stream))  # generation has started
        gate.close()
        stream.close()
        assert wait_until(lambda: in_flight(server) == 0)  # the server saw the hang-up
    finally:
        gate.open()
    assert wait_until(lambda: all_blocks_free(server.engine))
    assert wait_until(lambda: aborted(server) == before + 1)


def test_hanging_up_a_whole_request_aborts_it(server, monkeypatch):
    gate = Gate(server.engine, monkeypatch)
    gate.close()
    before = aborted(server)
    try:
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 200, "ignore_eos": True}
        sock = raw_request(server.url, "/v1/completions", body, AUTH)
        assert wait_until(lambda: in_flight(server) == 1)
        sock.close()
        assert wait_until(lambda: in_flight(server) == 0)
    finally:
        gate.open()
    assert wait_until(lambda: all_blocks_free(server.engine))
    assert wait_until(lambda: aborted(server) == before + 1)


def test_a_failing_request_fails_alone(server, client, http, monkeypatch):
    real = completions.CompletionJob._choice

    def broken(self, *args):
        if self.request.user == "boom":
            raise RuntimeError("simulated bug")
        return real(self, *args)

    monkeypatch.setattr(completions.CompletionJob, "_choice", broken)
    gate = Gate(server.engine, monkeypatch)
    gate.close()
    try:
        good = client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, temperature=0, stream=True)
        bad = raw_request(server.url, "/v1/completions", {"prompt": "The quick", "user": "boom"}, AUTH)
        assert wait_until(lambda: in_flight(server) == 2)
    finally:
        gate.open()
    status, reply = read_reply(bad)
    bad.close()
    assert status == 500 and json.loads(reply)["error"]["type"] == "server_error"
    r = http.post("/v1/completions", json={"prompt": "x", "user": "boom", "stream": True})
    assert r.status_code == 200 and '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert (
        "".join(c.choices[0].text for c in good)
        == client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, temperature=0).choices[0].text
    )


def test_full_queue_gets_429(tiny_model, monkeypatch):
    with running_server(tiny_model, max_queue=1, max_num_seqs=1) as live, httpx.Client(base_url=live.url) as c:
        gate = Gate(live.engine, monkeypatch)
        gate.close()
        socks = []
        try:
            for _ in range(2):  # one running, one waiting
                socks.append(raw_request(live.url, "/v1/completions", {"prompt": "hi", "max_tokens": 50}))
            assert wait_until(lambda: in_flight(live) == 2)
            r = c.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            # more prompts in one request than could ever be admitted: the request's fault, not the load's
            assert c.post("/v1/completions", json={"prompt": ["a", "b", "c"]}).status_code == 400
        finally:
            for sock in socks:
                sock.close()
            gate.open()
        assert wait_until(lambda: in_flight(live) == 0)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_shutdown_finishes_in_flight_streams_and_refuses_new_ones(tiny_model, monkeypatch):
    live = start_server(tiny_model)
    gate = Gate(live.engine, monkeypatch)
    host, port = live.url.removeprefix("http://").split(":")
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            body = {"prompt": "The quick", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line)
                gate.close()
                live.server.should_exit = True  # uvicorn's SIGTERM handler does exactly this

                def refused():
                    try:
                        socket.create_connection((host, int(port)), timeout=1).close()
                        return False
                    except OSError:
                        return True

                assert wait_until(refused)
                gate.open()
                rest = [line for line in lines if line]
        chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        live.thread.join(30)
        assert not live.thread.is_alive()
    finally:
        gate.open()
        live.stop()
