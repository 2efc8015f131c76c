"""The files of a Medusa heads directory: its config, the atomic write, and what is read from the target.

See :mod:`slimlm.train.medusa` for the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CONFIG_FILE",
    "HEADS_SUBDIR",
    "WEIGHTS_FILE",
    "MedusaMismatchError",
    "check_fit",
    "read_medusa_config",
    "read_output_projection",
    "resolve_heads_dir",
    "target_fingerprint",
    "write_heads_dir",
]

CONFIG_FILE = "medusa_config.json"
WEIGHTS_FILE = "medusa_heads.safetensors"
FORMAT = "slimlm-medusa"
FORMAT_VERSION = 1
HEADS_SUBDIR = "heads"  # where `slimlm train medusa --out DIR` puts them


class MedusaMismatchError(ValueError):
    """Heads that cannot run on the given target (another hidden size or vocabulary), or a malformed heads dir."""


def target_fingerprint(target: nn.Module) -> str:
    """A short hash of a strided sample of every floating-point parameter, rounded to bfloat16.

    Sampling keeps it cheap for billion-parameter targets while any retraining still changes it; the
    bfloat16 rounding makes a bf16 checkpoint loaded as float32 hash like the same checkpoint loaded as bf16.
    """
    h = hashlib.sha256()
    for name, p in sorted(target.named_parameters()):
        if not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)}\0".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_fit(directory: Path, config: dict, vocab_size: int, hidden_size: int, what: str, trained_on: dict) -> None:
    have = {"hidden_size": hidden_size, "vocab_size": vocab_size}
    problems = [f"{key} {config[key]} (target: {have[key]})" for key in have if config[key] != have[key]]
    if problems:
        raise MedusaMismatchError(
            f"the Medusa heads in {directory} do not fit {what}: they were trained for "
            f"{', '.join(problems)}, on {trained_on.get('path') or 'an unsaved target'}"
        )


def read_output_projection(target_dir: str | Path | None, heads_dir: Path) -> torch.Tensor:
    """The output projection tensor of the target checkpoint in ``target_dir``, and nothing else of it."""
    from safetensors import safe_open

    from slimlm.model.loader import LoadError, load_config, safetensors_files

    hint = "pass the target model to MedusaHeads.from_pretrained"
    if not target_dir or not Path(target_dir).is_dir():
        raise MedusaMismatchError(
            f"the Medusa heads in {heads_dir} were trained on {target_dir or 'an unsaved target'}, which is not a "
            f"directory here; {hint}"
        )
    target_dir = Path(target_dir)
    try:
        name = "model.embed_tokens.weight" if load_config(target_dir).tie_word_embeddings else "lm_head.weight"
        for file in safetensors_files(target_dir):
            with safe_open(str(file), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
    except LoadError as e:
        raise MedusaMismatchError(f"cannot read the output projection of {target_dir} ({e}); {hint}") from None
    raise MedusaMismatchError(f"{target_dir} has no dense {name} (a compressed checkpoint?); {hint}")


def resolve_heads_dir(directory: str | Path) -> Path:
    """``directory`` itself, or its ``heads/`` when it is a ``slimlm train medusa`` run directory."""
    directory = Path(directory).expanduser()
    if not (directory / CONFIG_FILE).is_file() and (directory / HEADS_SUBDIR / CONFIG_FILE).is_file():
        return directory / HEADS_SUBDIR
    return directory


def read_medusa_config(directory: str | Path) -> dict[str, Any]:
    path = resolve_heads_dir(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedusaMismatchError(f"{path} is missing: not a Medusa heads directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedusaMismatchError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MedusaMismatchError(f"{path} is not a {FORMAT} config")
    if config.get("format_version") != FORMAT_VERSION:
        raise MedusaMismatchError(f"{path}: unsupported format_version {config.get('format_version')}")
    return config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, directory: Path) -> None:
    """Renames ``new`` to ``directory``; an existing one is moved aside first (rename cannot replace a directory)."""
    if not directory.exists():
        os.replace(new, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, old / directory.name)
    try:
        os.replace(new, directory)
    except BaseException:
        os.replace(old / directory.name, directory)  # put the previous heads back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_heads_dir(directory: Path, tensors: dict[str, torch.Tensor], files: dict[str, Any]) -> Path:
    """Writes ``tensors`` and the JSON ``files`` into a temporary sibling, then renames it to ``directory``."""
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
