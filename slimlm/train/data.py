"""Token streams for training: a corpus tokenized once, cached as ``.npy``, and cut into windows.

Stream layout: every document becomes ``<bos> ids(document) <eos>`` and the documents are concatenated
in corpus order. Documents are the stdlib files for the ``stdlib-*`` sources (see
:mod:`slimlm.data.corpus`); any other source (a file, a directory, ``hf:...``) is one document. Long
documents are encoded in pieces (so the tokenizer runs in parallel), cut after a newline followed by a
non-space character: the byte-level pre-tokenizer never makes a token across such a point, so the ids
are those of the whole document.

Cache: ``<cache_dir>/tokens/<source>-<key>.npy`` (uint16 when the vocabulary fits, else int32), where
``key`` hashes the tokenizer's JSON, the documents' text and the layout version, so a change to any of
them re-tokenizes. Written atomically; loaded memory-mapped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimlm.data.tokenizer import cache_dir

__all__ = [
    "Batch",
    "documents",
    "eval_windows",
    "load_tokenizer",
    "load_tokens",
    "sample_batch",
    "tokenizer_fingerprint",
]

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = "bos-doc-eos-v1"
_PIECE_CHARS = 1 << 16


@dataclass
class Batch:
    """``input_ids`` and next-token ``labels``, both ``[B, L]`` int64 (``labels[:, t] = ids[t + 1]``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))

    def split(self, size: int) -> list[Batch]:
        return [Batch(i, lab) for i, lab in zip(self.input_ids.split(size), self.labels.split(size), strict=True)]


def load_tokenizer(path: str, vocab_size: int):
    """The tokenizer in directory ``path``, or the built-in one of ``vocab_size`` tokens when ``path`` is empty."""
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from slimlm.data.tokenizer import default_tokenizer

    return default_tokenizer(vocab_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's full definition (vocabulary, merges, special tokens, pipeline)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def documents(source: str) -> list[str]:
    """The documents of a corpus source (see :func:`slimlm.data.corpus.load_text` for the sources)."""
    from slimlm.data.corpus import iter_documents, load_text

    if source in ("stdlib-train", "stdlib-validation", "stdlib-test") and not Path(source).exists():
        return list(iter_documents(source[len("stdlib-") :]))
    return [load_text(source)]


_CUT = re.compile(r"\n(?=\S)")


def _pieces(text: str) -> list[str]:
    """``text`` cut into pieces of at least ``_PIECE_CHARS`` characters (joined, they give it back)."""
    pieces, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + _PIECE_CHARS)
        end = len(text) if cut is None else cut.end()
        pieces.append(text[start:end])
        start = end
    return pieces


def _encode(docs: list[str], tokenizer) -> np.ndarray:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    pieces: list[str] = []
    owner: list[int] = []
    for d, doc in enumerate(docs):
        for piece in _pieces(doc):
            pieces.append(piece)
            owner.append(d)
    # One batch call: the tokenizers library spreads it over the cores.
    encoded = tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
    per_doc: list[list[int]] = [[] for _ in docs]
    for d, enc in zip(owner, encoded, strict=True):
        per_doc[d].extend(enc.ids)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    out = [np.asarray(head + ids + tail, dtype=dtype) for ids in per_doc]
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_")[-60:] or "corpus"


def load_tokens(source: str, tokenizer, *, cache: bool = True) -> np.ndarray:
    """The token stream of ``source`` (1-D uint16/int32), from the cache when it is there."""
    docs = documents(source)
    h = hashlib.sha256(f"{_LAYOUT_VERSION}\0{tokenizer_fingerprint(tokenizer)}\0".encode())
    for doc in docs:
        h.update(doc.encode("utf-8", "surrogatepass") + b"\0\1")
    path = cache_dir() / "tokens" / f"{_slug(source)}-{h.hexdigest()[:16]}.npy"
    if cache and path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            logger.warning("token cache %s is unreadable (%s); tokenizing again", path, e)
    chars = sum(len(d) for d in docs)
    logger.info("tokenizing %s (%d documents, %.1fM characters) ...", source, len(docs), chars / 1e6)
    tokens = _encode(docs, tokenizer)
    logger.info("%s: %d tokens (%.2f characters per token)", source, len(tokens), chars / max(len(tokens), 1))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, tokens)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return tokens


def as_tensor(tokens: np.ndarray) -> torch.Tensor:
    """The stream as an int32 tensor (uint16 has no torch equivalent that indexes well)."""
    return torch.from_numpy(np.asarray(tokens, dtype=np.int32))


def sample_batch(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, step: int) -> Batch:
    """``batch_size`` random contiguous windows of ``seq_len + 1`` tokens, a pure function of (seed, step).

    Depending only on the step (not on a generator's history) makes a resumed run see exactly the
    batches an uninterrupted one would.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the training stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = torch.from_numpy(rng.integers(0, len(tokens) - seq_len, size=batch_size))
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return Batch(windows[:, :-1], windows[:, 1:])


def eval_windows(tokens: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int = 0) -> Iterator[Batch]:
    """Non-overlapping windows covering the stream: each token after the first is predicted exactly once.

    ``max_tokens`` > 0 evaluates only the first ``max_tokens`` predicted tokens. The last window may be
    shorter than ``seq_len`` (it is yielded alone).
    """
    n = len(tokens) - 1
    if max_tokens > 0:
        n = min(n, max_tokens)
    full = n // seq_len
    if full:
        windows = tokens[: full * seq_len + 1]
        idx = torch.arange(full)[:, None] * seq_len + torch.arange(seq_len + 1)
        for rows in idx.split(batch_size):
            w = windows[rows].long()
            yield Batch(w[:, :-1], w[:, 1:])
    rest = n - full * seq_len
    if rest > 0:
        w = tokens[full * seq_len : full * seq_len + rest + 1].long()[None]
        yield Batch(w[:, :-1], w[:, 1:])
