"""``slimlm compress`` end to end on a tiny checkpoint: the report, the written checkpoint, its logits."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from slimlm.compress.cli import register
from slimlm.model.loader import load_model
from slimlm.model.quantized_linear import QuantizedLinear
from tests.conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("compress-cli") / "tiny")


def run(capsys, *argv) -> dict:
    parser = argparse.ArgumentParser(prog="slimlm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compress", *argv, "--json", "--no-progress"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_gptq_report_and_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "gptq"
    calib = ["--calib-tokens", "1024", "--calib-seq-len", "128"]
    report = run(capsys, str(tiny), "--method", "gptq", "--bits", "4", *calib, "--out", str(out))
    assert report["method"] == "gptq" and report["scheme"] == "w4a16-g64"  # the default group: 128 > 64 columns
    assert report["calibration_tokens"] == 1024 and report["calibration"]["sequences"] == 8
    assert report["quantized_linears"] == 8 and report["schedule"] == "stage-wise"
    assert report["seconds"] > 0 and report["peak_rss_mib"] > 0 and report["output"] == str(out)
    meta = json.loads((out / "slimlm_compression.json").read_text())["metadata"]
    assert meta["recipe"]["modifiers"][0]["gptq"]["bits"] == 4 and meta["calibration"]["tokens"] == 1024
    loaded = load_model(out, dtype="float32", kernels="torch")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantizedLinear)
    base = load_model(tiny, dtype="float32", kernels="torch").model
    ids = torch.randint(0, len(loaded.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded.model.forward_dense(ids), base.forward_dense(ids)
    assert float((a - b).norm() / b.norm()) < 0.3


def test_recipe_file(tiny, tmp_path, capsys):
    recipe = tmp_path / "w8a8.yaml"
    recipe.write_text(
        "modifiers:\n  - smoothquant: {alpha: 0.5}\n  - rtn: {bits: 8, group_size: -1, activations: int8-token}\n"
    )
    report = run(capsys, str(tiny), "--recipe", str(recipe), "--calib-tokens", "512", "--out", str(tmp_path / "sq"))
    assert report["method"] == "smoothquant+rtn" and report["scheme"] == "w8a8"


def test_rtn_needs_no_calibration(tiny, tmp_path, capsys):
    report = run(capsys, str(tiny), "--method", "rtn", "--bits", "8", "--out", str(tmp_path / "rtn"))
    assert report["calibration_tokens"] == 0 and report["calibration"] is None and report["scheme"] == "w8a16"


def test_bad_flags(tiny, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="slimlm")
    register(parser.add_subparsers(dest="command", required=True))
    for argv, message in [
        (["--out", str(tmp_path / "x")], "give --method"),
        (["--method", "rtn", "--group-size", "48", "--out", str(tmp_path / "x")], "group_size 48 does not divide"),
        (["--recipe", "r.yaml", "--bits", "4", "--out", str(tmp_path / "x")], "--recipe replaces --bits"),
    ]:
        args = parser.parse_args(["compress", str(tiny), *argv])
        with pytest.raises(ValueError, match=message):
            args.func(args)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return tiny_checkpoint(
        tmp_path_factory.mktemp("compress-bf16") / "tiny", dtype="bfloat16", tie_word_embeddings=False
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "rtn", "--bits", "4", "--group-size", "32"],
        ["--method", "gptq", "--bits", "4", "--group-size", "32"],
        ["--method", "awq", "--bits", "4", "--group-size", "32"],
        ["--method", "smoothquant"],
    ],
    ids=["rtn", "gptq", "awq", "smoothquant"],
)
def test_a_16_bit_checkpoint_held_in_16_bits_compresses_exactly_as_in_float32(
    tiny_bf16, tmp_path, capsys, monkeypatch, flags
):
    """The compressor holds the model in its checkpoint's dtype and upcasts one layer at a time (peak memory);
    bf16 -> float32 is exact, so the checkpoint is byte for byte what a float32 load writes."""
    from safetensors.torch import load_file

    from slimlm.compress import run as compress_run

    calib = ["--calib-tokens", "512", "--calib-seq-len", "64"]
    held = run(capsys, str(tiny_bf16), *flags, *calib, "--out", str(tmp_path / "held"))
    assert held["quantized_linears"] > 0
    monkeypatch.setattr(compress_run, "_holding_dtype", lambda dtype: "float32")
    run(capsys, str(tiny_bf16), *flags, *calib, "--out", str(tmp_path / "fp32"))
    a, b = load_file(tmp_path / "held" / "model.safetensors"), load_file(tmp_path / "fp32" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
