"""Byte-level BPE tokenizers trained offline, and the built-in default tokenizer.

:func:`train_tokenizer` trains a GPT-2 style byte-level BPE with the ``tokenizers`` library: the
ByteLevel pre-tokenizer (GPT-2 split regex, ``add_prefix_space=False``) maps every UTF-8 byte to a
symbol, so any string round-trips exactly::

    tok.decode(tok.encode(s, add_special_tokens=False)) == s

There is no normalizer and no unknown token.  Special tokens, with fixed ids at the start of the
vocabulary::

    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>

``tok(text)`` / ``tok.encode(text)`` prepend ``<|bos|>`` (Llama style); pass
``add_special_tokens=False`` for raw ids.  Chat format (the tokenizer's Jinja chat template)::

    <|bos|><|system|>You are terse.<|eos|><|user|>Hi<|eos|><|assistant|>Hello!<|eos|>

and with ``add_generation_prompt=True`` the rendering ends with ``<|assistant|>``, so generation
stops at ``<|eos|>``.

:func:`default_tokenizer` trains on the stdlib *train* split (see :mod:`slimlm.data.corpus`) and
caches the result under ``~/.cache/slimlm/tokenizers/<key>`` (or ``$SLIMLM_CACHE_DIR/tokenizers``).
Training on the whole train split (~11.6 MB of text on Python 3.11) takes about 3 s on two cores,
so no subset is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "cache_dir",
    "default_tokenizer",
    "default_tokenizer_path",
    "train_tokenizer",
]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
_DEFAULT_VOCAB = 8192


def _batches(texts: Iterable[str], batch: int = 64) -> Iterator[list[str]]:
    if isinstance(texts, str):
        texts = [texts]
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = _DEFAULT_VOCAB,
    *,
    min_frequency: int = 2,
    max_token_length: int | None = 32,
    add_bos: bool = True,
    model_max_length: int = 1 << 20,
):
    """Train a byte-level BPE tokenizer on ``texts`` (an iterable of documents, or one string).

    Returns a ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad set, the chat markers as
    additional special tokens and :data:`CHAT_TEMPLATE` as its chat template.  ``vocab_size``
    counts the 6 special tokens and the 256 byte symbols, so it must be at least 262; the result
    can be smaller when the text has too few distinct pairs.  The same input gives the same
    tokenizer.  ``max_token_length`` caps merged tokens (in characters); ``add_bos`` makes
    ``tok(text)`` prepend ``<|bos|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + 6 specials), got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- default tokenizer


def cache_dir() -> Path:
    """Cache root: ``$SLIMLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/slimlm``, else ``~/.cache/slimlm``."""
    env = os.environ.get("SLIMLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "slimlm"


def _default_key(vocab_size: int) -> str:
    import tokenizers

    from slimlm.data.corpus import stdlib_files, stdlib_root

    root = stdlib_root()
    h = hashlib.sha256()
    for p in stdlib_files("train"):
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
    py = ".".join(str(v) for v in sys.version_info[:3])
    return f"stdlib-bpe{vocab_size}-py{py}-{h.hexdigest()[:12]}-tok{tokenizers.__version__}"


def default_tokenizer_path(vocab_size: int = _DEFAULT_VOCAB) -> Path:
    """Directory where :func:`default_tokenizer` caches the tokenizer for ``vocab_size``."""
    return cache_dir() / "tokenizers" / _default_key(vocab_size)


def default_tokenizer(vocab_size: int = _DEFAULT_VOCAB):
    """The built-in tokenizer: :func:`train_tokenizer` on the stdlib train split, cached on disk.

    The first call for a given vocabulary size trains (a few seconds) and writes the cache
    atomically (temporary directory + rename); later calls, in any process, load it.
    """
    from transformers import AutoTokenizer

    path = default_tokenizer_path(vocab_size)
    if not (path / "tokenizer.json").is_file():
        from slimlm.data.corpus import iter_documents

        tok = train_tokenizer(iter_documents("train"), vocab_size=vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            tok.save_pretrained(tmp)
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "tokenizer.json").is_file():  # not a lost race: a stale/broken entry
                    shutil.rmtree(path, ignore_errors=True)
                    os.rename(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path)
