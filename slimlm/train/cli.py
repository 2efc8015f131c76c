"""``slimlm train``: train a small Llama-architecture model on the stdlib corpus (or any text).

Every :class:`~slimlm.train.config.TrainConfig` field is a flag (``--hidden-size``, ``--lr``, ...) on
top of a ``--preset``; ``--resume`` continues the run in ``--out`` from its checkpoint (its saved
config is the base then, so only the flags given change: time limit, step budget, ...).
``slimlm train medusa TARGET --out DIR`` trains Medusa heads on a frozen target instead (:mod:`.medusa_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from slimlm.train.config import CONFIG_NAME, PRESETS, TrainConfig
from slimlm.train.trainer import Trainer

__all__ = ["add_config_flags", "register", "cmd_train", "config_from_args"]

_HANDLED = {"out_dir", "resume", "time_limit", "max_steps", "progress"}
_ALIASES = {"num_layers": ["--layers"], "num_heads": ["--heads"], "num_kv_heads": ["--kv-heads"]}
_HELP = {
    "head_dim": "0: hidden_size / num_heads",
    "vocab_size": "size of the built-in stdlib BPE tokenizer (ignored with --tokenizer)",
    "tokenizer": "a tokenizer directory instead of the built-in one",
    "train_data": "stdlib-train, a text file/directory, or hf:NAME[:CONFIG]",
    "batch_tokens": "tokens per optimizer step (a multiple of --seq-len)",
    "micro_batch_size": "sequences per forward/backward (0: about 1024 tokens)",
    "max_tokens": "token budget for the schedule (replaces the preset's --max-steps)",
    "warmup_steps": "linear warmup steps (at most a fifth of the schedule)",
    "eval_interval": "validate every N steps (0: only at the start and the end)",
    "eval_tokens": "validation tokens per periodic evaluation (0: the whole split)",
    "final_eval_tokens": "tokens of the final val/test perplexity (0: the whole split)",
    "fit_to_time_limit": "shorten the cosine schedule so that it ends within --time-limit",
    "checkpoint_interval": "save checkpoint.pt every N steps (0: at every evaluation)",
    "threads": "torch threads (0: torch's default; 1 is faster on a busy 2-core machine)",
    "autocast": "auto (bf16 only where measured faster than float32), bf16 or fp32",
    "save_dtype": "dtype of the weights in OUT/model (bfloat16, float16, float32)",
    "device": "auto, cpu or cuda[:N]",
}


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to the ``slimlm`` subcommands."""
    p = subparsers.add_parser(
        "train",
        help="train a small Llama-architecture model from scratch (default corpus: the Python stdlib)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="py-target",
        help="base configuration: py-target (15.7M parameters), py-draft (3.1M), tiny (0.1M, for tests)",
    )
    # Not required=True: `slimlm train medusa ... --out` fills the sub-action's own --out (checked in _needs_out).
    p.add_argument("--out", dest="out_dir", default=None, help="run directory (checkpoint, logs, model/); required")
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training in this run (0: none)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of the whole schedule")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    add_config_flags(p.add_argument_group("training configuration (defaults: the preset's)"), _HANDLED)
    p.set_defaults(func=_needs_out(p, cmd_train))
    from slimlm.train.medusa_cli import register_medusa

    register_medusa(p.add_subparsers(dest="train_action", title="other trainings", metavar="{medusa}"))
    return p


def _needs_out(parser: argparse.ArgumentParser, func):
    def run(a: argparse.Namespace) -> int:
        if a.out_dir is None:
            parser.error("the following arguments are required: --out")
        return func(a)

    return run


def add_config_flags(g, skip: set[str]) -> None:
    """A flag for every :class:`TrainConfig` field not in ``skip`` (default None: the base config's value)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, [])]
        if f.type in (bool, "bool"):
            g.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name)
            )
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            g.add_argument(*flags, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=_HELP.get(f.name))


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The preset (or, with ``--resume``, the run's saved config) updated with the flags that were given."""
    given = {
        f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if getattr(a, f.name, None) is not None
    }
    if "max_tokens" in given and "max_steps" not in given:
        given["max_steps"] = 0  # a token budget replaces the preset's step count
    saved = Path(a.out_dir).expanduser() / CONFIG_NAME
    if a.resume and saved.is_file():
        base: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8"))
        return TrainConfig.from_dict({**base, **given, "resume": True})
    return TrainConfig.preset(a.preset, **given)


def cmd_train(a: argparse.Namespace) -> int:
    config = config_from_args(a)
    if a.json:
        logging.getLogger("slimlm").setLevel(logging.WARNING)
    metrics = Trainer(config).fit()
    if a.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    else:
        print(
            f"{metrics['steps']}/{metrics['total_steps']} steps, {metrics['tokens_seen']} tokens in "
            f"{metrics['train_seconds']:.0f}s: val ppl {metrics['val_ppl']:.3f}, test ppl {metrics['test_ppl']:.3f}; "
            f"model in {metrics['hf_dir']}"
        )
    return 0
