"""Writing a compressed :class:`CausalLM` as a Hugging Face directory (compressed-tensors format)::

    out/
      config.json              # HF config + quantization_config (see slimlm.model.compressed_format)
      generation_config.json   # bos/eos/pad ids
      model.safetensors        # dense tensors under HF names; each QuantizedLinear un-merged (q/k/v,
                               # gate/up) as weight_packed/weight_scale/... or weight (int8) + weight_scale
      slimlm_compression.json  # the recipe metadata passed in (method, calibration tokens, ...)
      tokenizer.json, ...      # when a tokenizer is passed

Modules are grouped by scheme into ``config_groups``: one group targets ``Linear``; when a model mixes
schemes every group lists its module names instead. ``ignore`` holds every linear left dense (always
``lm_head``: transformers has an ``lm_head`` Linear even when it is tied to the embedding).

Scales are stored in their own dtype (float32 from slimlm's compressors, so a reload is exact);
readers cast them to the model dtype. Integer weight-only layers, 8-bit included, are written as
``pack-quantized``: that is what llm-compressor writes for W8A16 and the only integer weight-only
format vLLM runs (``int-quantized`` is kept for W8A8, whose activations are quantized too).

What other readers make of it (checked against compressed-tensors 0.18 and 0.20 with transformers 5):

- symmetric int8/int4/int3/int2 load in transformers with the same logits (float rounding apart); W8A8
  too, except that compressed-tensors' fake quantization scales activations by absmax / 127.5 where
  slimlm (like vLLM's int8 kernels) uses absmax / 127 (with its rule, the layers agree to float rounding);
- act-order (``actorder: "group"`` + ``weight_g_idx``) loads with compressed-tensors 0.18; 0.19 dropped it;
- asymmetric zero points are packed exactly as compressed-tensors' compressor packs them, but
  transformers with compressed-tensors >= 0.18 cannot load any packed asymmetric checkpoint (its
  meta-device model expects them unpacked); slimlm reads them (and files compressed-tensors writes).

The write is atomic: everything goes into a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.model.causal_lm import CausalLM
from slimlm.model.compressed_format import (
    CT_VERSION,
    NF4_FORMAT,
    PACKED_FORMAT,
    args_from_scheme,
    format_of,
    pack_int32,
    pack_nf4,
)
from slimlm.model.loader import _checkpoint_targets
from slimlm.model.new_model import _write_atomically
from slimlm.model.quantized_linear import QuantizedLinear
from slimlm.model.quantized_weight import QuantizedWeight, QuantScheme
from slimlm.model.saver import _dtype_name, _special_ids, hf_config_dict

__all__ = ["METADATA_FILE", "act_order_g_idx", "module_tensors", "quantization_config", "save_compressed"]

METADATA_FILE = "slimlm_compression.json"


def act_order_g_idx(qweight: QuantizedWeight) -> torch.Tensor | None:
    """The g_idx worth storing: None when it is the plain column order (or one group per row), so that such
    weights are written without act-order, which fewer readers support."""
    g_idx = qweight.g_idx
    if g_idx is None or qweight.scheme.group_size == -1:
        return None
    contiguous = torch.arange(qweight.in_features, device=g_idx.device) // qweight.scheme.group_size
    return None if torch.equal(g_idx.long(), contiguous) else g_idx


def module_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear, by local name (``weight_packed``, ``weight_scale``, ...)."""
    s = qweight.scheme
    codes = qweight.codes.cpu()
    scales = qweight.scales.cpu()
    shape = torch.tensor(qweight.shape, dtype=torch.int64)
    if s.kind == "nf4":
        return {"weight_packed": pack_nf4(codes), "weight_scale": scales, "weight_shape": shape}
    if format_of(s) != PACKED_FORMAT:
        return {"weight": codes, "weight_scale": scales}
    out = {"weight_packed": pack_int32(codes, s.bits), "weight_scale": scales, "weight_shape": shape}
    if qweight.zero_points is not None:
        out["weight_zero_point"] = pack_int32(qweight.zero_points.cpu(), s.bits, dim=0)
    g_idx = act_order_g_idx(qweight)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.cpu().to(torch.int32)
    return out


