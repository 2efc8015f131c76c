"""Training from scratch: schedule, data windows, loss going down, bit-exact resume, HF export, CLI."""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.model.loader import load_model
from slimlm.train import data
from slimlm.train.checkpoint import CHECKPOINT_NAME
from slimlm.train.cli import config_from_args, register
from slimlm.train.config import PRESETS, TrainConfig
from slimlm.train.metrics import count_parameters
from slimlm.train.schedule import lr_at
from slimlm.train.trainer import Trainer

# One thread: on a shared 2-core machine, two OpenMP threads slow down many times when another
# process takes a core. The fixture below restores the thread count (Trainer sets it process-wide).
THREADS = 1


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# A very small run: 8 steps of 8 x 32 tokens, evaluations on 512 tokens.
MICRO = dict(
    threads=THREADS,
    seq_len=32,
    batch_tokens=256,
    max_steps=8,
    warmup_steps=2,
    eval_interval=4,
    eval_tokens=512,
    final_eval_tokens=512,
    log_interval=1,
    progress=False,
)


def micro_config(tmp_path, name: str, **overrides) -> TrainConfig:
    return TrainConfig.preset("tiny", **{**MICRO, "out_dir": str(tmp_path / name), **overrides})


def train_losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


# --------------------------------------------------------------------------- schedule and data


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way through the decay: the mean of lr and min_lr
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_windows():
    tokens = torch.arange(1000, dtype=torch.int32)
    a = data.sample_batch(tokens, 16, 4, seed=3, step=7)
    b = data.sample_batch(tokens, 16, 4, seed=3, step=7)
    c = data.sample_batch(tokens, 16, 4, seed=3, step=8)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (4, 16) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.labels, a.input_ids + 1)  # contiguous windows of the stream, shifted by one
    # Evaluation windows predict every token after the first exactly once.
    predicted = torch.cat([w.labels.flatten() for w in data.eval_windows(tokens, 64, 3)])
    assert torch.equal(predicted, tokens[1:].long())
    capped = sum(w.num_tokens for w in data.eval_windows(tokens, 64, 3, max_tokens=100))
    assert capped == 100


def test_token_stream_layout_and_cache(tmp_path, monkeypatch):
    from slimlm.data.tokenizer import default_tokenizer

    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path))
    tok = default_tokenizer(512)
    monkeypatch.setattr(data, "_PIECE_CHARS", 50)  # force many pieces
    text = "def f(x):\n    return x\n\n\nclass A:\n    pass\n" * 20
    path = tmp_path / "code.py"
    path.write_text(text)
    stream = data.load_tokens(str(path), tok)
    assert stream.dtype == np.uint16
    expected = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert stream.tolist() == expected
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    assert data.load_tokens(str(path), tok).tolist() == expected  # from the cache


# --------------------------------------------------------------------------- training


def test_presets_have_the_documented_sizes():
    from slimlm.data.tokenizer import default_tokenizer
    from slimlm.kernels import REFERENCE_OPS
    from slimlm.model.causal_lm import CausalLM

    tok = default_tokenizer(8192)
    sizes = {}
    for name in ("py-target", "py-draft"):
        config = TrainConfig.preset(name)
        config.validate()
        with torch.device("meta"):
            model = CausalLM(config.model_config(tok), REFERENCE_OPS)
        sizes[name] = count_parameters(model)["parameters"]
    assert 15e6 <= sizes["py-target"] <= 30e6
    assert 2e6 <= sizes["py-draft"] <= 4e6
    assert set(PRESETS) == {"py-target", "py-draft", "tiny"}


def test_tiny_training_lowers_validation_loss_and_exports(tmp_path):
    config = TrainConfig.preset(
        "tiny",
        out_dir=str(tmp_path / "run"),
        max_steps=120,
        eval_interval=60,
        eval_tokens=4096,
        final_eval_tokens=4096,
        save_dtype="float32",
        progress=False,
        threads=THREADS,
    )
    trainer = Trainer(config)
    metrics = trainer.fit()
    history = metrics["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 120
    assert history[0]["val_loss"] > 6.0  # ~ln(512): an untrained model
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0, history
    assert metrics["completed"] and metrics["steps"] == 120 and metrics["tokens_seen"] == 120 * 2048
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["test_ppl"] > 1.0 and metrics["test_tokens"] == 4096

    out = tmp_path / "run"
    saved = json.loads((out / "training.json").read_text())
    assert saved["config"]["max_steps"] == 120 and saved["val_ppl"] == metrics["val_ppl"]
    assert (out / "model" / "training.json").is_file() and (out / CHECKPOINT_NAME).is_file()

    # The Hugging Face directory: transformers computes the same logits as our model.
    model = trainer.model.eval()
    ref = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="eager")
    ids = trainer.tokens("val")[:48].long()[None]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_dense(ids), ref.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    loaded = load_model(out / "model", dtype="float32", kernels="torch")
    assert loaded.tokenizer.get_vocab() == trainer.tokenizer.get_vocab()
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(loaded.model.named_parameters())[name]), name


def test_resume_continues_the_same_loss_curve(tmp_path):
    full = Trainer(micro_config(tmp_path, "full"))
    full.fit()
    first = Trainer(micro_config(tmp_path, "split"))
    partial = first.fit(stop_at=5)
    assert partial["steps"] == 5 and not partial["completed"]
    assert not (tmp_path / "split" / "model").exists()
    resumed = Trainer(micro_config(tmp_path, "split", resume=True))
    assert resumed.state.step == 5
    resumed.fit()

    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    assert got == expected  # bit for bit: same batches, same weights, same optimizer state
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    done = json.loads((tmp_path / "split" / "training.json").read_text())
    assert done["steps"] == 8 and done["completed"]


