"""``slimlm train medusa TARGET --out DIR``: train Medusa heads on a frozen target by self-distillation.

The heads (``--num-heads``, default 4; head k guesses the token k+2 ahead) learn the target's own
distributions on windows of ``--train-data`` (default: the stdlib corpus); OUT/heads is the heads directory
(:class:`slimlm.train.medusa.MedusaHeads`), OUT/training.json says how often each head agrees with the target.
``--time-limit`` fits the cosine schedule to that many seconds. Every optimisation flag of ``slimlm train``
exists here too (defaults: :data:`slimlm.train.medusa_trainer.MEDUSA_DEFAULTS`); the model shape and the
tokenizer are the target's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from slimlm.train.config import CONFIG_NAME, TrainConfig
from slimlm.train.medusa_objective import DEFAULT_GREEDY_WEIGHT

__all__ = ["cmd_medusa", "medusa_overrides", "register_medusa"]

# The target decides these (as flags they could only contradict it), or nothing reads them (no test split).
_FROM_TARGET = {
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "init_std",
    "vocab_size",
    "tokenizer",
    "save_dtype",
    "test_data",
}
_HANDLED = {"out_dir", "resume", "time_limit", "max_steps", "progress"}


def register_medusa(actions) -> argparse.ArgumentParser:
    """Adds ``medusa`` to the sub-actions of ``slimlm train``."""
    from slimlm.train.cli import add_config_flags

    p = actions.add_parser(
        "medusa",
        help="train Medusa heads on a frozen target (self-distillation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="the target model directory (Hugging Face layout, e.g. runs/py-target/model)")
    p.add_argument("--out", dest="out_dir", required=True, help="run directory (checkpoint, logs, heads/)")
    p.add_argument("--num-heads", dest="medusa_heads", type=int, default=4, metavar="K", help="heads (k: t+k+2)")
    p.add_argument(
        "--greedy-weight",
        type=float,
        default=None,
        help="share of the loss that is cross-entropy to the target's greedy token instead of KL to its "
        f"distribution (default {DEFAULT_GREEDY_WEIGHT}; 0: pure KL self-distillation)",
    )
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training; the schedule is fitted to it")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of the whole schedule")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g = p.add_argument_group("training configuration (defaults: MEDUSA_DEFAULTS)")
    add_config_flags(g, _FROM_TARGET | _HANDLED)
    p.set_defaults(func=cmd_medusa)
    return p


def medusa_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the flags set (with ``--resume``: on top of the run's saved settings)."""
    given = {
        f.name: getattr(a, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _FROM_TARGET and getattr(a, f.name, None) is not None
    }
    if "max_tokens" in given and "max_steps" not in given:
        given["max_steps"] = 0  # a token budget replaces the default step count
    if given.get("time_limit") and "fit_to_time_limit" not in given:
        given["fit_to_time_limit"] = True
    saved = Path(a.out_dir).expanduser() / CONFIG_NAME
    if a.resume and saved.is_file():
        # The shape comes from the target again, so that resuming on another target is refused.
        base = {k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k not in _FROM_TARGET}
        given = {**base, **given, "resume": True}
    return given


def cmd_medusa(a: argparse.Namespace) -> int:
    from slimlm.train.medusa_trainer import describe, train_medusa

    if a.json:
        logging.getLogger("slimlm").setLevel(logging.WARNING)
    overrides = medusa_overrides(a)
    overrides.pop("out_dir", None)
    greedy_weight = DEFAULT_GREEDY_WEIGHT if a.greedy_weight is None else a.greedy_weight
    metrics = train_medusa(a.target, a.out_dir, num_heads=a.medusa_heads, greedy_weight=greedy_weight, **overrides)
    if a.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    else:
        val = {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
        print(
            f"{metrics['steps']}/{metrics['total_steps']} steps, {metrics['tokens_seen']} tokens in "
            f"{metrics['train_seconds']:.0f}s: {describe(val)}; heads in {metrics['heads_dir']}"
        )
    return 0