def _row_block(qweight: QuantizedWeight, offset: int, rows: int) -> QuantizedWeight:
    if rows < 0:
        return qweight
    return qweight.split_rows([offset, rows, qweight.out_features - offset - rows])[1]


def _tensors_and_schemes(
    model: CausalLM, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[QuantScheme, bool]], list[str]]:
    """(HF-named tensors, quantized HF module -> (scheme, act-order), dense HF linear names)."""
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, tuple[QuantScheme, bool]] = {}
    dense_linears: list[str] = []
    for hf_name, (ours, offset, rows) in _checkpoint_targets(model.config).items():
        if ours in params:
            param = params[ours].detach()
            tensor = param if rows < 0 else param.narrow(0, offset, rows)
            # clone: safetensors refuses views that share storage (narrowed rows, a no-op .to()).
            tensors[hf_name] = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous().clone()
            module = model.get_submodule(ours.rpartition(".")[0])
            if isinstance(module, nn.Linear) and hf_name.endswith(".weight"):
                dense_linears.append(hf_name.removesuffix(".weight"))
            continue
        module = model.get_submodule(ours.rpartition(".")[0])
        if not isinstance(module, QuantizedLinear):
            raise ValueError(f"{ours} is neither a parameter nor the weight of a QuantizedLinear")
        part = _row_block(module.qweight, offset, rows)
        prefix = hf_name.removesuffix(".weight")
        for local, tensor in module_tensors(part).items():
            tensors[f"{prefix}.{local}"] = tensor.contiguous().clone()
        schemes[prefix] = (part.scheme, act_order_g_idx(part) is not None)
    if "lm_head" not in schemes and "lm_head" not in dense_linears:
        dense_linears.insert(0, "lm_head")  # transformers' tied lm_head is a Linear module too
    return tensors, schemes, dense_linears


def quantization_config(schemes: dict[str, tuple[QuantScheme, bool]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for these quantized modules."""
    by_scheme: dict[tuple[QuantScheme, bool], list[str]] = defaultdict(list)
    for name, key in schemes.items():
        by_scheme[key].append(name)
    groups: dict[str, Any] = {}
    for i, ((scheme, act_order), names) in enumerate(by_scheme.items()):
        weights, inputs = args_from_scheme(scheme, act_order)
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else sorted(names),
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": format_of(scheme),
        }
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "slimlm" if NF4_FORMAT in formats else "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def save_compressed(
    model: CausalLM,
    tokenizer,
    out_dir: str | os.PathLike,
    metadata: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    generation_config: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (with its :class:`QuantizedLinear` modules) as a compressed checkpoint directory.

    ``tokenizer``: saved alongside when given (its special ids fill what the config lacks).
    ``metadata``: the recipe (method, calibration tokens, ...), JSON-serialisable, written to
    ``slimlm_compression.json``. ``dtype``: of the dense tensors (embeddings, norms, lm_head, biases);
    default: each parameter's own dtype. An existing ``out_dir`` is replaced as a whole unless
    ``overwrite=False`` (then it must be empty). Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    try:
        metadata_text = json.dumps({"metadata": metadata}, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_compressed: metadata must be JSON-serialisable ({e})") from None
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("save_compressed: the model has no QuantizedLinear; use save_pretrained for a dense model")
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    out_dir = Path(out_dir).expanduser()
    tensors, schemes, dense_linears = _tensors_and_schemes(model, dtype)
    special = _special_ids(model.config, tokenizer)
    config = hf_config_dict(model.config)
    for key, value in special.items():
        if config.get(key) is None:
            config[key] = value
    config["dtype"] = config["torch_dtype"] = _dtype_name(dtype or model.embed_tokens.weight.dtype)
    config["quantization_config"] = quantization_config(schemes, dense_linears)
    generation = dict(generation_config) if generation_config is not None else dict(special)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", generation)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
        (tmp / METADATA_FILE).write_text(metadata_text + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        # mkdtemp makes the directory private; give it and its files the usual modes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)

    _write_atomically(out_dir, overwrite, write)
    return out_dir