def test_resume_refuses_other_settings(tmp_path):
    Trainer(micro_config(tmp_path, "run")).fit(stop_at=1)
    with pytest.raises(ValueError, match="hidden_size"):
        Trainer(micro_config(tmp_path, "run", resume=True, hidden_size=32))


def test_cli_short_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    argv = ["train", "--preset", "tiny", "--out", str(out), "--max-steps", "3", "--seq-len", "32"]
    argv += ["--batch-tokens", "128", "--eval-interval", "0", "--eval-tokens", "256", "--final-eval-tokens", "256"]
    argv += ["--warmup-steps", "1", "--no-progress", "--threads", "1", "--json"]
    args = parser.parse_args(argv)
    config = config_from_args(args)
    assert (config.max_steps, config.seq_len, config.hidden_size, config.progress) == (3, 32, 64, False)
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["completed"] and "val_ppl" in printed
    # --resume takes the run's saved config as the base: only the given flags change.
    args = parser.parse_args(["train", "--out", str(out), "--resume", "--max-steps", "5"])
    config = config_from_args(args)
    assert (config.max_steps, config.seq_len, config.batch_tokens, config.resume) == (5, 32, 128, True)


def test_time_limit_stops_and_saves(tmp_path):
    config = micro_config(tmp_path, "limited", max_steps=10**6, time_limit=2.0, eval_interval=0)
    metrics = Trainer(config).fit()
    assert metrics["stopped_by"] == "time_limit" and not metrics["completed"]
    assert 0 < metrics["steps"] < 10**6 and metrics["train_seconds"] < 4.0
    assert (tmp_path / "limited" / "model" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "limited" / "training.json").read_text())
    assert saved["completed"] is False and saved["steps"] == metrics["steps"]


def test_fit_to_time_limit_shortens_the_schedule(tmp_path):
    config = micro_config(tmp_path, "fitted", max_steps=10**6, time_limit=4.0, fit_to_time_limit=True)
    metrics = Trainer(config).fit()
    assert metrics["total_steps"] < 10**6  # the cosine schedule was fitted to the time limit
    assert metrics["steps"] <= metrics["total_steps"] and metrics["train_seconds"] < 8.0


def test_a_time_fitted_run_whose_steps_slow_down_still_completes(tmp_path, monkeypatch):
    # A busy machine slows the steps after the last periodic fit; the schedule's end must follow the time.
    config = micro_config(tmp_path, "slowing", max_steps=10**6, time_limit=3.0, fit_to_time_limit=True)
    trainer = Trainer(config)
    step_fast = trainer.train_step
    started = time.perf_counter()

    def slowing_step(step):
        time.sleep(max(0.0, time.perf_counter() - started - 1.0) * 0.02)  # 0 ms, then 20 ms more per second
        return step_fast(step)

    monkeypatch.setattr(trainer, "train_step", slowing_step)
    metrics = trainer.fit()
    assert metrics["completed"] and metrics["total_steps"] < 10**6
    assert metrics["steps"] == metrics["total_steps"]


def test_a_finished_time_fitted_run_resumes_for_more_time(tmp_path):
    config = micro_config(tmp_path, "fitted", max_steps=10**6, time_limit=3.0, fit_to_time_limit=True)
    first = Trainer(config).fit()
    assert first["completed"] and first["total_steps"] < 10**6
    again = micro_config(tmp_path, "fitted", max_steps=10**6, time_limit=3.0, fit_to_time_limit=True, resume=True)
    trainer = Trainer(again)
    assert trainer.state.step == first["steps"] and trainer.state.total_steps == 10**6  # the budget is back
    second = trainer.fit()
    assert second["completed"] and second["steps"] > first["steps"]  # refitted to the new time limit, and run


def test_bf16_autocast_runs(tmp_path):
    # On CPUs without native bf16 "auto" picks float32; the bf16 path must still work where it is chosen.
    trainer = Trainer(micro_config(tmp_path, "bf16", autocast="bf16", max_steps=2, eval_interval=0))
    assert trainer.autocast_dtype == torch.bfloat16
    metrics = trainer.fit()
    assert metrics["completed"] and math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["final_train_loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay float32


def test_a_fitted_schedule_that_runs_out_of_time_a_step_early_ends_complete(tmp_path, monkeypatch):
    from slimlm.train import time_budget

    trainer = Trainer(micro_config(tmp_path, "early", max_steps=50, time_limit=60.0, fit_to_time_limit=True))
    # The time runs out one step before the (fitted) schedule's end.
    monkeypatch.setattr(time_budget.RunTimer, "next_step_passes", lambda timer, limit: trainer.state.step >= 49)
    metrics = trainer.fit()
    assert metrics["completed"] and metrics["stopped_by"] is None
    assert metrics["steps"] == metrics["total_steps"] == 49
    # Far from the end, running out of time is a stop, not a completion.
    other = Trainer(micro_config(tmp_path, "stopped", max_steps=50, time_limit=60.0, fit_to_time_limit=True))
    monkeypatch.setattr(time_budget.RunTimer, "next_step_passes", lambda timer, limit: other.state.step >= 30)
    metrics = other.fit()
    assert not metrics["completed"] and metrics["stopped_by"] == "time_limit" and metrics["steps"] == 30
