"""Medusa heads: zero-init start, self-distillation raising agreement, save/load, mismatch errors, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import random
import re

import pytest
import torch

from slimlm.kernels import REFERENCE_OPS
from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.model.loader import load_model
from slimlm.train.cli import register
from slimlm.train.config import TrainConfig
from slimlm.train.medusa import CONFIG_FILE, WEIGHTS_FILE, MedusaHeads, MedusaMismatchError, read_medusa_config
from slimlm.train.medusa_objective import target_outputs
from slimlm.train.medusa_trainer import MedusaTrainer, medusa_train_config
from slimlm.train.trainer import Trainer
from slimlm.train.weight_init import init_weights

THREADS = 1  # see tests/train/test_trainer.py: one thread is the fast and stable choice on a shared 2-core box


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _functions(seed: int, n: int) -> str:
    """Templated code: a target learns it in seconds, and what follows a token depends on the tokens before."""
    rng = random.Random(seed)
    ops = {"add": "+", "sub": "-", "scale": "*", "shift": "<<", "clip": "%", "mix": "^"}
    out = []
    for _ in range(n):
        name, k, var = rng.choice(sorted(ops)), rng.randint(2, 99), rng.choice("xyzn")
        out.append(f"def {name}_{k}({var}):\n    return {var} {ops[name]} {k}\n\n")
    return "".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Train and validation files; their token caches go to a temporary directory for the module's duration."""
    from slimlm.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer(512)  # from the real cache, before it is redirected
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.py").write_text(_functions(0, 3000))
    (root / "val.py").write_text(_functions(1, 300))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMLM_CACHE_DIR", str(root / "cache"))
        yield {"train_data": str(root / "train.py"), "val_data": str(root / "val.py"), "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def target_dir(corpus, tmp_path_factory):
    """A tiny target (vocab 512, hidden 64) trained for ~10 s on the templated code (val ppl ~3.5)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("target")
    config = TrainConfig.preset(
        "tiny",
        out_dir=str(out),
        train_data=corpus["train_data"],
        val_data=corpus["val_data"],
        test_data=corpus["val_data"],
        seq_len=64,
        batch_tokens=1024,
        max_steps=60,
        lr=1e-2,
        warmup_steps=5,
        eval_interval=0,
        eval_tokens=512,
        final_eval_tokens=512,
        save_dtype="float32",
        progress=False,
        threads=THREADS,
    )
    Trainer(config, tokenizer=corpus["tokenizer"]).fit()
    torch.set_num_threads(threads)
    return out / "model"


def load_target(target_dir):
    return load_model(target_dir, dtype="float32", device="cpu", kernels="torch")


def medusa_config(loaded, corpus, out_dir, **overrides) -> TrainConfig:
    kw = dict(seq_len=64, batch_tokens=512, eval_tokens=4096, final_eval_tokens=4096, threads=THREADS, progress=False)
    kw.update(train_data=corpus["train_data"], val_data=corpus["val_data"], out_dir=str(out_dir))
    return medusa_train_config(loaded.config, target_path=loaded.path, **{**kw, **overrides})


def test_untrained_heads_are_the_lm_head(target_dir):
    loaded = load_target(target_dir)
    heads = MedusaHeads(loaded, num_heads=3)
    h = loaded.config.hidden_size
    assert sorted(heads.state_dict()) == [f"blocks.{k}.linear.{p}" for k in range(3) for p in ("bias", "weight")]
    assert sum(p.numel() for p in heads.parameters()) == 3 * (h * h + h)  # the target's weights are not theirs
    ids = torch.randint(0, loaded.config.vocab_size, (1, 40))
    hidden, logits = target_outputs(loaded.model, ids)
    out = heads(hidden[0])
    assert out.shape == (3, 40, loaded.config.vocab_size)
    for k in range(3):
        torch.testing.assert_close(out[k], logits[0], rtol=0, atol=1e-6)
    assert heads.target_info["path"] == str(target_dir.resolve())


def test_self_distillation_raises_agreement_and_leaves_the_target(target_dir, corpus, tmp_path):
    loaded = load_target(target_dir)
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    # ~15 s, schedule fitted to it; the same 4096 validation positions are scored at the start and the end.
    config = medusa_config(loaded, corpus, tmp_path / "run", max_steps=10**6, time_limit=12.0, eval_interval=50)
    metrics = MedusaTrainer(config, loaded, num_heads=2, command="test").fit()
    start, end = metrics["start_val_top1"], metrics["val_top1"]
    assert end[0] > start[0] + 0.2 and end[1] > start[1] + 0.2, (start, end)  # measured: 0.25 -> 0.8, 0.1 -> 0.75
    assert metrics["val_loss"] < metrics["history"][0]["val_loss"]
    assert metrics["val_accept_length"] > 1.5
    assert metrics["total_steps"] < 10**6 and metrics["stopped_by"] in (None, "time_limit")
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n
    saved = json.loads((tmp_path / "run" / "training.json").read_text())
    for key in ("command", "steps", "tokens_seen", "wall_seconds", "val_top1", "val_accept_length", "medusa"):
        assert key in saved, key
    assert saved["val_top1"] == end and saved["tokens_seen"] == metrics["steps"] * 512
    assert (tmp_path / "run" / "heads" / "training.json").is_file()


def test_save_load_round_trip(target_dir, tmp_path):
    loaded = load_target(target_dir)
    heads = MedusaHeads(loaded, num_heads=4)
    torch.manual_seed(0)
    for p in heads.parameters():
        p.data.normal_(0, 0.05)
    hidden = torch.randn(17, loaded.config.hidden_size)
    heads.save_pretrained(tmp_path / "run" / "heads")
    heads.save_pretrained(tmp_path / "run" / "heads")  # replacing an existing directory works
    assert sorted(f.name for f in (tmp_path / "run" / "heads").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [f.name for f in (tmp_path / "run").iterdir()] == ["heads"]  # no temporary directory left
    config = read_medusa_config(tmp_path / "run")
    assert config["num_heads"] == 4 and config["target"]["path"] == str(target_dir.resolve())
    # Tiny: the output projection is borrowed from the target, not stored.
    assert (tmp_path / "run" / "heads" / WEIGHTS_FILE).stat().st_size < 4 * (64 * 64 + 64) * 4 + 1024
    again = MedusaHeads.from_pretrained(tmp_path / "run", load_target(target_dir))  # the run dir works too
    assert again.num_heads == 4
    assert torch.equal(again(hidden), heads(hidden))


def test_mismatched_target_is_refused(target_dir, tmp_path, caplog):
    loaded = load_target(target_dir)
    MedusaHeads(loaded, num_heads=2).save_pretrained(tmp_path / "heads")
    changes = [
        (dict(hidden_size=32), "hidden_size 64 (target: 32)"),
        (dict(vocab_size=300), "vocab_size 512 (target: 300)"),
    ]
    for change, message in changes:
        other = CausalLM(_config_like(loaded.config, **change), REFERENCE_OPS)
        with pytest.raises(MedusaMismatchError, match=re.escape(message)):
            MedusaHeads.from_pretrained(tmp_path / "heads", other)
    # Same shape, other weights: it loads, with a warning that acceptance will suffer.
    other = CausalLM(loaded.config, REFERENCE_OPS)
    init_weights(other, seed=1, std=0.02)
    with caplog.at_level(logging.WARNING, logger="slimlm.train.medusa"):
        MedusaHeads.from_pretrained(tmp_path / "heads", other)
    assert "other weights" in caplog.text
    with pytest.raises(MedusaMismatchError, match="not a Medusa heads directory"):
        MedusaHeads.from_pretrained(target_dir, loaded)


def _config_like(config: ModelConfig, **change) -> ModelConfig:
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
    )
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **fields, **change}, source="test")


def test_resume_needs_the_same_heads(target_dir, corpus, tmp_path):
    loaded = load_target(target_dir)
    config = medusa_config(loaded, corpus, tmp_path / "run", max_steps=4, warmup_steps=1, eval_interval=0)
    MedusaTrainer(config, loaded, num_heads=2).fit(stop_at=2)
    config.resume = True
    assert MedusaTrainer(config, load_target(target_dir), num_heads=2).state.step == 2
    with pytest.raises(ValueError, match="medusa-kl-2"):
        MedusaTrainer(config, load_target(target_dir), num_heads=3)


def test_cli_end_to_end(target_dir, corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    argv = ["train", "medusa", str(target_dir), "--out", str(out), "--num-heads", "3", "--max-steps", "3"]
    argv += ["--train-data", corpus["train_data"], "--val-data", corpus["val_data"], "--seq-len", "32"]
    argv += ["--batch-tokens", "128", "--eval-interval", "0", "--eval-tokens", "256", "--final-eval-tokens", "256"]
    argv += ["--warmup-steps", "1", "--no-progress", "--threads", "1", "--json"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["completed"] and len(printed["val_top1"]) == 3
    config = read_medusa_config(out)
    assert config["num_heads"] == 3 and config["target"]["path"] == str(target_dir.resolve())
    assert (out / "heads" / WEIGHTS_FILE).is_file() and (out / "training.json").is_file()
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["seq_len"], saved["hidden_size"], saved["tokenizer"]) == (32, 64, str(target_dir.resolve()))
    # Standalone loading (no target in memory) reads the projection from the recorded target directory.
    heads, loaded = MedusaHeads.from_pretrained(out), load_target(target_dir)
    hidden = torch.randn(5, 64)
    torch.testing.assert_close(heads(hidden), MedusaHeads.from_pretrained(out, loaded)(hidden), rtol=0, atol=0)
    # `slimlm train` without the sub-action still needs --out.
    args = parser.parse_args(["train", "--preset", "tiny"])
    with pytest.raises(SystemExit):
        args.func(args)
