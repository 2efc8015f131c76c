"""Loading Hugging Face checkpoints: local directories or hub ids, safetensors only (no pickle, no remote code)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from slimlm.kernels import Ops, get_ops
from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.model.dtype import resolve_dtype

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded: names the file or tensor and what to do."""


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: CausalLM
    tokenizer: Any
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.eos_token_ids)
        gen = self.generation_config.get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if i is not None and i not in ids:
                ids.append(int(i))
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return tuple(ids)


def resolve_model_path(model: str | Path) -> Path:
    """A local directory, or a hub id fetched (or found in the local hub cache) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise LoadError(f"{name} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(name):
        raise LoadError(f"model directory {name} does not exist (and is not a Hugging Face hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception as e:
        reason = " ".join(str(e).split())[:300]
        raise LoadError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason}). If this machine "
            f"is offline, pass the path of a local directory with config.json, *.safetensors and tokenizer "
            f"files instead of the hub id"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object")
    return data


def load_config(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(path / "config.json"), source=str(path / "config.json"))


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index} has no weight_map")
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise LoadError(
            f"{path} holds only pickle weights (*.bin/*.pt); slimlm loads safetensors only. Convert it "
            f"(e.g. transformers' save_pretrained(safe_serialization=True)) and try again"
        )
    raise LoadError(f"no *.safetensors weights in {path}")


def _checkpoint_targets(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Maps each checkpoint tensor name to (our parameter, row offset, rows): q/k/v and gate/up are merged."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    targets = {
        "model.embed_tokens.weight": ("embed_tokens.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = ("lm_head.weight", 0, config.vocab_size)
    merged = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
    }
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for src, (dst, offset, rows) in merged.items():
            targets[f"{hf}{src}.weight"] = (f"{ours}{dst}.weight", offset, rows)
            if (config.qkv_bias and src.startswith("self_attn")) or (config.mlp_bias and src.startswith("mlp")):
                targets[f"{hf}{src}.bias"] = (f"{ours}{dst}.bias", offset, rows)
        plain = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"]
        plain.append("mlp.down_proj.weight")
        if config.o_bias:
            plain.append("self_attn.o_proj.bias")
        if config.mlp_bias:
            plain.append("mlp.down_proj.bias")
        if config.qk_norm:
            plain += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        for name in plain:
            targets[hf + name] = (ours + name, 0, -1)
    return targets


def load_weights(model: CausalLM, path: Path, handled: Collection[str] = ()) -> None:
    """Copies every checkpoint tensor into its (possibly merged) parameter, checking names and shapes.

    ``handled``: tensor names already loaded by the caller (a compressed checkpoint's quantized linears):
    neither required nor reported as unexpected.
    """
    params = dict(model.named_parameters())
    targets = {name: t for name, t in _checkpoint_targets(model.config).items() if name not in handled}
    filled: set[str] = set()
    ignored: list[str] = []
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = targets.get(name)
                    if target is None:
                        if name not in handled:
                            ignored.append(name)
                        continue
                    dst, offset, rows = target
                    param = params[dst]
                    dest = param.data if rows < 0 else param.data.narrow(0, offset, rows)
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(dest.shape):
                        raise LoadError(
                            f"{file.name}: tensor {name} has shape {tuple(tensor.shape)} but config.json "
                            f"implies {tuple(dest.shape)}"
                        )
                    dest.copy_(tensor)
                    filled.add(name)
        except SafetensorError as e:
            raise LoadError(f"{file} is not a valid safetensors file ({e})") from None
        except OSError as e:
            raise LoadError(f"cannot read {file} ({e})") from None
    missing = [name for name in targets if name not in filled]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LoadError(f"{path}: checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = [n for n in ignored if not n.endswith("rotary_emb.inv_freq") and n != "lm_head.weight"]
    if unexpected:
        logger.warning("ignoring %d unexpected tensor(s) in %s, e.g. %s", len(unexpected), path, unexpected[0])


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, ops: Ops, max_positions: int | None = None
) -> CausalLM:
    """Allocates the model on ``device`` without initialising weights (they are loaded next)."""
    with torch.device("meta"):
        model = CausalLM(config, ops, max_positions)
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), False))
    model.cos_sin = model.rope_table().to(device)
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise LoadError(f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json are missing)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise LoadError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e})") from None


def load_model(
    model: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    kernels: str = "auto",
    max_positions: int | None = None,
    load_tokenizer_files: bool = True,
) -> LoadedModel:
    path = resolve_model_path(model)
    config = load_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = get_ops(device, kernels)
    torch_dtype = resolve_dtype(dtype, device, ops)
    how = "requested" if dtype not in (None, "auto") else "fastest measured here"
    logger.info("dtype %s (%s), kernels %s", str(torch_dtype).removeprefix("torch."), how, ops.name)
    net = build_model(config, torch_dtype, device, ops, max_positions)
    quantization = read_json(path / "config.json").get("quantization_config")
    if quantization is not None:
        from slimlm.model.compressed_loader import load_compressed_weights

        load_compressed_weights(net, path, quantization, kernels)
    else:
        load_weights(net, path)
    generation = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    tokenizer = load_tokenizer(path) if load_tokenizer_files else None
    return LoadedModel(path=path, config=config, model=net, tokenizer=tokenizer, generation_config=generation)
