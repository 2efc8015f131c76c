"""Writing a :class:`CausalLM` as a Hugging Face checkpoint directory (the inverse of ``loader``).

::

    out/
      config.json              # HF form: architectures, model_type, shapes, rope_parameters, special ids
      generation_config.json   # bos/eos/pad ids (or the dict passed in)
      model.safetensors        # HF tensor names: q/k/v and gate/up un-merged; no lm_head when tied
      tokenizer.json, ...      # when a tokenizer is passed

The directory is written into a temporary sibling of ``out_dir`` and renamed into place at the end, so
an interrupted save never leaves a partial checkpoint behind (and an existing one stays intact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.model.loader import _checkpoint_targets
from slimlm.model.new_model import _write_atomically

__all__ = ["hf_config_dict", "hf_state_dict", "save_pretrained"]

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def _rope_dicts(config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(``rope_parameters`` as transformers >= 5 writes it, ``rope_scaling`` for older readers or None)."""
    rope = config.rope
    scaling: dict[str, Any] | None = None
    if rope.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": rope.factor}
    elif rope.rope_type == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    elif rope.rope_type != "default":
        raise ValueError(f"rope type {rope.rope_type!r} cannot be written")
    params = {"rope_theta": rope.theta, "rope_type": rope.rope_type, **(scaling or {})}
    return params, scaling


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` contents for ``config``: ``ModelConfig.from_dict(hf_config_dict(c)) == c``.

    Written in the transformers >= 5 form (``rope_parameters``, ``dtype``) plus the older keys
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``) so that transformers 4.x reads it too. Raises
    ``ValueError`` for a combination the architecture's config cannot express (e.g. a Llama with a
    bias on q/k/v but not on o).
    """
    arch = config.architecture
    model_type = _MODEL_TYPES.get(arch)
    if model_type is None:
        raise ValueError(f"architecture {arch!r} cannot be written (supported: {', '.join(_MODEL_TYPES)})")
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "attention_dropout": 0.0,
    }

    # Biases: Qwen2 always has q/k/v bias and never o bias; the others have one flag for all four.
    if arch == "Qwen2ForCausalLM":
        if not config.qkv_bias or config.o_bias:
            raise ValueError("a Qwen2 config always has q/k/v biases and no o_proj bias")
    else:
        if config.qkv_bias != config.o_bias:
            raise ValueError(f"{arch} has one attention_bias flag for q/k/v and o; they must agree")
        cfg["attention_bias"] = config.qkv_bias
    if config.mlp_bias:
        if arch not in ("LlamaForCausalLM",):
            raise ValueError(f"{arch} has no mlp_bias option")
        cfg["mlp_bias"] = True
    elif arch == "LlamaForCausalLM":
        cfg["mlp_bias"] = False
    if config.qk_norm != (arch == "Qwen3ForCausalLM"):
        raise ValueError("q/k norms are implied by the architecture: Qwen3 has them, the others do not")

    windows = tuple(config.sliding_windows) or (0,) * config.num_layers
    if len(windows) != config.num_layers:
        raise ValueError(f"sliding_windows has {len(windows)} entries for {config.num_layers} layers")
    if arch == "LlamaForCausalLM":
        if any(windows):
            raise ValueError("a Llama config cannot express sliding-window attention")
    elif arch == "MistralForCausalLM":
        if len(set(windows)) > 1:
            raise ValueError("Mistral uses one sliding window for every layer")
        cfg["sliding_window"] = windows[0] or None
    else:
        used = [w for w in windows if w]
        if len(set(used)) > 1:
            raise ValueError(f"{arch} uses one sliding window length for all windowed layers")
        cfg["use_sliding_window"] = bool(used)
        cfg["sliding_window"] = used[0] if used else None
        cfg["max_window_layers"] = config.num_layers
        cfg["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]

    params, scaling = _rope_dicts(config)
    cfg["rope_parameters"] = params
    cfg["rope_theta"] = config.rope.theta
    if scaling is not None:
        cfg["rope_scaling"] = scaling

    cfg["bos_token_id"] = config.bos_token_id
    eos = list(config.eos_token_ids)
    cfg["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    if config.torch_dtype:
        cfg["dtype"] = cfg["torch_dtype"] = _dtype_name(config.torch_dtype)
    return cfg


def hf_state_dict(model: CausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named contiguous CPU tensors (merged q/k/v and gate/up split back), in ``dtype`` if given."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, (ours, offset, rows) in _checkpoint_targets(model.config).items():
        param = params[ours].detach()
        tensor = param if rows < 0 else param.narrow(0, offset, rows)
        tensor = tensor.to(device="cpu", dtype=dtype or tensor.dtype)
        # clone: safetensors refuses views that share storage (narrowed rows, a no-op .to()).
        out[name] = tensor.contiguous().clone()
    return out


def _special_ids(config: ModelConfig, tokenizer) -> dict[str, Any]:
    bos = config.bos_token_id
    eos: Any = list(config.eos_token_ids)
    pad = None
    if tokenizer is not None:
        if bos is None:
            bos = tokenizer.bos_token_id
        if not eos and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id
    eos = eos[0] if len(eos) == 1 else (eos or None)
    if pad is None:
        pad = eos if not isinstance(eos, list) else eos[0]
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    tokenizer=None,
    generation_config: dict[str, Any] | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    extra_config: dict[str, Any] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that transformers and ``load_model`` read.

    ``dtype``: the weights' dtype on disk (``torch.float32`` for a bit-exact copy). ``tokenizer``: a
    transformers tokenizer saved alongside; its bos/eos/pad ids fill what the model config lacks.
    ``generation_config``: written as is (default: the special ids). ``extra_config``: merged into
    config.json last (e.g. provenance). The write is atomic: temporary sibling directory, then rename;
    an existing ``out_dir`` is replaced as a whole unless ``overwrite=False`` (then it must be empty).
    """
    from safetensors.torch import save_file

    from slimlm.model.dtype import parse_dtype

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        raise ValueError("save_pretrained needs an explicit dtype (float32, bfloat16 or float16)")
    out_dir = Path(out_dir).expanduser()
    special = _special_ids(model.config, tokenizer)
    config = hf_config_dict(model.config)
    for key, value in special.items():
        if config.get(key) is None:
            config[key] = value
    config["dtype"] = config["torch_dtype"] = _dtype_name(torch_dtype)
    config.update(extra_config or {})
    generation = dict(generation_config) if generation_config is not None else dict(special)
    tensors = hf_state_dict(model, torch_dtype)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", generation)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        # The temporary directory (and some writers' files) are private; give them the usual modes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)

    _write_atomically(out_dir, overwrite, write)
    return out_dir
