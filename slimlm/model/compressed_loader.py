"""Loading compressed checkpoints (compressed-tensors, slimlm NF4) into :class:`QuantizedLinear` modules.

``load_model`` calls :func:`load_compressed_weights` when config.json has a ``quantization_config``;
the formats are described in :mod:`slimlm.model.compressed_format`. It reads what llm-compressor and
:func:`slimlm.compress.checkpoint.save_compressed` write, without importing compressed-tensors.

Each HF linear is quantized when its ``weight_scale`` is stored; its scheme comes from the config
group whose targets match it. q/k/v and gate/up are merged with ``QuantizedWeight.cat_rows`` when
their schemes and act-order ``g_idx`` agree. When they do not (a mixed-precision recipe that splits
one projection, different act-order permutations, or some parts left dense), that merged projection
is dequantized into a dense linear in the model dtype, with a warning: the model stays correct
(except that a W8A8 projection then runs with unquantized activations) but that projection saves no
memory. Scales are kept in float32 (exact for any stored dtype); dense tensors, ``ignore``d linears
included, load as in an ordinary checkpoint.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimlm.model.causal_lm import CausalLM
from slimlm.model.compressed_format import (
    INT_FORMATS,
    NF4_FORMAT,
    PACKED_FORMAT,
    format_of,
    scheme_from_args,
    unpack_int32,
    unpack_nf4,
)
from slimlm.model.loader import LoadError, _checkpoint_targets, load_weights, safetensors_files
from slimlm.model.quantized_linear import QuantizedLinear
from slimlm.model.quantized_weight import QuantizedWeight, QuantScheme

__all__ = ["QuantGroup", "load_compressed_weights", "parse_quantization_config"]

logger = logging.getLogger(__name__)

_METHODS = ("compressed-tensors", "slimlm")


@dataclass(frozen=True)
class QuantGroup:
    name: str
    targets: tuple[str, ...]
    scheme: QuantScheme
    act_order: bool  # a weight_g_idx is stored
    per_tensor: bool  # one scale for the whole weight (expanded to channel-wise on load)
    format: str


def parse_quantization_config(qc: Any, source: str) -> tuple[list[QuantGroup], list[str]]:
    """The config groups and ignore list of a ``quantization_config``; LoadError for what slimlm cannot run."""
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise LoadError(f"{where} must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in _METHODS:
        raise LoadError(
            f"{where}.quant_method {method!r} is not supported: slimlm loads compressed-tensors checkpoints "
            f"(llm-compressor, slimlm) and slimlm's NF4 ('slimlm'); re-quantize the dense model with one of them"
        )
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise LoadError(
            f"{where}.quantization_status is {status!r}: only 'compressed' checkpoints are supported (the others "
            f"store fake-quantized float weights); save the model compressed"
        )
    for key, what in (
        ("sparsity_config", "sparsity (2:4 / bitmask)"),
        ("transform_config", "weight transforms (Hadamard rotations)"),
        ("kv_cache_scheme", "KV-cache quantization"),
    ):
        if qc.get(key):
            raise LoadError(f"{where}.{key}: {what} is not supported by slimlm")
    groups_cfg = qc.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise LoadError(f"{where}.config_groups is missing or empty: nothing says which layers are quantized")
    global_format = qc.get("format")
    supported = [PACKED_FORMAT, *INT_FORMATS] + ([NF4_FORMAT] if method == "slimlm" else [])
    groups = []
    for name, group in groups_cfg.items():
        gwhere = f"{where}.config_groups.{name}"
        if not isinstance(group, dict):
            raise LoadError(f"{gwhere} must be a scheme object (targets, weights, ...), got {group!r}")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise LoadError(f"{gwhere}.targets must be a non-empty list of module names, 're:' regexes or 'Linear'")
        try:
            scheme, act_order, per_tensor = scheme_from_args(
                group.get("weights"),
                group.get("input_activations"),
                group.get("output_activations"),
                method == "slimlm",
            )
        except ValueError as e:
            raise LoadError(f"{gwhere}: {e}") from None
        fmt = group.get("format") or (global_format if global_format not in (None, "mixed-precision") else None)
        fmt = fmt or format_of(scheme)  # what compressed-tensors infers for a group without one
        if fmt not in supported:
            raise LoadError(f"{gwhere}: format {fmt!r} is not supported (supported: {', '.join(supported)})")
        if (fmt == NF4_FORMAT) != (scheme.kind == "nf4"):
            raise LoadError(f"{gwhere}: format {fmt!r} does not fit {scheme.kind} weights")
        groups.append(QuantGroup(name, tuple(targets), scheme, act_order, per_tensor, fmt))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise LoadError(f"{where}.ignore must be a list of module names or 're:' regexes")
    return groups, ignore


def _matches(target: str, name: str) -> int | None:
    """Match priority as compressed-tensors ranks it: exact name 0, regex 1, class name 2 (all linears)."""
    if target == name:
        return 0
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    return 2 if target == "Linear" else None


def match_group(name: str, groups: list[QuantGroup], ignore: list[str]) -> QuantGroup | None:
    if any(_matches(t, name) is not None for t in ignore):
        return None
    best: tuple[int, QuantGroup] | None = None
    for group in groups:
        for target in group.targets:
            rank = _matches(target, name)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, group)
    return None if best is None else best[1]


class _Tensors:
    """Lazy access to the checkpoint's tensors by name, across shards."""

    def __init__(self, path: Path, stack: ExitStack):
        self.files: dict[str, Path] = {}
        self._handles = {}
        for file in safetensors_files(path):
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise LoadError(f"{file} is not a readable safetensors file ({e})") from None
            self._handles[file] = handle
            for name in handle.keys():
                self.files[name] = file
        # module -> its weight_packed, weight_scale, ... tensors
        self.weight_tensors: dict[str, list[str]] = {}
        for name in self.files:
            module, sep, _ = name.rpartition(".weight_")
            if sep:
                self.weight_tensors.setdefault(module, []).append(name)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise LoadError(f"checkpoint lacks tensor {name}")
        return self._handles[self.files[name]].get_tensor(name)

    def where(self, name: str) -> str:
        return self.files[name].name if name in self.files else "checkpoint"


