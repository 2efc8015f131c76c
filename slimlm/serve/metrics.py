"""Prometheus metrics of one server, in a registry of its own (two apps in a process never mix counts).

Names and meanings follow vLLM's where one exists (``slimlm_`` for ``vllm:``). Request timings are taken
in the engine thread, when a step's outputs exist, so they do not include the client's read speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from slimlm.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class _Timing:
    arrival: float
    last_token: float | None = None
    tokens: int = 0


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_responses = Counter(
            "slimlm_http_requests", "HTTP responses by route and status code", ["route", "status"], registry=r
        )
        self.requests_finished = Counter(
            "slimlm_request_finished", "Engine requests finished, by finish reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("slimlm_prompt_tokens", "Prompt tokens of the requests served", registry=r)
        self.generation_tokens = Counter("slimlm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "slimlm_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "slimlm_inter_token_latency_seconds", "Time between a request's steps", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "slimlm_e2e_request_latency_seconds", "Arrival to the last token", buckets=_E2E_BUCKETS, registry=r
        )
        self.waiting = Gauge("slimlm_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("slimlm_num_requests_running", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge("slimlm_kv_cache_usage_perc", "KV cache blocks in use (1 = 100%)", registry=r)
        self.prefix_hit_rate = Gauge(
            "slimlm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up (0-1)", registry=r
        )
        self.prefix_queries = Counter("slimlm_prefix_cache_queries", "Prompt tokens looked up", registry=r)
        self.prefix_hits = Counter("slimlm_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self._timings: dict[str, _Timing] = {}  # engine thread only
        self._prefix_seen = (0, 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- engine thread -------------------------------------------------------------------------------

    def request_added(self, request_id: str, arrival: float) -> None:
        self._timings[request_id] = _Timing(arrival)

    def record_outputs(self, outputs: list[RequestOutput], errors: dict, now: float) -> None:
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue
            tokens = sum(len(c.token_ids) for c in out.outputs)
            if tokens > timing.tokens:
                if timing.last_token is None:
                    self.ttft.observe(now - timing.arrival)
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                else:
                    self.itl.observe(now - timing.last_token)
                self.generation_tokens.inc(tokens - timing.tokens)
                timing.tokens, timing.last_token = tokens, now
            if out.finished:
                del self._timings[out.request_id]
                self.e2e.observe(now - timing.arrival)
                self.requests_finished.labels(out.outputs[0].finish_reason or "unknown").inc()
        for request_id in errors:
            self._timings.pop(request_id, None)
            self.requests_finished.labels("error").inc()

    def record_engine(self, engine) -> None:
        self.waiting.set(len(engine.scheduler.waiting))
        self.running.set(len(engine.scheduler.running))
        blocks = engine.block_manager
        self.kv_usage.set(blocks.usage)
        stats = blocks.stats
        self.prefix_hit_rate.set(stats.hit_rate)
        queried, hits = self._prefix_seen
        if stats.queried_tokens > queried:
            self.prefix_queries.inc(stats.queried_tokens - queried)
        if stats.hit_tokens > hits:
            self.prefix_hits.inc(stats.hit_tokens - hits)
        self._prefix_seen = (stats.queried_tokens, stats.hit_tokens)

    # ---- event loop ----------------------------------------------------------------------------------

    def http_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()
