"""What reaches the event loop: every N tokens of a stream (``--stream-interval``), only the end of a whole
response; the text and tokens a client receives are the same either way."""

from __future__ import annotations

import json

import httpx
import pytest

from slimlm import SamplingParams
from slimlm.outputs import CompletionOutput, RequestOutput
from slimlm.serve.async_engine import _Cadence
from tests.serve.conftest import MODEL, running_server


def _stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_sends_the_first_token_then_every_n(tiny_model, offline, interval):
    params = dict(model=MODEL, prompt="The quick brown", max_tokens=14, temperature=0, ignore_eos=True, logprobs=0)
    ref = offline.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    with running_server(tiny_model, stream_interval=interval) as live:
        chunks = _stream(live.url, params)
        whole = httpx.post(f"{live.url}/v1/completions", json=params, timeout=60).json()
    tokens_per_chunk = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
    # The first token at once, then at least `interval` at a time (a client that reads late gets more: the
    # loop keeps only the newest snapshot), the rest with the finish. The exact cadence: the test below.
    assert sum(tokens_per_chunk) == 14 and len(chunks) <= 2 + 13 // interval
    assert all(n >= interval for n in tokens_per_chunk[1:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref[0].outputs[0].text == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _output(rid: str, tokens: int, finished: bool = False) -> RequestOutput:
    done = CompletionOutput(0, "", list(range(tokens)), None, None, "length" if finished else None)
    return RequestOutput(rid, None, [], [done], finished)


def test_cadence_lets_through_the_first_tokens_every_nth_and_the_end():
    c = _Cadence()
    c.expect("s", 3)
    c.expect("w", None)  # a whole response: only its end
    got = {rid: [n for n in range(1, 11) if c.wanted(_output(rid, n, finished=n == 10))] for rid in ("s", "w")}
    assert got == {"s": [1, 4, 7, 10], "w": [10]}
    # A request the loop no longer knows (released) passes: the loop drops it itself.
    assert c.wanted(_output("gone", 2))
    # Several tokens at once (speculative decoding) count as they come: 1, then 1 + 5 >= 1 + 3.
    c.expect("spec", 3)
    assert [c.wanted(_output("spec", n)) for n in (1, 2, 6, 7, 9)] == [True, False, True, False, True]
