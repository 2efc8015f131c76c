"""/metrics in Prometheus format, and ``slimlm bench serve`` against the live server."""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimlm.bench.serve import ServeBenchConfig, format_report, register, run_serve_bench
from tests.serve.conftest import API_KEY, MODEL

NAMES = [
    "slimlm_http_requests",
    "slimlm_request_finished",
    "slimlm_prompt_tokens",
    "slimlm_generation_tokens",
    "slimlm_time_to_first_token_seconds",
    "slimlm_inter_token_latency_seconds",
    "slimlm_e2e_request_latency_seconds",
    "slimlm_num_requests_waiting",
    "slimlm_num_requests_running",
    "slimlm_kv_cache_usage_perc",
    "slimlm_prefix_cache_hit_rate",
    "slimlm_prefix_cache_queries",
    "slimlm_prefix_cache_hits",
]


def scrape(http) -> dict[str, dict]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


def value(families, family, sample=None, **labels) -> float:
    return families[family].get((sample or family, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_and_tokens(client, http):
    before = scrape(http)
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full KV blocks: a prefix-cache hit
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    after = scrape(http)
    assert set(NAMES) <= set(after)
    gen = "slimlm_generation_tokens"
    assert value(after, gen, gen + "_total") - value(before, gen, gen + "_total") == 10
    finished = "slimlm_request_finished"
    delta = value(after, finished, finished + "_total", finish_reason="length") - value(
        before, finished, finished + "_total", finish_reason="length"
    )
    assert delta == 2
    http_ok = value(after, "slimlm_http_requests", "slimlm_http_requests_total", route="/v1/completions", status="200")
    assert http_ok >= 2
    ttft = "slimlm_time_to_first_token_seconds"
    assert value(after, ttft, ttft + "_count") - value(before, ttft, ttft + "_count") == 2
    hits = "slimlm_prefix_cache_hits"
    assert value(after, hits, hits + "_total") > value(before, hits, hits + "_total")
    assert 0 < value(after, "slimlm_prefix_cache_hit_rate") <= 1
    assert value(after, "slimlm_num_requests_running") == 0


def test_bench_serve_reports_vllm_metrics(server):
    config = ServeBenchConfig(
        url=server.url,
        num_prompts=8,
        input_len=16,
        output_len=6,
        request_rate=200.0,
        max_concurrency=4,
        goodput={"ttft": 1e7, "tpot": 1e7},
        api_key=API_KEY,
        progress=False,
    )
    report = run_serve_bench(config)
    assert report["completed"] == 8 and report["failed"] == 0, report["errors"]
    assert report["total_output_tokens"] == 48 and report["total_input_tokens"] == 128
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(report[key]) == {"mean", "median", "p99"}
        assert report[key]["mean"] > 0
    assert report["e2el_ms"]["mean"] >= report["ttft_ms"]["mean"]
    assert report["request_goodput"] == report["request_throughput"]


def test_bench_serve_command_line(server, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--url", server.url, "--api-key", API_KEY, "--num-prompts", "3", "--input-len", "8"]
        + ["--output-len", "3", "--dataset", "corpus", "--goodput", "e2el:0", "--json"]
    )
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 3 and report["total_output_tokens"] == 9
    assert report["request_goodput"] == 0


def test_bench_serve_compares_with_the_offline_engine_round_by_round(server, tiny_model):
    config = ServeBenchConfig(
        url=server.url,
        num_prompts=4,
        input_len=8,
        output_len=5,
        max_concurrency=2,
        api_key=API_KEY,
        offline_baseline=str(tiny_model),
        rounds=2,
        progress=False,
    )
    report = run_serve_bench(config)
    c = report["offline_comparison"]
    assert c["concurrency"] == 2
    assert len(c["server_output_tok_s_runs"]) == len(c["offline_output_tok_s_runs"]) == 2
    assert report["output_throughput_runs"] == c["server_output_tok_s_runs"]
    assert report["output_throughput"] in c["server_output_tok_s_runs"]
    assert c["server_over_offline"] == pytest.approx(c["server_output_tok_s"] / c["offline_output_tok_s"])
    assert report["completed"] == 4 and report["total_output_tokens"] == 20
    assert "Server / offline:" in format_report(report)


def test_bench_serve_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        ServeBenchConfig(url="http://127.0.0.1:1", rounds=0)