def _read_codes(t: _Tensors, m: str, group: QuantGroup, n: int, k: int) -> torch.Tensor:
    s = group.scheme
    if group.format in INT_FORMATS:
        codes = t.get(f"{m}.weight")
        if codes.dtype != torch.int8 or tuple(codes.shape) != (n, k):
            raise LoadError(
                f"{t.where(m + '.weight')}: {m}.weight is {codes.dtype} {tuple(codes.shape)}; format "
                f"{group.format} needs int8 codes of shape {(n, k)}"
            )
        return codes
    name = f"{m}.weight_packed"
    if f"{m}.weight_shape" in t:
        shape = tuple(int(v) for v in t.get(f"{m}.weight_shape").tolist())
        if shape != (n, k):
            raise LoadError(f"{t.where(name)}: {m}.weight_shape is {shape} but config.json implies {(n, k)}")
    packed = t.get(name)
    if packed.dim() != 2 or packed.shape[0] != n:
        raise LoadError(f"{t.where(name)}: {name} has shape {tuple(packed.shape)}, expected {n} rows")
    try:
        return unpack_nf4(packed, k) if s.kind == "nf4" else unpack_int32(packed, s.bits, k)
    except ValueError as e:
        raise LoadError(f"{t.where(name)}: {name}: {e}") from None


def _groupwise(tensor: torch.Tensor, name: str, where: str, group: QuantGroup, n: int, g: int) -> torch.Tensor:
    """A scale or (unpacked) zero-point tensor as ``[n, g]``; per-tensor values are expanded to every row."""
    if group.per_tensor and tensor.numel() == 1:
        return tensor.reshape(1, 1).expand(n, 1).contiguous()
    if tensor.numel() == n * g and tensor.shape[0] == n:
        return tensor.reshape(n, g).contiguous()
    raise LoadError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {(n, g)}")


def read_quantized(t: _Tensors, m: str, group: QuantGroup, n: int, k: int, device) -> QuantizedWeight:
    """The QuantizedWeight of HF linear ``m`` (``[n, k]``) stored in ``group``'s format."""
    s = group.scheme
    try:
        g = s.num_groups(k)
    except ValueError as e:
        raise LoadError(f"{m}: {e} (config group {group.name})") from None
    codes = _read_codes(t, m, group, n, k)
    name = f"{m}.weight_scale"
    scales = _groupwise(t.get(name), name, t.where(name), group, n, g).float()
    zeros = None
    if not s.symmetric:
        name = f"{m}.weight_zero_point"
        stored = t.get(name)
        # compressed-tensors packs group/channel zero points like the codes, along the output rows.
        if stored.dtype == torch.int32 and group.format == PACKED_FORMAT and not group.per_tensor:
            try:
                stored = unpack_int32(stored, s.bits, n, dim=0)
            except ValueError as e:
                raise LoadError(f"{t.where(name)}: {name}: {e}") from None
        if stored.dtype not in (torch.int8, torch.int32):
            raise LoadError(f"{t.where(name)}: {name} is {stored.dtype}, expected int8 (or packed int32)")
        zeros = _groupwise(stored, name, t.where(name), group, n, g)
        if zeros.min() < s.qmin or zeros.max() > s.qmax:
            raise LoadError(f"{t.where(name)}: {name} has values outside [{s.qmin}, {s.qmax}]")
        zeros = zeros.to(torch.int8)
    g_idx = None
    name = f"{m}.weight_g_idx"
    if group.act_order and name not in t:
        raise LoadError(f"{m}: config group {group.name} has actorder 'group' but the checkpoint lacks {name}")
    if name in t:
        g_idx = t.get(name).to(torch.int32).reshape(-1)
        if g_idx.numel() != k:
            raise LoadError(f"{t.where(name)}: {name} has {g_idx.numel()} entries, expected {k}")
        contiguous = torch.arange(k, dtype=torch.int32) // (k if s.group_size == -1 else s.group_size)
        if bool((g_idx == -1).all()) or torch.equal(g_idx, contiguous):
            g_idx = None  # never filled in, or plain column order: no reordering needed
        elif g_idx.min() < 0 or g_idx.max() >= g:
            raise LoadError(f"{t.where(name)}: {name} has group indices outside [0, {g})")

    def move(x):
        return None if x is None else x.contiguous().to(device)

    try:
        return QuantizedWeight(s, move(codes), move(scales), move(zeros), move(g_idx))
    except ValueError as e:
        raise LoadError(f"{m}: {e}") from None


