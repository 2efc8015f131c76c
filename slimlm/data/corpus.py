"""Built-in text corpus: the running interpreter's standard library, plus loaders for user text.

slimlm needs some real text that is always available offline, for tokenizer training, calibration
and perplexity checks.  The Python standard library is on every machine that runs slimlm, so it is
the built-in corpus.

Which files
-----------
Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, except:

* third-party and build directories: ``site-packages``, ``dist-packages``, ``lib-dynload``,
  ``config-*`` and ``__pycache__``;
* test suites: any directory named ``test``, ``tests``, ``idle_test`` or ``test_*`` at any depth
  (this drops the top-level ``test`` package, ``lib2to3/tests``, ``ctypes/test``,
  ``unittest/test``, ``tkinter/test``, ``idlelib/idle_test``, ``distutils/tests`` ...);
* hidden files and directories (name starting with ``.``);
* files that are not valid UTF-8, and files with no non-whitespace content (empty ``__init__.py``).

Files are returned sorted by their POSIX path relative to the stdlib root, so the order is the
same on every run and machine.

Held-out split (by module)
--------------------------
Each file belongs to a *module key*: the first component of its path relative to the stdlib root,
i.e. the top-level package directory (``email``, ``json``, ``asyncio``) or the top-level module
file (``argparse.py``).  All files of one key go to the same split, chosen by a stable hash::

    bucket = int.from_bytes(sha256(("slimlm-stdlib-split-v1:" + key).encode()).digest()[:8], "big") % 100
    bucket <  90 -> "train"
    bucket <  95 -> "validation"
    otherwise    -> "test"

The rule depends only on the module name, so a module keeps its split across Python patch (and
most minor) versions, and validation/test modules never leak into training.  Because whole
packages move together, the file shares are only roughly 90/5/5.

Text
----
``stdlib_text(split)`` joins the files' contents, in the order above, with :data:`SEPARATOR`
(``"\\n\\n"``, a blank line).  Each file's own trailing newlines are kept as they are.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "SEPARATOR",
    "SPLITS",
    "load_text",
    "module_key",
    "iter_documents",
    "split_of",
    "stdlib_files",
    "stdlib_modules",
    "stdlib_root",
    "stdlib_text",
]

SEPARATOR = "\n\n"
"""Joins documents (files) in :func:`stdlib_text` and in :func:`load_text` for directories/lists."""

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}

_SALT = "slimlm-stdlib-split-v1:"
_TRAIN_BUCKETS = 90
_VALIDATION_BUCKETS = 5  # buckets 90..94; 95..99 are test

_SKIP_DIRS = {"site-packages", "dist-packages", "lib-dynload", "__pycache__", "test", "tests", "idle_test"}


def _normalise_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}") from None


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter (outside any virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def module_key(rel_path: str | Path) -> str:
    """Module key of a path relative to the stdlib root: its first component (``email``, ``argparse.py``)."""
    parts = Path(rel_path).parts
    if not parts:
        raise ValueError("empty path")
    return parts[0]


def split_of(key: str) -> str:
    """Split ("train", "validation" or "test") that a module key belongs to; see the module docstring."""
    digest = hashlib.sha256((_SALT + key).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < _TRAIN_BUCKETS:
        return "train"
    if bucket < _TRAIN_BUCKETS + _VALIDATION_BUCKETS:
        return "validation"
    return "test"


def _skip_dir(name: str) -> bool:
    return name in _SKIP_DIRS or name.startswith((".", "test_", "config-"))


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@functools.lru_cache(maxsize=4)
def _scan(root: str) -> tuple[tuple[str, str], ...]:
    """All eligible files under ``root`` as sorted (relative posix path, split) pairs."""
    base = Path(root)
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not _skip_dir(d)]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("."):
                continue
            path = Path(dirpath, name)
            if not path.is_file():
                continue
            text = _read_utf8(path)
            if text is None or not text.strip():
                continue
            rel = path.relative_to(base).as_posix()
            found.append((rel, split_of(module_key(rel))))
    found.sort()
    return tuple(found)


def stdlib_files(split: str = "train") -> list[Path]:
    """Absolute paths of the stdlib files in ``split`` ("train", "validation" or "test"), sorted."""
    split = _normalise_split(split)
    root = stdlib_root()
    return [root / rel for rel, s in _scan(str(root)) if s == split]


def stdlib_modules(split: str = "train") -> list[str]:
    """Sorted module keys that belong to ``split``."""
    split = _normalise_split(split)
    return sorted({module_key(rel) for rel, s in _scan(str(stdlib_root())) if s == split})


def stdlib_text(split: str = "train") -> str:
    """Contents of :func:`stdlib_files` ``(split)`` joined with :data:`SEPARATOR`."""
    parts = []
    for path in stdlib_files(split):
        text = _read_utf8(path)
        if text is not None:
            parts.append(text)
    return SEPARATOR.join(parts)


def _path_text(path: Path) -> str:
    if path.is_file():
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 text: {e}") from None
    if path.is_dir():
        parts = []
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = sub.relative_to(path).parts
            if any(part.startswith(".") or part == "__pycache__" for part in rel):
                continue
            text = _read_utf8(sub)  # binary files are skipped silently
            if text is not None and text.strip():
                parts.append(text)
        if not parts:
            raise ValueError(f"no UTF-8 text files found under {path}")
        return SEPARATOR.join(parts)
    raise FileNotFoundError(f"no such file or directory: {path}")


def _hf_text(spec: str, split: str) -> str:
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"bad Hugging Face dataset source {('hf:' + spec)!r}; expected hf:NAME[:CONFIG]")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            f"source 'hf:{spec}' needs the `datasets` package and internet access to the Hugging Face "
            "hub: pip install datasets (offline, use 'stdlib' or a path to text files instead)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network errors, unknown dataset/config/split ...
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Is the hub reachable? Offline, use 'stdlib' or a local path."
        ) from e
    column = "text" if "text" in ds.column_names else None
    if column is None:
        for col, feature in ds.features.items():
            if getattr(feature, "dtype", None) in ("string", "large_string"):
                column = col
                break
    if column is None:
        raise ValueError(f"dataset {name!r} has no text column (columns: {ds.column_names})")
    return SEPARATOR.join(t for t in ds[column] if t and t.strip())


def load_text(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "train",
    max_chars: int | None = None,
) -> str:
    """Load a text corpus.

    ``source`` is one of:

    * ``"stdlib"`` - the stdlib split named by ``split``;
    * ``"stdlib-train"``, ``"stdlib-validation"``, ``"stdlib-test"`` - that split (``split`` ignored);
    * a path to a UTF-8 text file (read as is) or a directory (every UTF-8 file under it, recursively,
      sorted by path, hidden and binary files skipped, joined with :data:`SEPARATOR`);
    * a list/tuple of such paths (their texts joined with :data:`SEPARATOR`);
    * ``"hf:NAME[:CONFIG]"`` - split ``split`` of a Hugging Face dataset (needs the optional
      ``datasets`` package and network access); its ``text`` column (or first string column) is used.

    ``split`` applies only to the stdlib and Hugging Face sources.  ``max_chars`` truncates the result.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("empty list of sources")
        text = SEPARATOR.join(load_text(s, split=split) for s in source)
    elif isinstance(source, str) and source == "stdlib":
        text = stdlib_text(split)
    elif isinstance(source, str) and source.startswith("stdlib-") and not Path(source).exists():
        text = stdlib_text(source[len("stdlib-") :])
    elif isinstance(source, str) and source.startswith("hf:"):
        hf_split = _SPLIT_ALIASES.get(split, split)
        text = _hf_text(source[3:], hf_split)
    elif isinstance(source, (str, os.PathLike)):
        text = _path_text(Path(source).expanduser())
    else:
        raise TypeError(f"unsupported text source {source!r}")
    if max_chars is not None:
        text = text[:max_chars]
    return text


def iter_documents(split: str = "train") -> Iterable[str]:
    """The stdlib files of ``split`` one by one (same order and filtering as :func:`stdlib_text`)."""
    for path in stdlib_files(split):
        text = _read_utf8(path)
        if text is not None:
            yield text
