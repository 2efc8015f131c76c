"""Training small Llama-architecture models from scratch (reference targets and drafts).

A :class:`Trainer` trains a :class:`~slimlm.model.causal_lm.CausalLM` (through its autograd-friendly
``forward_dense``) on a token stream (:mod:`slimlm.train.data`): AdamW without decay on norms and biases,
linear warmup then cosine decay (:func:`slimlm.train.schedule.lr_at`), gradient clipping, bf16 autocast
only where it was measured faster than float32, periodic validation perplexity, resumable checkpoints.

What is minimised is an :class:`Objective`: ``loss(model, batch)`` and the parameters it trains. Only
next-token cross-entropy (:class:`NextTokenLoss`) exists now; distillation of a draft from a target's
logits, or Medusa heads on a frozen target, are further objectives (the target lives in the objective,
the trained module is ``model``).

Output directory::

    out/
      train_config.json   # the TrainConfig (``slimlm train --resume`` starts from it)
      checkpoint.pt       # model + optimizer + step + RNG state (torch.save of plain tensors/containers)
      log.jsonl           # one JSON record per log interval and per evaluation
      training.json       # final metrics: config, steps, tokens, wall time, val/test perplexity
      model/              # the Hugging Face checkpoint (save_pretrained), with a copy of training.json

Determinism: the batch of step ``s`` depends only on (seed, s) and the initial weights only on the seed,
so a run resumed from ``checkpoint.pt`` follows the uninterrupted run's loss curve bit for bit (same
machine, same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.kernels import REFERENCE_OPS
from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.train.data import Batch, as_tensor, eval_windows, load_tokens, sample_batch, tokenizer_fingerprint
from slimlm.train.schedule import lr_at

__all__ = [
    "PRESETS",
    "NextTokenLoss",
    "Objective",
    "TrainConfig",
    "Trainer",
    "choose_autocast",
    "tune_cpu_allocator",
    "count_parameters",
    "init_weights",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "train_config.json"
_CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``train_config.json`` and ``training.json``)."""

    # --- model shape (Llama architecture; the vocabulary is the tokenizer's)
    hidden_size: int = 384
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    # --- data
    vocab_size: int = 8192  # size of the built-in tokenizer (default_tokenizer) when ``tokenizer`` is empty
    tokenizer: str = ""  # a tokenizer directory instead of the built-in one
    train_data: str = "stdlib-train"
    val_data: str = "stdlib-validation"
    test_data: str = "stdlib-test"
    # --- optimisation
    seq_len: int = 256
    batch_tokens: int = 8192  # tokens per optimizer step (a multiple of seq_len)
    micro_batch_size: int = 0  # sequences per forward/backward; 0: about 1024 tokens
    max_steps: int = 0  # optimizer steps; 0: from max_tokens
    max_tokens: int = 0  # token budget; used when max_steps is 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100  # capped at a fifth of the schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # --- evaluation
    eval_interval: int = 100  # steps; 0: only at the start and the end
    eval_tokens: int = 32768  # validation tokens per periodic evaluation; 0: the whole split
    final_eval_tokens: int = 0  # for the final val/test perplexity; 0: the whole split
    # --- run
    seed: int = 0
    time_limit: float = 0.0  # seconds of training (with periodic evals) in this process; 0: none
    fit_to_time_limit: bool = False  # shorten the schedule so that it ends within time_limit
    out_dir: str = "runs/train"
    resume: bool = False  # continue from out_dir/checkpoint.pt if there is one
    checkpoint_interval: int = 0  # steps; 0: at every evaluation
    log_interval: int = 10
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # torch intra-op threads (process-wide); 0: leave torch's default
    autocast: str = "auto"  # auto (bf16 where measured faster), bf16, fp32
    save_dtype: str = "bfloat16"  # weights' dtype in the Hugging Face directory
    progress: bool = True

    # Fields that may differ when resuming (they do not change what is computed, or extend the run).
    RUN_FIELDS = (
        "time_limit",
        "fit_to_time_limit",
        "out_dir",
        "resume",
        "checkpoint_interval",
        "log_interval",
        "eval_interval",
        "eval_tokens",
        "final_eval_tokens",
        "progress",
        "device",
        "threads",
        "save_dtype",
        "max_steps",
        "max_tokens",
        "test_data",
    )

    @property
    def batch_size(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def micro_batch(self) -> int:
        if self.micro_batch_size > 0:
            return self.micro_batch_size
        want = max(1, 1024 // self.seq_len)
        return max(d for d in range(1, min(want, self.batch_size) + 1) if self.batch_size % d == 0)

    @property
    def total_steps(self) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return math.ceil(self.max_tokens / self.batch_tokens)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"train config: {message}")

        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "seq_len",
        ):
            need(getattr(self, name) > 0, f"{name} must be > 0")
        need(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
        need(
            self.head_dim > 0 or self.hidden_size % self.num_heads == 0,
            "hidden_size must be a multiple of num_heads (or set head_dim)",
        )
        need(
            self.batch_tokens >= self.seq_len and self.batch_tokens % self.seq_len == 0,
            f"batch_tokens ({self.batch_tokens}) must be a positive multiple of seq_len ({self.seq_len})",
        )
        need(
            self.batch_size % self.micro_batch == 0,
            f"micro_batch_size ({self.micro_batch}) must divide the sequences per step ({self.batch_size})",
        )
        need(self.max_steps > 0 or self.max_tokens > 0, "set max_steps or max_tokens")
        need(self.seq_len <= self.max_position_embeddings, "seq_len must be <= max_position_embeddings")
        need(0 <= self.min_lr <= self.lr, "need 0 <= min_lr <= lr")
        need(
            self.warmup_steps >= 0 and self.grad_clip >= 0 and self.weight_decay >= 0,
            "warmup_steps, grad_clip and weight_decay must be >= 0",
        )
        need(
            self.autocast in ("auto", "bf16", "fp32"),
            f"autocast must be auto, bf16 or fp32, not {self.autocast!r}",
        )
        need(not self.fit_to_time_limit or self.time_limit > 0, "fit_to_time_limit needs a time_limit")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
        return cls(**{**base, **overrides})

    def model_config(self, tokenizer) -> ModelConfig:
        """The Llama ``ModelConfig`` of this shape, with the tokenizer's vocabulary and special ids."""
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        return ModelConfig.from_dict(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": len(tokenizer),
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": head_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            source="train config",
        )


# Presets. Parameter counts are with the 8192-token built-in tokenizer (tied embeddings):
#   py-target  15.7M (12.6M non-embedding)   py-draft  3.1M (1.6M non-embedding)   tiny 0.11M (vocab 512)
PRESETS: dict[str, dict[str, Any]] = {
    "py-target": dict(
        hidden_size=384,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1024,
        vocab_size=8192,
        seq_len=256,
        batch_tokens=8192,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        max_steps=2000,
        eval_interval=250,
        eval_tokens=32768,
        checkpoint_interval=50,
        out_dir="runs/py-target",
    ),
    "py-draft": dict(
        hidden_size=192,
        num_layers=4,
        num_heads=3,
        num_kv_heads=1,
        intermediate_size=512,
        vocab_size=8192,
        seq_len=256,
        batch_tokens=8192,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        max_steps=2000,
        eval_interval=250,
        eval_tokens=32768,
        checkpoint_interval=50,
        out_dir="runs/py-draft",
    ),
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=256,
        seq_len=64,
        batch_tokens=2048,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        max_steps=300,
        eval_interval=100,
        eval_tokens=8192,
        final_eval_tokens=32768,
        out_dir="runs/tiny",
    ),
}


