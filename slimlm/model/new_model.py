"""Random-initialised checkpoints of published model shapes (``slimlm new-model``).

The packaged shapes (``slimlm/model/shapes/*.json``) are the ``config.json`` contents of well-known
open models, without weights.  :func:`new_model` turns one into a complete Hugging Face model
directory with random weights, for speed, memory and exact-parity work (random weights say nothing
about quality)::

    out/
      config.json              # the shape (+ overrides), bos/eos/pad = the tokenizer's special ids
      generation_config.json   # same special ids
      model.safetensors        # or model-0000x-of-0000y.safetensors + index for big shapes
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      slimlm_meta.json         # how it was made: shape, seed, dtype, overrides, "random_init": true

Weights come from ``AutoModelForCausalLM.from_config`` (transformers' own initialisation) under
``torch.manual_seed(seed)`` on CPU, created directly in the target dtype, so the same arguments give
bit-identical tensors.  The global torch RNG state is restored afterwards.

The tokenizer is the built-in byte-level BPE (:func:`slimlm.data.tokenizer.default_tokenizer`) with
``min(8192, vocab_size)`` entries unless another is passed; the model keeps the shape's vocabulary
size, so token ids above the tokenizer's range are simply never produced.

The directory is written into a temporary sibling of ``out_dir`` and renamed into place at the
end, so an interrupted run leaves no (partial) ``out_dir`` behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from slimlm.model.dtype import parse_dtype

__all__ = ["list_shapes", "load_shape", "new_model"]


# keys of a config.json that are bookkeeping, not architecture
_DROP_KEYS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path")


def _shapes_dir():
    return resources.files("slimlm.model").joinpath("shapes")


def list_shapes() -> list[str]:
    """Names of the packaged shapes, e.g. ``["llama-3.2-1b", ..., "smollm2-135m", ...]``."""
    return sorted(p.name[: -len(".json")] for p in _shapes_dir().iterdir() if p.name.endswith(".json"))


def load_shape(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A shape as a dict: a packaged shape name, a path to a config.json, or a model directory."""
    s = str(name_or_path)
    path = Path(s).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            shape = json.load(f)
    else:
        name = s[: -len(".json")] if s.endswith(".json") and os.sep not in s and "/" not in s else s
        res = _shapes_dir().joinpath(f"{name}.json")
        if "/" in name or os.sep in name or not res.is_file():
            raise ValueError(
                f"unknown model shape {s!r}: not a packaged shape nor a config.json path. "
                f"Known shapes: {', '.join(list_shapes())}"
            )
        shape = json.loads(res.read_text(encoding="utf-8"))
    if not isinstance(shape, dict) or "model_type" not in shape:
        raise ValueError(f"{s!r} is not a model config: it has no 'model_type'")
    return shape


def _build_config(shape: dict[str, Any], num_layers: int | None, overrides: dict[str, Any] | None):
    from transformers import AutoConfig

    cfg = {k: v for k, v in shape.items() if k not in _DROP_KEYS}
    cfg.update(overrides or {})
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg["num_hidden_layers"] = int(num_layers)
        # per-layer lists of the original depth would no longer match
        if "layer_types" in cfg and not (overrides and "layer_types" in overrides):
            cfg.pop("layer_types")
        if "max_window_layers" in cfg and cfg["max_window_layers"] > num_layers:
            cfg["max_window_layers"] = int(num_layers)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _check_memory(config, torch_dtype) -> None:
    """Refuse early (before allocating) when the weights cannot fit in available RAM."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    n = sum(p.numel() for p in meta.parameters())
    del meta
    need = n * torch.empty((), dtype=torch_dtype).element_size()
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except Exception:  # pragma: no cover - psutil is a dependency, but be lenient
        return
    if need > 0.9 * avail:
        raise MemoryError(
            f"the model has {n / 1e9:.2f}B parameters ({need / 2**30:.1f} GiB in {torch_dtype}) but only "
            f"{avail / 2**30:.1f} GiB of RAM is available; pass num_layers=... or smaller overrides"
        )


def _write_atomically(out_dir: Path, overwrite: bool, write) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old: Path | None = None
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "d")
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and (old / "d").exists() and not out_dir.exists():
            os.rename(old / "d", out_dir)  # put the previous directory back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def new_model(
    shape: str | os.PathLike | dict[str, Any],
    out_dir: str | os.PathLike,
    num_layers: int | None = None,
    seed: int = 0,
    dtype="bfloat16",
    overrides: dict[str, Any] | None = None,
    tokenizer=None,
    *,
    tokenizer_vocab_size: int | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a random-initialised Hugging Face model directory of a published shape; return its path.

    ``shape``: packaged shape name (see :func:`list_shapes`), path to a config.json, or a dict.
    ``num_layers`` overrides ``num_hidden_layers``; ``overrides`` are merged into the config first
    (e.g. ``{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16}``).  ``seed`` fixes the weights bit for bit.
    ``dtype``: "bfloat16" (default), "float16" or "float32".
    ``tokenizer``: a transformers tokenizer to ship with the model; default
    ``default_tokenizer(tokenizer_vocab_size or min(8192, vocab_size))``.  Its bos/eos/pad ids become
    the model's (config.json and generation_config.json); it must not be larger than the model's vocab.
    Refuses to replace a non-empty ``out_dir`` unless ``overwrite=True``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    shape_name = None if isinstance(shape, dict) else str(shape)
    shape_dict = dict(shape) if isinstance(shape, dict) else load_shape(shape)
    if "model_type" not in shape_dict:
        raise ValueError("shape dict has no 'model_type'")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("new_model needs an explicit dtype: bfloat16, float16 or float32")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")

    config = _build_config(shape_dict, num_layers, overrides)
    vocab_size = int(config.vocab_size)

    if tokenizer is None:
        from slimlm.data.tokenizer import default_tokenizer

        tokenizer = default_tokenizer(tokenizer_vocab_size or min(8192, vocab_size))
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "pass a smaller tokenizer (tokenizer_vocab_size=...) or override vocab_size"
        )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    for k, v in special.items():
        setattr(config, k, v)

    _check_memory(config, torch_dtype)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.config.dtype = torch_dtype
    for k, v in special.items():
        setattr(model.config, k, v)
    gen = GenerationConfig(**special)
    model.generation_config = gen

    meta = {
        "random_init": True,
        "shape": shape_name if shape_name is not None else "<dict>",
        "model_type": shape_dict["model_type"],
        "num_hidden_layers": int(config.num_hidden_layers),
        "seed": int(seed),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "overrides": overrides or {},
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer_size": len(tokenizer),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        with open(tmp / "slimlm_meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    _write_atomically(out_dir, overwrite, write)
    return out_dir
