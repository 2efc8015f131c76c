"""Calibration batches: ``[sequences, seq_len]`` token ids drawn from a text corpus.

Sequences are windows at evenly spaced offsets across the whole text (each starting at a line start),
so a small budget still sees every part of the corpus rather than its first files; they are then put in
a seeded random order, so any prefix of them (AWQ's search samples) is a spread too. Only the windows are
tokenized, not the corpus. Each starts with the tokenizer's BOS token when it has one, like the model's
training documents.

Defaults: on CPU 64 x 512 tokens (32k: GPTQ's statistics settle by then and a 135M model calibrates in a
couple of minutes); on CUDA 128 x 2048 (the GPTQ/AWQ papers' budget). ``seq_len`` is clamped to the
model's ``max_position_embeddings``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from slimlm.data.corpus import load_text

__all__ = ["CalibrationConfig", "calibration_ids", "calibration_shape"]

logger = logging.getLogger(__name__)

DEFAULTS = {"cpu": (64, 512), "cuda": (128, 2048)}
_CHARS_PER_TOKEN_GUESS = 6  # generous for code-like text; windows that come up short are re-read longer


@dataclass
class CalibrationConfig:
    source: str = "stdlib"  # "stdlib" (its train split), a text file or directory, or hf:NAME[:CONFIG]
    tokens: int | None = None  # total tokens; None: the device's default
    seq_len: int | None = None  # None: the device's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"calibration: tokens must be > 0, not {self.tokens}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"calibration: seq_len must be >= 2, not {self.seq_len}")


def calibration_shape(config: CalibrationConfig, device_type: str, max_positions: int) -> tuple[int, int]:
    """(sequences, seq_len) for ``config`` on ``device_type``."""
    default_seqs, default_len = DEFAULTS.get(device_type, DEFAULTS["cpu"])
    seq_len = min(config.seq_len or default_len, max_positions)
    tokens = config.tokens or default_seqs * default_len
    return max(1, tokens // seq_len), seq_len


def calibration_ids(tokenizer, config: CalibrationConfig, device_type: str, max_positions: int) -> torch.Tensor:
    """``[sequences, seq_len]`` int64 token ids; see the module docstring."""
    num_seqs, seq_len = calibration_shape(config, device_type, max_positions)
    source = "stdlib-train" if config.source == "stdlib" else config.source
    text = load_text(source)
    if not text.strip():
        raise ValueError(f"calibration: source {config.source!r} holds no text")
    bos = getattr(tokenizer, "bos_token_id", None)
    need = seq_len - (bos is not None)
    span = need * _CHARS_PER_TOKEN_GUESS
    stride = max(1, (len(text) - span) // num_seqs)
    if stride < span:
        logger.warning("calibration: %s is short for %d x %d tokens; windows overlap", config.source, num_seqs, seq_len)
    rows = []
    for i in range(num_seqs):
        start = i * stride
        if start:  # begin at a line start rather than inside a token
            newline = text.find("\n", start, start + span)
            start = newline + 1 if newline >= 0 else start
        ids = _encode_window(tokenizer, text, start, span, need)
        rows.append(([bos] if bos is not None else []) + ids)
    order = torch.randperm(num_seqs, generator=torch.Generator().manual_seed(config.seed))
    return torch.tensor(rows, dtype=torch.long)[order]


def _encode_window(tokenizer, text: str, start: int, span: int, need: int) -> list[int]:
    while True:
        piece = text[start : start + span]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(ids) > need:  # the last token may be cut mid-word; keep only complete ones
            return ids[:need]
        if start + span >= len(text):
            if start == 0:
                raise ValueError(f"calibration: the text has only {len(ids)} tokens; {need} are needed per sequence")
            start = max(0, len(text) - 2 * span)  # near the end: read backwards from it instead
        span *= 2
