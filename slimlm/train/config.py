"""What defines a training run: :class:`TrainConfig` (saved as ``train_config.json``) and its presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from slimlm.model.config import ModelConfig

__all__ = ["CONFIG_NAME", "PRESETS", "TrainConfig"]

CONFIG_NAME = "train_config.json"


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
        seq_len=1024,
        max_position_embeddings=1024,
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
        seq_len=1024,
        max_position_embeddings=1024,
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
