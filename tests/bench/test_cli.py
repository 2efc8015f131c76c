"""The CLI commands run end to end on a tiny checkpoint and report sane numbers as JSON."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from slimlm.model.new_model import new_model
from tests.conftest import SMALL_SHAPE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from slimlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x * 2\n" * 200], vocab_size=300)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    new_model(
        "smollm2-135m",
        path,
        num_layers=2,
        dtype="float32",
        tokenizer=tok,
        overrides={**SMALL_SHAPE, "vocab_size": len(tok)},
    )
    return path


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


def test_bench_step_json(tiny, capsys):
    r = run_json(capsys, "bench", "step", str(tiny), "--steps", "20", "--json", "--max-model-len", "256")
    assert r["steps"] == 20 and r["step_ms_median"] > 0
    assert set(r["phase_ms_mean"]) == {"schedule", "model", "sample", "postprocess"}


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