# --------------------------------------------------------------------------- objectives


@runtime_checkable
class Objective(Protocol):
    """What a :class:`Trainer` minimises.

    ``parameters(model)``: the (name, parameter) pairs to train; anything else stays frozen (a Medusa
    objective returns only its heads). ``loss(model, batch)``: a scalar to minimise, mean over the
    batch's predicted tokens. A distillation objective keeps its (frozen) target model itself.
    """

    name: str

    def parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]: ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


class NextTokenLoss:
    """Mean next-token cross-entropy of ``model.forward_dense`` (the usual language-model loss)."""

    name = "next-token-ce"

    def parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model.forward_dense(batch.input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten())


# --------------------------------------------------------------------------- helpers


def init_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) for embeddings and linear weights, std / sqrt(2 * layers) for the projections
    that write into the residual stream (o_proj, down_proj), zero biases, ones for the norms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = std / math.sqrt(2 * max(1, model.config.num_layers))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(param.shape)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                value = torch.empty(param.shape).normal_(0.0, s, generator=gen)
            param.copy_(value)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed_tokens.weight.numel() if hasattr(model, "embed_tokens") else 0
    if getattr(model, "lm_head", None) is not None:
        embed += model.lm_head.weight.numel()
    return {"parameters": total, "non_embedding_parameters": total - embed}