def _linear_parts(model: CausalLM) -> dict[str, list[tuple[str, int]]]:
    """Our linear module -> its HF linears in row order with their row counts (-1: the whole module)."""
    parts: dict[str, list[tuple[str, int, int]]] = {}
    for hf_name, (ours, offset, rows) in _checkpoint_targets(model.config).items():
        module_name = ours.rpartition(".")[0]
        if ours.endswith(".weight") and isinstance(model.get_submodule(module_name), nn.Linear):
            parts.setdefault(module_name, []).append((hf_name.removesuffix(".weight"), offset, rows))
    return {name: [(m, rows) for m, _, rows in sorted(p, key=lambda x: x[1])] for name, p in parts.items()}


def load_compressed_weights(model: CausalLM, path: Path, qconfig: Any, kernels: str = "auto") -> None:
    """Fills ``model`` from a compressed checkpoint, replacing its quantized linears by QuantizedLinear."""
    groups, ignore = parse_quantization_config(qconfig, str(path / "config.json"))
    dtype = model.embed_tokens.weight.dtype
    handled: set[str] = set()
    counts = {"quantized": 0, "dequantized": 0}
    with ExitStack() as stack:
        t = _Tensors(path, stack)
        for module_name, parts in _linear_parts(model).items():
            module = model.get_submodule(module_name)
            device = module.weight.device
            qweights: list[QuantizedWeight | None] = []
            for m, rows in parts:
                n = module.out_features if rows < 0 else rows
                group = match_group(m, groups, ignore)
                stored = f"{m}.weight_scale" in t
                if stored and group is None:
                    raise LoadError(
                        f"{t.where(m + '.weight_scale')}: {m} is stored quantized but no config_groups target in "
                        f"config.json matches it (or it is in ignore)"
                    )
                if group is not None and not stored:
                    raise LoadError(
                        f"{t.where(m + '.weight')}: config.json quantizes {m} (config group {group.name}) but the "
                        f"checkpoint has no {m}.weight_scale"
                    )
                qweights.append(None if group is None else read_quantized(t, m, group, n, module.in_features, device))
            if all(q is None for q in qweights):
                continue
            for m, _ in parts:
                handled.add(f"{m}.weight")
                handled.update(t.weight_tensors.get(m, ()))
            merged = _merge(qweights, module_name)
            if merged is not None:
                _replace(model, module_name, merged, module, kernels)
                counts["quantized"] += 1
            else:
                dense = [
                    t.get(f"{m}.weight") if q is None else q.dequantize(dtype)
                    for q, (m, _) in zip(qweights, parts, strict=True)
                ]
                weight = torch.cat([d.to(device=device, dtype=dtype) for d in dense])
                if weight.shape != module.weight.shape:
                    raise LoadError(
                        f"{path}: {', '.join(m for m, _ in parts)} add up to shape {tuple(weight.shape)} but "
                        f"config.json implies {tuple(module.weight.shape)}"
                    )
                with torch.no_grad():
                    module.weight.copy_(weight)
                counts["dequantized"] += 1
    load_weights(model, path, handled=handled)
    logger.info(
        "compressed checkpoint: %d quantized linears, %d dequantized (schemes: %s)",
        counts["quantized"],
        counts["dequantized"],
        ", ".join(f"{g.name}={g.format}" for g in groups),
    )


def _merge(qweights: list[QuantizedWeight | None], module_name: str) -> QuantizedWeight | None:
    if any(q is None for q in qweights):
        reason = "some of its parts are stored dense"
    else:
        try:
            return qweights[0] if len(qweights) == 1 else QuantizedWeight.cat_rows(qweights)
        except ValueError as e:
            reason = str(e)
    logger.warning("%s: its parts cannot be merged (%s); dequantizing it to a dense linear", module_name, reason)
    return None


def _replace(model: CausalLM, module_name: str, qweight: QuantizedWeight, old: nn.Linear, kernels: str) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    bias = None if old.bias is None else torch.empty_like(old.bias)  # filled by load_weights
    new = QuantizedLinear(qweight, bias, compute_dtype=old.weight.dtype)
    new.kernel_backend = kernels
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
