"""Training Medusa heads with the ordinary :class:`~slimlm.train.trainer.Trainer` loop.

:class:`MedusaTrainer` is a Trainer whose ``model`` is the :class:`~slimlm.train.medusa.MedusaHeads` and whose
objective is :class:`~slimlm.train.medusa_objective.MedusaLoss` (holding the frozen float32 target): batches,
AdamW, warmup + cosine, time limit and fitted schedule, progress bar, checkpoints and resume are the
Trainer's. It replaces only what is about a language model rather than about heads: validation reports
per-head agreement with the target instead of perplexity, and the result is a heads directory instead of
a Hugging Face model. Run directory::

    out/
      train_config.json   # the TrainConfig; its shape fields are the target's (they are not trained)
      checkpoint.pt       # heads + optimizer + step (resume with --resume)
      log.jsonl           # train records, and eval records with val_top1 per head
      training.json       # command, steps, tokens, wall time, per-head val agreement, the target
      heads/              # MedusaHeads.save_pretrained, with a copy of training.json
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.train.config import TrainConfig
from slimlm.train.medusa import HEADS_SUBDIR, MedusaHeads
from slimlm.train.medusa_objective import DEFAULT_GREEDY_WEIGHT, MedusaLoss, evaluate_medusa
from slimlm.train.run_output import append_jsonl, write_json
from slimlm.train.time_budget import RunTimer
from slimlm.train.trainer import Trainer

__all__ = ["MEDUSA_DEFAULTS", "MedusaTrainer", "medusa_train_config", "train_medusa"]

logger = logging.getLogger(__name__)

# Heads are ~0.6M parameters on a 15.7M target: a few million tokens saturate them, and each step pays for a
# full target forward, so steps are smaller and fewer than when training the target itself.
MEDUSA_DEFAULTS: dict[str, Any] = dict(
    seq_len=256,
    batch_tokens=4096,
    max_steps=1000,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=30,
    weight_decay=0.0,  # decay would pull the heads back towards the lm_head they started as
    eval_interval=100,
    eval_tokens=16384,
    final_eval_tokens=65536,
    log_interval=10,
    out_dir="runs/medusa",
)


def medusa_train_config(target_config: ModelConfig, *, target_path: str | Path | None = None, **overrides: Any):
    """A :class:`TrainConfig` for heads on a target of ``target_config``: :data:`MEDUSA_DEFAULTS` + ``overrides``.

    The shape fields are the target's, so that ``train_config.json`` describes the model the heads sit on
    and a resume with another target is refused.
    """
    c = target_config
    shape = dict(
        hidden_size=c.hidden_size,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope.theta,
        tie_word_embeddings=c.tie_word_embeddings,
        vocab_size=c.vocab_size,
        tokenizer=str(Path(target_path).resolve()) if target_path else "",
    )
    base = {**MEDUSA_DEFAULTS, "seq_len": min(MEDUSA_DEFAULTS["seq_len"], c.max_position_embeddings)}
    if overrides.get("time_limit") and "fit_to_time_limit" not in overrides:
        overrides["fit_to_time_limit"] = True
    return TrainConfig(**{**base, **shape, **overrides})


class MedusaTrainer(Trainer):
    """Trains ``num_heads`` Medusa heads on ``target`` (a CausalLM or a loader ``LoadedModel``), which stays frozen."""

    def __init__(
        self,
        config: TrainConfig,
        target,
        *,
        num_heads: int = 4,
        tokenizer=None,
        target_path: str | Path | None = None,
        command: str | None = None,
        greedy_weight: float = DEFAULT_GREEDY_WEIGHT,
    ):
        if not isinstance(target, CausalLM):  # a LoadedModel: it knows its tokenizer and directory
            tokenizer = tokenizer if tokenizer is not None else target.tokenizer
            target_path = target_path if target_path is not None else target.path
            target = target.model
        if config.seq_len < num_heads + 2:
            raise ValueError(f"seq_len ({config.seq_len}) must be >= num_heads + 2 ({num_heads + 2})")
        # The teacher must be exact: float32, and frozen so that no gradient is ever computed for it.
        self.target = target.float().requires_grad_(False).eval()
        heads = MedusaHeads(self.target, num_heads, target_path=target_path)
        super().__init__(config, MedusaLoss(self.target, num_heads, greedy_weight), tokenizer=tokenizer, model=heads)
        if len(self.tokenizer) > self.target.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens, more than the target's vocabulary "
                f"({self.target.config.vocab_size}): pass the target's own tokenizer"
            )
        self.target.to(self.device)
        self.command = command if command is not None else shlex.join(sys.argv)

    def evaluate(self, split: str = "val", max_tokens: int = 0) -> dict[str, Any]:
        """Per-head agreement with the target on ``split`` (see :func:`evaluate_medusa`)."""
        return evaluate_medusa(
            self.model,
            self.target,
            self.tokens(split),
            seq_len=self.config.seq_len,
            batch_size=self.config.micro_batch,
            max_tokens=max_tokens,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )

    def _eval_and_record(self, train_loss: float | None) -> float:
        t0 = time.perf_counter()
        result = self.evaluate("val", self.config.eval_tokens)
        record = {
            "event": "eval",
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            **{f"val_{key}": value for key, value in result.items()},
            "train_loss": train_loss,
        }
        self.state.history.append(record)
        append_jsonl(self.out_dir / "log.jsonl", record)
        logger.info("step %d: %s", self.state.step, describe(result))
        return time.perf_counter() - t0

    def _metrics(self, completed: bool, stopped_by: str | None, timer: RunTimer, last_loss: float | None):
        from slimlm.model.saver import hf_config_dict

        metrics = super()._metrics(completed, stopped_by, timer, last_loss)
        del metrics["model_config"]  # the Llama of the config's shape fields: the target's own config is exact
        return {
            "command": self.command,
            "medusa": self.model.config_dict(),
            "target_model_config": hf_config_dict(self.target.config),
            **metrics,
        }

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Final validation agreement, the heads directory and ``training.json``."""
        t0 = time.perf_counter()
        val = self.evaluate("val", self.config.final_eval_tokens)
        metrics.update({f"val_{key}": value for key, value in val.items()})
        start = next((r for r in self.state.history if r["step"] == 0), None)
        if start is not None:
            metrics["start_val_top1"] = start["val_top1"]  # what the untrained heads (= the lm_head) agree
        logger.info("final (%.1fs): %s", time.perf_counter() - t0, describe(val))
        heads_dir = self.out_dir / HEADS_SUBDIR
        metrics["heads_dir"] = str(heads_dir)
        metrics["wall_seconds"] = self._wall_seconds()
        self.model.save_pretrained(heads_dir, extra_files={"training.json": metrics})
        write_json(self.out_dir / "training.json", metrics)
        logger.info("saved %s and %s", heads_dir, self.out_dir / "training.json")
        return metrics


def describe(result: dict[str, Any]) -> str:
    """One line of an :func:`evaluate_medusa` result."""
    top1 = " ".join(f"{a:.3f}" for a in result["top1"])
    return (
        f"val KL {result['loss']:.4f}, top-1 agreement per head {top1}, "
        f"chain accept length {result['accept_length']:.3f} ({result['tokens']} positions)"
    )


def train_medusa(
    target: str | Path,
    out_dir: str | Path,
    *,
    num_heads: int = 4,
    greedy_weight: float = DEFAULT_GREEDY_WEIGHT,
    command: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Loads ``target`` (a model directory) in float32 and trains Medusa heads on it into ``out_dir``."""
    from slimlm.model.loader import load_model

    loaded = load_model(target, dtype="float32", device="cpu", kernels="torch")
    config = medusa_train_config(loaded.config, target_path=loaded.path, out_dir=str(out_dir), **overrides)
    trainer = MedusaTrainer(config, loaded, num_heads=num_heads, greedy_weight=greedy_weight, command=command)
    return trainer.fit()
