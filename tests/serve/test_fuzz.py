"""Schema-driven fuzzing: whatever schemathesis derives from the server's own OpenAPI document, no 5xx.

(``schemathesis.pytest.from_fixture`` does not run under pytest 9, so the strategy is driven by hypothesis
directly: one test, valid and invalid cases across every operation.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.serve.conftest import running_server


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    # Short contexts and few sequences: a fuzzed max_tokens or n then costs milliseconds, not seconds.
    with running_server(tiny_model, max_model_len=48, max_num_seqs=4, num_kv_blocks=32) as live:
        yield live


def test_fuzzed_requests_never_get_a_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[str, set[int]] = {}

    @given(case=cases)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(base_url=fuzz_server.url, timeout=30)
        seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text[:500]}"

    check()
    assert fuzz_server.app.state.serve.engine.alive
    assert len(seen) >= 6, seen  # the fuzzer reached the routes, not just one
