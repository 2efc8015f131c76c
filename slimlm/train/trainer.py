"""Training small Llama-architecture models from scratch (reference targets and drafts).

A :class:`Trainer` trains a :class:`~slimlm.model.causal_lm.CausalLM` (through its autograd-friendly
``forward_dense``) on a token stream (:mod:`slimlm.train.data`) to minimise an
:class:`~slimlm.train.objectives.Objective`: AdamW without decay on norms and biases
(:mod:`slimlm.train.optimizer`), linear warmup then cosine decay (:func:`slimlm.train.schedule.lr_at`),
gradient clipping, bf16 autocast only where it was measured faster than float32
(:mod:`slimlm.train.autocast`), periodic validation perplexity (:mod:`slimlm.train.evaluate`), resumable
checkpoints (:mod:`slimlm.train.checkpoint`). The files of the output directory are listed in
:mod:`slimlm.train.run_output`.

Determinism: the batch of step ``s`` depends only on (seed, s) and the initial weights only on the seed,
so a run resumed from ``checkpoint.pt`` follows the uninterrupted run's loss curve bit for bit (same
machine, same thread count).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.kernels import REFERENCE_OPS
from slimlm.model.causal_lm import CausalLM
from slimlm.train.autocast import autocast_context, choose_autocast
from slimlm.train.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from slimlm.train.config import CONFIG_NAME, TrainConfig
from slimlm.train.data import as_tensor, load_tokenizer, load_tokens, sample_batch
from slimlm.train.evaluate import evaluate_perplexity
from slimlm.train.metrics import count_parameters, software_versions, tokenizer_summary
from slimlm.train.objectives import NextTokenLoss, Objective
from slimlm.train.optimizer import make_optimizer
from slimlm.train.progress import StepProgress
from slimlm.train.run_output import append_jsonl, write_json
from slimlm.train.schedule import lr_at
from slimlm.train.state import TrainState
from slimlm.train.time_budget import RunTimer
from slimlm.train.weight_init import init_weights
from slimlm.utils.cpu_allocator import tune_cpu_allocator

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer:
    """Trains ``model`` (default: a new Llama of ``config``'s shape) on ``objective`` (default: next-token CE).

    ``fit()`` runs to ``config.total_steps`` (or the time limit, or ``stop_at``), then evaluates and
    saves; it returns the final metrics (also written to ``training.json``).
    """

    def __init__(
        self,
        config: TrainConfig,
        objective: Objective | None = None,
        tokenizer=None,
        model: CausalLM | None = None,
    ):
        config.validate()
        self.out_dir = Path(config.out_dir).expanduser()
        checkpoint = None
        if config.resume and (self.out_dir / CHECKPOINT_NAME).is_file():
            checkpoint = load_checkpoint(self.out_dir / CHECKPOINT_NAME)
            check_resumable(config, checkpoint)
        self.config = config
        self.objective = objective or NextTokenLoss()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, config.vocab_size)
        self.model_config = config.model_config(self.tokenizer)
        if model is None:
            model = CausalLM(self.model_config, REFERENCE_OPS)
            init_weights(model, config.seed, config.init_std)
        self.model = model.to(self.device)
        self.autocast_dtype, self.autocast_reason = choose_autocast(self.device, config.autocast)
        if self.device.type == "cpu" and tune_cpu_allocator():
            logger.debug("glibc malloc tuned to reuse large blocks (see tune_cpu_allocator)")
        self.optimizer, self.trainable = make_optimizer(self.objective.parameters(self.model), config, self.device)
        self.state = TrainState(total_steps=config.total_steps)
        torch.manual_seed(config.seed)
        if checkpoint is not None:
            self.state = restore_checkpoint(
                checkpoint,
                self.out_dir / CHECKPOINT_NAME,
                config=config,
                objective_name=self.objective.name,
                tokenizer=self.tokenizer,
                model=self.model,
                optimizer=self.optimizer,
            )
            logger.info("resumed %s at step %d (%d tokens seen)", self.out_dir, self.state.step, self.state.tokens_seen)
        self._tokens: dict[str, torch.Tensor] = {}
        self._run_start: float | None = None

    def tokens(self, split: str) -> torch.Tensor:
        """The token stream of the config's ``train``/``val``/``test`` source (int32, on the CPU)."""
        if split not in self._tokens:
            source = {"train": self.config.train_data, "val": self.config.val_data, "test": self.config.test_data}
            self._tokens[split] = as_tensor(load_tokens(source[split], self.tokenizer))
        return self._tokens[split]

    def _wall_seconds(self) -> float:
        run = time.perf_counter() - self._run_start if self._run_start is not None else 0.0
        return round(self.state.wall_seconds + run, 3)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.out_dir / CHECKPOINT_NAME,
            config=self.config,
            objective_name=self.objective.name,
            tokenizer=self.tokenizer,
            model=self.model,
            optimizer=self.optimizer,
            state=self.state,
            wall_seconds=self._wall_seconds(),
        )

    def evaluate(self, split: str = "val", max_tokens: int = 0) -> dict[str, float]:
        """Mean next-token NLL (nats) and perplexity over non-overlapping windows of ``split``."""
        return evaluate_perplexity(
            self.model,
            self.tokens(split),
            seq_len=self.config.seq_len,
            batch_size=self.config.micro_batch,
            max_tokens=max_tokens,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )

    @property
    def warmup_steps(self) -> int:
        """``config.warmup_steps``, at most a fifth of the schedule (matters for schedules fitted to time)."""
        return min(self.config.warmup_steps, max(1, self.state.total_steps // 5))

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step at index ``step``; returns (mean loss, gradient norm before clipping, lr)."""
        cfg = self.config
        lr = lr_at(
            step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=self.warmup_steps, total_steps=self.state.total_steps
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(self.tokens("train"), cfg.seq_len, cfg.batch_size, cfg.seed, step)
        micro = batch.split(cfg.micro_batch)
        loss_sum = 0.0
        for mb in micro:
            mb = mb.to(self.device)
            with autocast_context(self.device, self.autocast_dtype):
                loss = self.objective.loss(self.model, mb)
            (loss / len(micro)).backward()
            loss_sum += float(loss.detach())
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / len(micro), grad_norm, lr

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule, then evaluate, save and return the metrics (:meth:`finish`).

        A run stopped by ``time_limit`` also finishes (its ``training.json`` says ``"completed": false``;
        resume it with ``resume=True``). ``stop_at`` stops before optimizer step ``stop_at`` (for tests and
        staged runs): the checkpoint is saved and the metrics so far are returned, without finishing.
        """
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.config
        self._run_start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / CONFIG_NAME, cfg.to_dict())
        self._log_start()
        # Tokenize before the time limit's clock starts.
        self.tokens("train")
        self.tokens("val")
        timer = RunTimer()
        stopped_by = None
        last_loss: float | None = None
        if self.state.step == 0 and not self.state.history:
            timer.eval_seconds = self._eval_and_record(None)
        self.model.train()
        progress = StepProgress(
            total=self.state.total_steps, initial=self.state.step, enabled=cfg.progress, desc=Path(cfg.out_dir).name
        )
        try:
            with logging_redirect_tqdm():
                while self.state.step < self.state.total_steps:
                    stopped_by = self._stop_reason(stop_at, timer)
                    if stopped_by == "time_limit" and self._fitted_schedule_nearly_done():
                        # The last fit was a step or two optimistic: the fitted schedule ends where the time
                        # does (its learning rate is at the floor by now), and the run is complete.
                        logger.info(
                            "fit_to_time_limit: schedule ends at step %d of %d", self.state.step, self.state.total_steps
                        )
                        self.state.total_steps, stopped_by = self.state.step, None
                        break
                    if stopped_by:
                        break
                    loss, grad_norm, lr, seconds = self._timed_train_step()
                    timer.add_step(seconds)
                    last_loss = loss
                    progress.advance(loss=loss, lr=lr, tokens_per_second=cfg.batch_tokens / seconds)
                    if cfg.log_interval and self.state.step % cfg.log_interval == 0:
                        record = self.state.train_record(
                            loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_second=cfg.batch_tokens / seconds
                        )
                        append_jsonl(self.out_dir / "log.jsonl", record)
                    if cfg.fit_to_time_limit and self._refit_due(timer):
                        self._fit_schedule_to_time(timer)
                        progress.set_total(self.state.total_steps)
                    self._evaluate_and_checkpoint_when_due(loss, timer)
        except KeyboardInterrupt:
            progress.close()
            logger.warning("interrupted at step %d; saving a checkpoint to resume from", self.state.step)
            self.save_checkpoint()
            raise
        progress.close()
        self.save_checkpoint()
        completed = self.state.step >= self.state.total_steps
        metrics = self._metrics(completed, stopped_by, timer, last_loss)
        if stopped_by == "stop_at":
            return metrics
        if stopped_by == "time_limit":
            logger.warning(
                "time limit reached at step %d of %d: saving the model so far (resume with --resume)",
                self.state.step,
                self.state.total_steps,
            )
        return self.finish(metrics)

    def _log_start(self) -> None:
        counts = count_parameters(self.model)
        logger.info(
            "training %s: %.2fM parameters (%.2fM non-embedding), vocab %d, %d steps x %d tokens, "
            "device %s, %s, %d threads",
            self.objective.name,
            counts["parameters"] / 1e6,
            counts["non_embedding_parameters"] / 1e6,
            self.model_config.vocab_size,
            self.state.total_steps,
            self.config.batch_tokens,
            self.device,
            self.autocast_reason,
            torch.get_num_threads(),
        )

    def _stop_reason(self, stop_at: int | None, timer: RunTimer) -> str | None:
        if stop_at is not None and self.state.step >= stop_at:
            return "stop_at"
        if timer.next_step_passes(self.config.time_limit):
            return "time_limit"
        return None

    def _timed_train_step(self) -> tuple[float, float, float, float]:
        """:meth:`train_step` at the current step, counted in the state; returns it and its seconds."""
        t0 = time.perf_counter()
        loss, grad_norm, lr = self.train_step(self.state.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # CUDA runs asynchronously: time the work, not the launches
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {self.state.step}; lower the learning rate")
        self.state.step += 1
        self.state.tokens_seen += self.config.batch_tokens
        self.state.train_seconds += seconds
        return loss, grad_norm, lr, seconds

    def _refit_due(self, timer: RunTimer) -> bool:
        # Fit the schedule to the time limit after 10 steps, then again every 20 steps. Not sooner: the
        # median of fewer steps follows one stalled step (seen: a 46 s step among 5 s ones fitted a
        # 2000-step schedule to 67 steps, and the warmup, a fifth of the schedule, ended and then restarted
        # when the next fit lengthened it again). In the schedule's last tenth refit after every step, so
        # that steps slowed since the last fit move the end in rather than leaving the run cut off short of
        # it (seen: a fit at step 120 promised 142 steps, and time ran out at 136 on a busy machine).
        if timer.steps < 10:
            return False
        last_tenth = self.state.total_steps - self.state.step <= max(1, self.state.total_steps // 10)
        return timer.steps == 10 or timer.steps % 20 == 0 or last_tenth

    def _fitted_schedule_nearly_done(self) -> bool:
        left = self.state.total_steps - self.state.step
        return self.config.fit_to_time_limit and left <= max(1, self.state.total_steps // 50)

    def _fit_schedule_to_time(self, timer: RunTimer) -> None:
        if not timer.eval_seconds and self.config.eval_interval:
            # The fitted schedule reserves time for evaluations, so time one before the first periodic one.
            t0 = time.perf_counter()
            self.evaluate("val", self.config.eval_tokens)
            timer.eval_seconds = time.perf_counter() - t0
        self.state.total_steps = timer.fitted_total_steps(self.config, self.state.step, self.state.total_steps)

    def _evaluate_and_checkpoint_when_due(self, train_loss: float, timer: RunTimer) -> None:
        cfg = self.config
        done = self.state.step >= self.state.total_steps
        if done or (cfg.eval_interval and self.state.step % cfg.eval_interval == 0):
            timer.eval_seconds = self._eval_and_record(train_loss)
            if not cfg.checkpoint_interval:
                self.save_checkpoint()
        if cfg.checkpoint_interval and self.state.step % cfg.checkpoint_interval == 0:
            self.save_checkpoint()

    def _eval_and_record(self, train_loss: float | None) -> float:
        """Validates, appends the result to the history and the log; returns the seconds it took."""
        t0 = time.perf_counter()
        result = self.evaluate("val", self.config.eval_tokens)
        record = self.state.add_evaluation(result, train_loss)
        append_jsonl(self.out_dir / "log.jsonl", record)
        logger.info(
            "step %d: val loss %.4f, ppl %.2f (%d tokens)%s",
            self.state.step,
            result["loss"],
            result["ppl"],
            result["tokens"],
            f", train loss {train_loss:.4f}" if train_loss is not None else "",
        )
        return time.perf_counter() - t0

    def _metrics(self, completed: bool, stopped_by: str | None, timer: RunTimer, last_loss: float | None):
        from slimlm.model.saver import hf_config_dict

        cfg = self.config
        return {
            "config": cfg.to_dict(),
            "model_config": hf_config_dict(self.model_config),
            "objective": self.objective.name,
            **count_parameters(self.model),
            "tokenizer": tokenizer_summary(self.tokenizer, cfg.tokenizer or f"default_tokenizer({cfg.vocab_size})"),
            "data_tokens": {k: len(v) for k, v in self._tokens.items()},
            "steps": self.state.step,
            "total_steps": self.state.total_steps,
            "completed": completed,
            "stopped_by": stopped_by,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            "wall_seconds": self._wall_seconds(),
            "run_tokens_per_second": timer.tokens_per_second(cfg.batch_tokens),
            "final_train_loss": last_loss,
            "device": str(self.device),
            "autocast": self.autocast_reason,
            "threads": torch.get_num_threads(),
            "versions": software_versions(),
            "history": self.state.history,
        }

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Final val/test perplexity, the Hugging Face directory and ``training.json``."""
        from slimlm.model.saver import save_pretrained

        cfg = self.config
        t0 = time.perf_counter()
        val = self.evaluate("val", cfg.final_eval_tokens)
        test = self.evaluate("test", cfg.final_eval_tokens)
        metrics.update(
            val_loss=val["loss"],
            val_ppl=val["ppl"],
            val_tokens=val["tokens"],
            test_loss=test["loss"],
            test_ppl=test["ppl"],
            test_tokens=test["tokens"],
            data_tokens={k: len(v) for k, v in self._tokens.items()},  # now with the test split
        )
        logger.info(
            "final: val ppl %.3f (%d tokens), test ppl %.3f (%d tokens) [%.1fs]",
            val["ppl"],
            val["tokens"],
            test["ppl"],
            test["tokens"],
            time.perf_counter() - t0,
        )
        hf_dir = self.out_dir / "model"
        metrics["hf_dir"] = str(hf_dir)
        save_pretrained(self.model, hf_dir, tokenizer=self.tokenizer, dtype=cfg.save_dtype)
        metrics["wall_seconds"] = self._wall_seconds()
        write_json(hf_dir / "training.json", metrics)
        write_json(self.out_dir / "training.json", metrics)
        logger.info("saved %s and %s", hf_dir, self.out_dir / "training.json")
        return metrics
