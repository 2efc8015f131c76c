"""slimlm eval: GPTQ-protocol perplexity against transformers, KL divergence, window clamping, the command."""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest
import torch

from slimlm.eval import kl_divergence, perplexity
from slimlm.eval.cli import register
from slimlm.eval.kl_div import kl_divergences
from slimlm.model.loader import load_model
from tests.conftest import make_hf_model

IDS = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from slimlm.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("eval") / "tiny"
    make_hf_model("llama-gqa-tied").save_pretrained(path)
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n" * 20], vocab_size=300)
    assert len(tokenizer) <= 300
    tokenizer.save_pretrained(path)
    return path


def load(path):
    return load_model(path, dtype="float32", kernels="torch", load_tokenizer_files=False).model


def test_perplexity_is_exp_of_mean_nll_as_transformers_computes_it(tiny_dir):
    from transformers import AutoModelForCausalLM

    result = perplexity(load(tiny_dir), IDS, 32, progress=False)
    assert (result.windows, result.seq_len, result.tokens, result.predicted_tokens) == (3, 32, 96, 93)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for w in range(3):  # the 4 tokens after the third window are dropped, as in GPTQ's evaluation
            window = IDS[w * 32 : (w + 1) * 32].unsqueeze(0)
            total += float(hf(window, labels=window).loss) * 31  # the mean over the window's 31 predictions
    assert result.nll == pytest.approx(total / 93, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / 93), rel=1e-5)
    assert perplexity(load(tiny_dir), IDS, 32, max_tokens=64, progress=False).windows == 2


def test_kl_divergence_of_a_model_from_itself_is_zero_and_positive_when_perturbed(tiny_dir):
    model = load(tiny_dir)
    same = kl_divergence(model, load(tiny_dir), IDS, 32, progress=False)
    assert same.kl_div == 0.0
    assert (
        same.perplexity == same.base_perplexity == pytest.approx(perplexity(model, IDS, 32, progress=False).perplexity)
    )
    perturbed = load(tiny_dir)
    with torch.no_grad():
        perturbed.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(perturbed.layers[0].mlp.down_proj.weight))
    result = kl_divergence(perturbed, model, IDS, 32, progress=False)
    assert result.kl_div > 1e-4 and result.perplexity != result.base_perplexity
    assert result.base_perplexity == pytest.approx(same.perplexity)


def test_several_models_against_one_base_pass_match_one_at_a_time(tiny_dir):
    base = load(tiny_dir)
    models = {}
    for i, scale in enumerate((0.02, 0.08)):
        models[f"m{i}"] = m = load(tiny_dir)
        with torch.no_grad():
            w = m.layers[1].self_attn.o_proj.weight
            w.add_(scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(i)))
    together = kl_divergences(models, base, IDS, 32, progress=False)
    assert list(together) == ["m0", "m1"]
    for name, model in models.items():
        alone = kl_divergence(model, base, IDS, 32, progress=False)
        assert together[name].kl_div == pytest.approx(alone.kl_div, rel=1e-6)
        assert together[name].perplexity == pytest.approx(alone.perplexity, rel=1e-6)
        assert together[name].base_perplexity == pytest.approx(alone.base_perplexity, rel=1e-6)
    assert 0 < together["m0"].kl_div < together["m1"].kl_div


def test_windows_are_clamped_to_the_model_positions(tiny_dir, caplog):
    model = load(tiny_dir)  # max_position_embeddings 256
    ids = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING):
        result = perplexity(model, ids, 2048, progress=False)
    assert (result.seq_len, result.windows) == (256, 2)
    assert "seq_len 2048 exceeds the model's 256 positions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        short = perplexity(model, ids[:50], 128, progress=False)
    assert (short.seq_len, short.windows) == (50, 1) and "only 50 tokens" in caplog.text


def test_bad_input_is_refused(tiny_dir):
    model = load(tiny_dir)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        perplexity(model, IDS, 1, progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        perplexity(model, IDS + 300, 32, progress=False)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_command_reports_json(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("def g(y):\n    return y * 2\n" * 40)
    common = ["--data", str(data), "--seq-len", "64", "--dtype", "float32", "--kernels", "torch", "--json"]
    assert run_cli([str(tiny_dir), "--perplexity", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] > 1 and report["seq_len"] == 64 and report["windows"] >= 1
    assert {"tokens", "seconds", "model", "data"} <= set(report)
    assert run_cli([str(tiny_dir), "--kl-div", str(tiny_dir), "--max-tokens", "130", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kl_div"] == 0.0 and report["windows"] == 2 and report["base_model"] == str(tiny_dir)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_cli([str(tiny_dir), *common])