def choose_autocast(device: torch.device, requested: str = "auto") -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for plain float32, why). "auto": bf16 only where it measures faster."""
    if requested == "fp32":
        return None, "float32 (requested)"
    if requested == "bf16":
        return torch.bfloat16, "bf16 autocast (requested)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (CUDA device with bf16 support)"
        return None, "float32 (this CUDA device has no bf16)"
    if device.type == "cpu":
        from slimlm.model.dtype import fastest_dtype

        fastest = fastest_dtype("cpu")
        if fastest == torch.bfloat16:
            return torch.bfloat16, "bf16 autocast (bf16 matmul measured faster than float32 on this CPU)"
        name = str(fastest).removeprefix("torch.")
        return None, f"float32 (measured fastest matmul dtype on this CPU: {name}; bf16 would be slower)"
    return None, f"float32 (no autocast on {device.type})"


_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory instead of returning it to the OS after every large tensor.

    By default glibc serves allocations over 32 MiB (logits, MLP activations of a micro batch) with a
    fresh ``mmap`` each time, and on some VMs the page faults to touch that memory again cost more than
    the arithmetic (measured 3x slower elementwise ops on 128 MiB tensors). Raising the mmap and trim
    thresholds makes such blocks reused from the heap. Process-wide; glibc on Linux only; returns
    whether it was applied.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok = ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1  # a C int: at most 2 GiB - 1
        ok = ok and libc.mallopt(m_top_pad, 64 << 20) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_tokenizer(config: TrainConfig):
    if config.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.tokenizer)
    from slimlm.data.tokenizer import default_tokenizer

    return default_tokenizer(config.vocab_size)


@dataclass
class _State:
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # optimizer steps only
    wall_seconds: float = 0.0  # fit() wall time, evaluations and checkpoints included, over all runs
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- trainer


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
            checkpoint = torch.load(self.out_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
            config = self._merge_resumed_config(config, checkpoint)
        self.config = config
        self.objective = objective or NextTokenLoss()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config)
        self.model_config = config.model_config(self.tokenizer)
        if model is None:
            model = CausalLM(self.model_config, REFERENCE_OPS)
            init_weights(model, config.seed, config.init_std)
        self.model = model.to(self.device)
        self.autocast_dtype, self.autocast_reason = choose_autocast(self.device, config.autocast)
        if self.device.type == "cpu" and tune_cpu_allocator():
            logger.debug("glibc malloc tuned to reuse large blocks (see tune_cpu_allocator)")
        self.optimizer = self._make_optimizer()
        self.state = _State(total_steps=config.total_steps)
        torch.manual_seed(config.seed)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._tokens: dict[str, torch.Tensor] = {}
        self._run_start: float | None = None

    def _wall_seconds(self) -> float:
        run = time.perf_counter() - self._run_start if self._run_start is not None else 0.0
        return round(self.state.wall_seconds + run, 3)

    # ----------------------------------------------------------------- setup

    @staticmethod
    def _merge_resumed_config(config: TrainConfig, checkpoint: dict[str, Any]) -> TrainConfig:
        saved = TrainConfig.from_dict(checkpoint["train_config"])
        different = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if f.name not in TrainConfig.RUN_FIELDS and getattr(saved, f.name) != getattr(config, f.name)
        ]
        if different:
            detail = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(config, n)!r}" for n in different)
            raise ValueError(
                f"cannot resume {config.out_dir}: the checkpoint was trained with other settings ({detail}); "
                f"use the same settings or another out_dir"
            )
        if saved.total_steps != config.total_steps:
            logger.warning(
                "resuming with %d total steps instead of %d: the learning-rate schedule changes from here",
                config.total_steps,
                saved.total_steps,
            )
        return config

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, param in self.objective.parameters(self.model):
            (no_decay if param.dim() < 2 or name.endswith(".bias") else decay).append(param)
        self.trainable = decay + no_decay
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs: dict[str, Any] = {}
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(
            groups, lr=self.config.lr, betas=(self.config.beta1, self.config.beta2), eps=1e-8, **kwargs
        )

    def tokens(self, split: str) -> torch.Tensor:
        """The token stream of the config's ``train``/``val``/``test`` source (int32, on the CPU)."""
        if split not in self._tokens:
            source = {
                "train": self.config.train_data,
                "val": self.config.val_data,
                "test": self.config.test_data,
            }
            self._tokens[split] = as_tensor(load_tokens(source[split], self.tokenizer))
        return self._tokens[split]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": _CHECKPOINT_VERSION,
            "train_config": self.config.to_dict(),
            "objective": self.objective.name,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": self.state.train_seconds,
            "wall_seconds": self._wall_seconds(),
            "total_steps": self.state.total_steps,
            "history": self.state.history,
            "torch_rng": torch.get_rng_state(),
        }
        path = self.out_dir / CHECKPOINT_NAME
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", dir=self.out_dir)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"{self.out_dir / CHECKPOINT_NAME}: unsupported checkpoint version {ckpt.get('version')}")
        if ckpt.get("objective") != self.objective.name:
            raise ValueError(
                f"the checkpoint was trained with objective {ckpt.get('objective')!r}, not {self.objective.name!r}"
            )
        if ckpt.get("tokenizer_fingerprint") != tokenizer_fingerprint(self.tokenizer):
            raise ValueError("the checkpoint was trained with another tokenizer")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        total_steps = int(ckpt["total_steps"])  # may have been shortened by fit_to_time_limit
        if TrainConfig.from_dict(ckpt["train_config"]).total_steps != self.config.total_steps:
            total_steps = self.config.total_steps  # a new budget (see _merge_resumed_config)
        self.state = _State(
            step=int(ckpt["step"]),
            tokens_seen=int(ckpt["tokens_seen"]),
            train_seconds=float(ckpt["train_seconds"]),
            wall_seconds=float(ckpt.get("wall_seconds", 0.0)),
            total_steps=total_steps,
            history=list(ckpt["history"]),
        )
        torch.set_rng_state(ckpt["torch_rng"])
        logger.info("resumed %s at step %d (%d tokens seen)", self.out_dir, self.state.step, self.state.tokens_seen)

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, split: str = "val", max_tokens: int = 0) -> dict[str, float]:
        """Mean next-token NLL (nats) and perplexity over non-overlapping windows of ``split``."""
        tokens = self.tokens(split)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in eval_windows(tokens, self.config.seq_len, self.config.micro_batch, max_tokens):
                batch = batch.to(self.device)
                with self._autocast():
                    logits = self.model.forward_dense(batch.input_ids)
                nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="sum")
                total += float(nll)
                count += batch.num_tokens
        finally:
            self.model.train(was_training)
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}

    # ----------------------------------------------------------------- training

    @property
    def warmup_steps(self) -> int:
        """``config.warmup_steps``, at most a fifth of the schedule (matters for schedules fitted to time)."""
        return min(self.config.warmup_steps, max(1, self.state.total_steps // 5))

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step at index ``step``; returns (mean loss, gradient norm before clipping, lr)."""
        cfg = self.config
        lr = lr_at(
            step,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.state.total_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(self.tokens("train"), cfg.seq_len, cfg.batch_size, cfg.seed, step)
        micro = batch.split(cfg.micro_batch)
        loss_sum = 0.0
        for mb in micro:
            mb = mb.to(self.device)
            with self._autocast():
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

    def _log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def _eval_and_record(self, train_loss: float | None) -> dict[str, Any]:
        result = self.evaluate("val", self.config.eval_tokens)
        record = {
            "event": "eval",
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            "val_loss": result["loss"],
            "val_ppl": result["ppl"],
            "val_tokens": result["tokens"],
            "train_loss": train_loss,
        }
        self.state.history.append(record)
        self._log(record)
        logger.info(
            "step %d: val loss %.4f, ppl %.2f (%d tokens)%s",
            self.state.step,
            result["loss"],
            result["ppl"],
            result["tokens"],
            f", train loss {train_loss:.4f}" if train_loss is not None else "",
        )
        return record

    def _fit_schedule(self, step_seconds: float, eval_seconds: float, start: float) -> None:
        """Set the schedule's length so that it ends within this run's time limit (at most the config's)."""
        cfg = self.config
        remaining = cfg.time_limit - (time.perf_counter() - start)
        # Reserve the final evaluations and the save: about three periodic evaluations' worth, plus 5 %.
        remaining = remaining * 0.95 - 3 * eval_seconds
        per_step = step_seconds + (eval_seconds / cfg.eval_interval if cfg.eval_interval else 0.0)
        fitted = min(cfg.total_steps, self.state.step + max(1, int(remaining / per_step)))
        if abs(fitted - self.state.total_steps) > 0.01 * self.state.total_steps:
            logger.info(
                "fit_to_time_limit: %.2fs/step, %.1fs/eval -> schedule of %d steps (was %d)",
                step_seconds,
                eval_seconds,
                fitted,
                self.state.total_steps,
            )
        self.state.total_steps = fitted

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule, then evaluate, save and return the metrics (:meth:`finish`).

        A run stopped by ``time_limit`` also finishes (its ``training.json`` says ``"completed": false``;
        resume it with ``resume=True``). ``stop_at`` stops before optimizer step ``stop_at`` (for tests and
        staged runs): the checkpoint is saved and the metrics so far are returned, without finishing.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.config
        self._run_start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.out_dir / CONFIG_NAME, cfg.to_dict())
        counts = count_parameters(self.model)
        logger.info(
            "training %s: %.2fM parameters (%.2fM non-embedding), vocab %d, %d steps x %d tokens, "
            "device %s, %s, %d threads",
            self.objective.name,
            counts["parameters"] / 1e6,
            counts["non_embedding_parameters"] / 1e6,
            self.model_config.vocab_size,
            self.state.total_steps,
            cfg.batch_tokens,
            self.device,
            self.autocast_reason,
            torch.get_num_threads(),
        )
        self.tokens("train")
        self.tokens("val")
        start = time.perf_counter()
        run_tokens, run_seconds = 0, 0.0
        stopped_by = None
        last_loss: float | None = None
        eval_seconds = 0.0
        if self.state.step == 0 and not self.state.history:
            t0 = time.perf_counter()
            self._eval_and_record(None)
            eval_seconds = time.perf_counter() - t0
        fit_to_time = cfg.fit_to_time_limit and cfg.time_limit > 0
        step_times: list[float] = []
        self.model.train()
        bar = tqdm(
            total=self.state.total_steps,
            initial=self.state.step,
            disable=not cfg.progress,
            unit="step",
            dynamic_ncols=True,
            desc=Path(cfg.out_dir).name,
        )
        ema_tps = None
        try:
            with logging_redirect_tqdm():
                while self.state.step < self.state.total_steps:
                    if stop_at is not None and self.state.step >= stop_at:
                        stopped_by = "stop_at"
                        break
                    # Stop when the next step (at the median step time so far) would end past the limit.
                    next_step = sorted(step_times)[len(step_times) // 2] if step_times else 0.0
                    if cfg.time_limit > 0 and time.perf_counter() - start + next_step > cfg.time_limit:
                        stopped_by = "time_limit"
                        break
                    t0 = time.perf_counter()
                    loss, grad_norm, lr = self.train_step(self.state.step)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t0
                    if not math.isfinite(loss):
                        raise RuntimeError(f"loss is {loss} at step {self.state.step}; lower the learning rate")
                    self.state.step += 1
                    self.state.tokens_seen += cfg.batch_tokens
                    self.state.train_seconds += dt
                    run_tokens += cfg.batch_tokens
                    run_seconds += dt
                    step_times.append(dt)
                    last_loss = loss
                    tps = cfg.batch_tokens / dt
                    ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{ema_tps:.0f}", refresh=False)
                    if cfg.log_interval and self.state.step % cfg.log_interval == 0:
                        self._log(
                            {
                                "event": "train",
                                "step": self.state.step,
                                "loss": loss,
                                "lr": lr,
                                "grad_norm": grad_norm,
                                "tokens_per_second": tps,
                                "tokens_seen": self.state.tokens_seen,
                            }
                        )
                    # Fit the schedule to the time limit after 3 steps, then again every 20 steps.
                    if fit_to_time and (len(step_times) == 3 or len(step_times) % 20 == 0):
                        if not eval_seconds and cfg.eval_interval:
                            t0 = time.perf_counter()
                            self.evaluate("val", cfg.eval_tokens)
                            eval_seconds = time.perf_counter() - t0
                        recent = sorted(step_times[1:][-20:])
                        self._fit_schedule(recent[len(recent) // 2], eval_seconds, start)
                        bar.total = self.state.total_steps
                    done = self.state.step >= self.state.total_steps
                    if done or (cfg.eval_interval and self.state.step % cfg.eval_interval == 0):
                        t0 = time.perf_counter()
                        self._eval_and_record(loss)
                        eval_seconds = time.perf_counter() - t0
                        if not cfg.checkpoint_interval:
                            self.save_checkpoint()
                    if cfg.checkpoint_interval and self.state.step % cfg.checkpoint_interval == 0:
                        self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            logger.warning("interrupted at step %d; saving a checkpoint to resume from", self.state.step)
            self.save_checkpoint()
            raise
        bar.close()
        self.save_checkpoint()
        completed = self.state.step >= self.state.total_steps
        metrics = self._metrics(completed, stopped_by, run_tokens, run_seconds, last_loss)
        if stopped_by == "stop_at":
            return metrics
        if stopped_by == "time_limit":
            logger.warning(
                "time limit reached at step %d of %d: saving the model so far (resume with --resume)",
                self.state.step,
                self.state.total_steps,
            )
        return self.finish(metrics)

    def _metrics(self, completed, stopped_by, run_tokens, run_seconds, last_loss) -> dict[str, Any]:
        import transformers

        return {
            "config": self.config.to_dict(),
            "model_config": _hf_config(self.model_config),
            "objective": self.objective.name,
            **count_parameters(self.model),
            "tokenizer": {
                "vocab_size": len(self.tokenizer),
                "fingerprint": tokenizer_fingerprint(self.tokenizer),
                "source": self.config.tokenizer or f"default_tokenizer({self.config.vocab_size})",
            },
            "data_tokens": {k: len(v) for k, v in self._tokens.items()},
            "steps": self.state.step,
            "total_steps": self.state.total_steps,
            "completed": completed,
            "stopped_by": stopped_by,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            "wall_seconds": self._wall_seconds(),
            "run_tokens_per_second": run_tokens / run_seconds if run_seconds else None,
            "final_train_loss": last_loss,
            "device": str(self.device),
            "autocast": self.autocast_reason,
            "threads": torch.get_num_threads(),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
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
            data_tokens={k: len(v) for k, v in self._tokens.items()},
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
        _write_json(hf_dir / "training.json", metrics)
        _write_json(self.out_dir / "training.json", metrics)
        logger.info("saved %s and %s", hf_dir, self.out_dir / "training.json")
        return metrics


def _hf_config(config: ModelConfig) -> dict[str, Any]:
    from slimlm.model.saver import hf_config_dict

    return hf_config_dict(config)
