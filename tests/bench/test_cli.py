"""The CLI commands run end to end on a tiny checkpoint and report sane numbers as JSON."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from tests.conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json(tiny, capsys):
    out = run_json(
        capsys,
        "generate",
        str(tiny),
        "--prompt",
        "def f(",
        "--max-tokens",
        "7",
        "--ignore-eos",
        "--json",
        "--max-model-len",
        "256",
    )
    result = out["results"][0]
    assert len(result["outputs"][0]["token_ids"]) == 7
    assert result["outputs"][0]["finish_reason"] == "length"
    assert out["output_tok_s"] > 0


def test_bench_throughput_json(tiny, capsys):
    r = run_json(
        capsys,
        "bench",
        "throughput",
        str(tiny),
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--concurrency",
        "4",
        "--repeats",
        "1",
        "--rss-requests",
        "5",
        "--json",
        "--max-model-len",
        "256",
    )
    assert r["decode_batch1_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["concurrent_output_tok_s"] > 0 and r["read_bandwidth_gb_s"] > 0
    assert 0 < r["bandwidth_fraction"]
    assert r["ttft_s"]["p50"] > 0 and r["tpot_s"]["p95"] > 0
    assert r["sequential_rss"]["requests"] == 5
    bound = r["concurrent_compute_bound"]
    assert bound["gemm_gflops"] > 0 and bound["output_tok_s"] == pytest.approx(
        bound["gemm_gflops"] * 1e9 / bound["flops_per_output_token"]
    )
    assert bound["over_batch1"] == pytest.approx(bound["output_tok_s"] / r["decode_batch1_tok_s"])


def test_bench_step_json(tiny, capsys):
    r = run_json(capsys, "bench", "step", str(tiny), "--steps", "20", "--json", "--max-model-len", "256")
    assert r["steps"] == 20 and r["step_ms_median"] > 0
    assert set(r["phase_ms_mean"]) == {"schedule", "model", "sample", "postprocess"}


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_concurrent_flops_count_prefill_body_head_and_attention():
    from slimlm.bench.compute import concurrent_flops_per_output_token

    # 10 prompt + 5 output tokens through 100 body weights; 7 head weights for the 5 outputs only;
    # attention: 2 layers x width 3, context 15 -> 2 * 2 * 3 * 15 * 16 FLOPs.
    flops = concurrent_flops_per_output_token(100, 7, 2, 3, 10, 5)
    assert flops == pytest.approx((2 * 100 * 15 + 2 * 7 * 5 + 2 * 2 * 3 * 15 * 16) / 5)


def test_bench_compare_interleaves_models_and_reports_ratios_to_the_first(tiny, tmp_path, capsys):
    small = tiny_checkpoint(tmp_path / "one-layer", num_layers=1)
    r = run_json(
        capsys,
        "bench",
        "compare",
        str(tiny),
        str(small),
        "--concurrency",
        "1",
        "3",
        "--output-len",
        "5",
        "--rounds",
        "2",
        "--json",
    )
    assert r["base"] == str(tiny)
    assert [(row["model"], row["concurrency"]) for row in r["rows"]] == [
        (str(tiny), 1),
        (str(small), 1),
        (str(tiny), 3),
        (str(small), 3),
    ]
    for row in r["rows"]:
        assert len(row["decode_runs"]) == len(row["output_runs"]) == 2
        assert row["decode_tok_s"] > 0 and row["output_tok_s"] > 0
        if row["model"] == str(tiny):
            assert row["decode_vs_base"] == row["output_vs_base"] == 1.0
    assert r["size_vs_base"][str(tiny)] == 1.0
    assert 0 < r["size_vs_base"][str(small)] < 1.0  # one layer instead of two
