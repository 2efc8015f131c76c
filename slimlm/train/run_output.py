"""Writing the files of a run directory: atomically replaced files and an appended JSON-lines log.

A run directory (``TrainConfig.out_dir``)::

    out/
      train_config.json   # the TrainConfig (``slimlm train --resume`` starts from it)
      checkpoint.pt       # model + optimizer + step + RNG state (torch.save of plain tensors/containers)
      log.jsonl           # one JSON record per log interval and per evaluation
      training.json       # final metrics: config, steps, tokens, wall time, val/test perplexity
      model/              # the Hugging Face checkpoint (save_pretrained), with a copy of training.json
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["append_jsonl", "atomic_write", "write_json"]


def _umask() -> int:
    # The only way to read the umask is to set it (and put it back at once).
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """A temporary file next to ``path``, renamed over it when the block succeeds (deleted if it fails).

    An interrupted run (Ctrl-C, time limit of a batch job) thus never leaves a truncated checkpoint.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
