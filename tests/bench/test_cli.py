"""The CLI commands run end to end on a tiny checkpoint and report sane numbers as JSON."""

from __future__ import annotations

import json
import statistics

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
        "2",
        "--rss-requests",
        "5",
        "--json",
        "--max-model-len",
        "256",
    )
    assert r["decode_batch1_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["concurrent_output_tok_s"] > 0 and r["read_bandwidth_gb_s"] > 0
    # The concurrent figure is the median of one run per repeat, as batch-1 decode is.
    assert len(r["concurrent_runs"]) == len(r["decode_batch1_runs"]) == 2
    assert r["concurrent_output_tok_s"] == pytest.approx(statistics.median(r["concurrent_runs"]))
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


def test_demo_table_scores_every_variant_against_the_base(tiny, tmp_path, capsys):
    from slimlm.data.corpus import load_text
    from slimlm.eval import kl_divergence
    from slimlm.eval.perplexity import tokenize
    from slimlm.model.loader import load_model

    work = tmp_path / "variants"
    r = run_json(
        capsys,
        "demo",
        "--model",
        str(tiny),
        "--methods",
        "rtn-w8",
        "nf4",
        "--eval-tokens",
        "1024",
        "--calib-tokens",
        "512",
        "--rounds",
        "1",
        "--work-dir",
        str(work),
        "--out",
        str(tmp_path / "tradeoff.json"),
        "--json",
    )
    rows = {row["label"]: row for row in r["rows"]}
    assert list(rows) == ["base", "rtn-w8", "nf4"]
    assert rows["base"]["kl_div"] == 0.0 and rows["base"]["speed_x"] == rows["base"]["memory_x"] == 1.0
    assert json.loads((tmp_path / "tradeoff.json").read_text())["rows"] == r["rows"]
    base = load_model(tiny, dtype="float32")
    ids = tokenize(base.tokenizer, load_text("stdlib-test"))
    for label in ("rtn-w8", "nf4"):
        alone = kl_divergence(load_model(work / label, dtype="float32").model, base.model, ids, 1024, max_tokens=1024)
        assert rows[label]["kl_div"] == pytest.approx(alone.kl_div, rel=1e-6) and alone.kl_div > 0
        assert rows[label]["perplexity"] == pytest.approx(alone.perplexity, rel=1e-6)
        assert rows["base"]["perplexity"] == pytest.approx(alone.base_perplexity, rel=1e-6)
        assert rows[label]["decode_tok_s"] > 0 and rows[label]["memory_x"] > 1.0
    assert rows["nf4"]["kl_div"] > rows["rtn-w8"]["kl_div"]
