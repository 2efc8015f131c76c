"""The quantized-checkpoint formats slimlm writes and reads: compressed-tensors, plus slimlm's own NF4.

compressed-tensors
------------------
``config.json["quantization_config"]`` with ``quant_method: "compressed-tensors"``,
``quantization_status: "compressed"``, ``config_groups`` (each: ``targets``, ``weights`` and
``input_activations`` argument dicts, ``format``) and ``ignore``; the layout llm-compressor writes and
transformers / vLLM read. A target is a module name, ``re:<regex>`` (``re.match``) or a class name
(here only ``Linear``); exact names beat regexes beat class names. Tensors of a quantized linear ``m``
(its Hugging Face name, e.g. ``model.layers.0.self_attn.q_proj``):

``pack-quantized`` (integer weights, weight-only)::

    m.weight_packed      int32 [N, ceil(K * bits / 32)]   the codes, see "Packing"
    m.weight_scale       float [N, G]   (channel-wise: [N, 1]; per-tensor: [1])
    m.weight_zero_point  int32 [ceil(N * bits / 32), G]   asymmetric only; signed zero points packed
                         like the codes but along dim 0 (the output rows)
    m.weight_g_idx       int32 [K]      act-order only (``weights.actorder == "group"``): group of column k
    m.weight_shape       int64 [2]      (N, K)

``int-quantized`` / ``naive-quantized`` (W8A8 with dynamic per-token int8 activations)::

    m.weight             int8  [N, K]   the codes themselves
    m.weight_scale       float [N, 1]

Weights dequantize as ``w[n, k] = (q[n, k] - zero_point[n, g(k)]) * scale[n, g(k)]`` with ``q`` and
``zero_point`` signed (``[-2**(bits-1), 2**(bits-1) - 1]``): exactly :class:`QuantizedWeight`'s convention.

Packing: each code is stored as ``q + 2**(bits-1)`` (unsigned, ``bits`` wide); the codes of a row form a
little-endian bit stream (code ``k`` at bits ``[k * bits, (k + 1) * bits)``) cut into int32 words, so a
code may straddle two words (3 bits: 32 codes fill exactly 3 words). compressed-tensors releases before
the dense packing (ct#732) padded each word instead (``32 // bits`` codes per word, top bits unused);
for 2, 4 and 8 bits both layouts are the same; for 3 bits slimlm's reader tells them apart by the width.

slimlm NF4
----------
compressed-tensors has no NormalFloat-4 format, so a checkpoint with NF4 layers is written with
``quant_method: "slimlm"`` (transformers and vLLM then refuse it rather than misread it) and otherwise
the same layout. Its NF4 groups have ``weights = {"type": "nf4", "num_bits": 4, "strategy": "group",
"group_size": B, "symmetric": true, ...}`` and ``format: "nf4-pack-quantized"``::

    m.weight_packed      uint8 [N, ceil(K / 2)]   NF4 code of column 2j in the low nibble, 2j+1 in the high
    m.weight_scale       float [N, K / B]         block absmax: w = NF4_TABLE[code] * scale
    m.weight_shape       int64 [2]

Other groups of such a checkpoint keep their compressed-tensors formats.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from slimlm.model.quantized_weight import QuantScheme

__all__ = [
    "CT_VERSION",
    "NF4_FORMAT",
    "PACKED_FORMAT",
    "INT_FORMATS",
    "args_from_scheme",
    "format_of",
    "pack_int32",
    "pack_nf4",
    "scheme_from_args",
    "unpack_int32",
    "unpack_nf4",
]

# The compressed-tensors release whose format (names, dense packing, config fields) the writer follows.
CT_VERSION = "0.20.0"
PACKED_FORMAT = "pack-quantized"
INT_FORMATS = ("int-quantized", "naive-quantized")
NF4_FORMAT = "nf4-pack-quantized"

_LITTLE_ENDIAN = sys.byteorder == "little"  # the byte-wise fast paths read int32 words as 4 bytes
_ACT_ORDER_VALUES = ("group", "dynamic", True)  # act-order with a stored g_idx (True: very old configs)
_CALIBRATION_ONLY_ACT_ORDER = ("weight", "static", None, False)  # reorders during GPTQ only; no g_idx


def format_of(scheme: QuantScheme) -> str:
    """The format a scheme is written in: vLLM runs weight-only integers only from pack-quantized."""
    if scheme.kind == "nf4":
        return NF4_FORMAT
    return INT_FORMATS[0] if scheme.activations == "int8-token" else PACKED_FORMAT


def args_from_scheme(scheme: QuantScheme, act_order: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(weights, input_activations)`` argument dicts of a config group for ``scheme``."""
    channel = scheme.group_size == -1
    weights: dict[str, Any] = {
        "num_bits": scheme.bits,
        "type": "nf4" if scheme.kind == "nf4" else "int",
        "symmetric": scheme.symmetric,
        "group_size": None if channel else scheme.group_size,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }
    if act_order:
        weights["actorder"] = "group"
    inputs = None
    if scheme.activations == "int8-token":
        inputs = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
        }
    return weights, inputs


def _strategy(args: dict[str, Any]) -> str:
    strategy = args.get("strategy")
    if strategy is not None:
        return str(strategy).lower()
    size = args.get("group_size")  # compressed-tensors infers the strategy from group_size when absent
    return "tensor" if size is None else ("channel" if size == -1 else "group")


def scheme_from_args(weights: Any, inputs: Any, outputs: Any, slimlm_types: bool) -> tuple[QuantScheme, bool, bool]:
    """``(scheme, act_order, per_tensor)`` for a config group's argument dicts; ``ValueError`` (naming the
    field and what slimlm supports) for anything slimlm cannot run exactly."""
    supported = (
        "supported: int weights of 2, 3, 4 or 8 bits, group/channel/tensor strategy, symmetric or asymmetric, "
        "optionally act-order g_idx; weight-only or with dynamic symmetric per-token int8 activations (W8A8)"
        + ("; nf4 weights" if slimlm_types else "")
    )
    if not isinstance(weights, dict):
        raise ValueError(f"weights is {weights!r}: activation-only quantization is not supported ({supported})")
    kind = str(weights.get("type", "int")).lower()
    bits = weights.get("num_bits", 8)
    if kind == "float":
        raise ValueError(
            f"weights type 'float' ({bits}-bit floating point, e.g. fp8/fp4) is not supported ({supported})"
        )
    if kind not in ("int", "nf4") or (kind == "nf4" and not slimlm_types):
        raise ValueError(f"weights type {kind!r} is not supported ({supported})")
    if kind == "int" and bits not in (2, 3, 4, 8):
        raise ValueError(f"weights num_bits {bits} is not supported ({supported})")
    if weights.get("dynamic"):
        raise ValueError(f"dynamic weight quantization is not supported ({supported})")
    if weights.get("block_structure") is not None:
        raise ValueError(f"block-wise weight scales are not supported ({supported})")
    strategy = _strategy(weights)
    if strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"weights strategy {strategy!r} is not supported ({supported})")
    if strategy == "group" and not (isinstance(weights.get("group_size"), int) and weights["group_size"] > 0):
        raise ValueError(f"weights strategy 'group' needs a positive group_size, got {weights.get('group_size')!r}")
    actorder = weights.get("actorder")
    if actorder not in _ACT_ORDER_VALUES + _CALIBRATION_ONLY_ACT_ORDER:
        raise ValueError(f"weights actorder {actorder!r} is not supported (expected group, weight or null)")
    if outputs is not None:
        raise ValueError(f"output_activations quantization is not supported ({supported})")
    activations = None
    if inputs is not None:
        if not isinstance(inputs, dict):
            raise ValueError(f"input_activations must be an object, got {inputs!r}")
        desc = (
            f"{inputs.get('num_bits')}-bit {inputs.get('type', 'int')} {_strategy(inputs)} "
            f"{'dynamic' if inputs.get('dynamic') else 'static'} "
            f"{'symmetric' if inputs.get('symmetric', True) else 'asymmetric'}"
        )
        ok = (
            inputs.get("num_bits") == 8
            and str(inputs.get("type", "int")).lower() == "int"
            and _strategy(inputs) == "token"
            and inputs.get("dynamic") is True
            and inputs.get("symmetric", True)
        )
        if not ok:
            raise ValueError(f"input_activations ({desc}) are not supported ({supported})")
        activations = "int8-token"
    group_size = weights["group_size"] if strategy == "group" else -1
    scheme = QuantScheme(
        bits=int(bits),
        group_size=int(group_size),
        symmetric=bool(weights.get("symmetric", True)),
        kind=kind,
        activations=activations,
    )
    return scheme, actorder in _ACT_ORDER_VALUES and strategy == "group", strategy == "tensor"


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 as the int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-wide codes (int8, 2-D) packed into int32 words along ``dim`` (dense bit stream)."""
    if dim == 0:
        return pack_int32(codes.t(), bits, 1).t().contiguous()
    rows, cols = codes.shape
    blocks = -(-cols // 32)  # 32 codes fill exactly `bits` words
    width = -(-cols * bits // 32)
    unsigned = torch.zeros(rows, blocks * 32, dtype=torch.int16, device=codes.device)
    unsigned[:, :cols] = codes.to(torch.int16) + (1 << (bits - 1))
    if 8 % bits == 0 and _LITTLE_ENDIAN:
        # No code straddles a byte: build the little-endian bytes of the words directly.
        per_byte = 8 // bits
        parts = unsigned.to(torch.uint8).view(rows, -1, per_byte)
        packed = parts[:, :, 0].clone()
        for j in range(1, per_byte):
            packed |= parts[:, :, j] << (j * bits)
        return packed.reshape(-1).view(torch.int32).view(rows, -1)[:, :width].contiguous()
    values = unsigned.long().view(rows, blocks, 32).permute(2, 0, 1)  # [32, rows, blocks]
    words = torch.zeros(bits, rows, blocks, dtype=torch.int64, device=codes.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[word] |= (values[i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[word + 1] |= values[i] >> (32 - shift)
    return _to_int32(words.permute(1, 2, 0).reshape(rows, blocks * bits)[:, :width]).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32` for ``size`` codes along ``dim``; also reads the older padded layout.

    ``ValueError`` when the packed width fits neither layout.
    """
    if dim == 0:
        return unpack_int32(packed.t(), bits, size, 1).t().contiguous()
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, not {packed.dtype}")
    rows, width = packed.shape
    mask, offset = (1 << bits) - 1, 1 << (bits - 1)
    dense, per_word = -(-size * bits // 32), 32 // bits
    if width == dense and 8 % bits == 0 and _LITTLE_ENDIAN:
        # No code straddles a byte (and the padded layout is the same): split the words' bytes.
        data = packed.reshape(-1).view(torch.uint8).view(rows, -1)  # reshape: a stride-1 copy if needed
        values = torch.stack([(data >> (j * bits)) & mask for j in range(8 // bits)], dim=-1).view(rows, -1)
        values = values[:, :size]
        return (values ^ 0x80).view(torch.int8) if bits == 8 else values.view(torch.int8) - offset
    if width == dense:
        blocks = -(-size // 32)
        words = torch.zeros(rows, blocks * bits, dtype=torch.int32, device=packed.device)
        words[:, :width] = packed
        words = words.view(rows, blocks, bits).permute(2, 0, 1).contiguous()  # [bits, rows, blocks]
        values = torch.empty(32, rows, blocks, dtype=torch.int32, device=packed.device)
        for i in range(32):
            word, shift = divmod(i * bits, 32)
            if shift + bits > 32:  # straddles two words; int32 >> sign-extends, so mask the low part's bits
                low = (words[word] >> shift) & ((1 << (32 - shift)) - 1)
                values[i] = low | ((words[word + 1] << (32 - shift)) & mask)
            else:
                values[i] = (words[word] >> shift) & mask
        values = values.permute(1, 2, 0).reshape(rows, blocks * 32)
    elif width == -(-size // per_word):
        words = packed.long() & 0xFFFFFFFF
        values = torch.stack([(words >> (bits * i)) & mask for i in range(per_word)], dim=-1).view(rows, -1)
    else:
        raise ValueError(
            f"{width} int32 words per row cannot hold {size} {bits}-bit codes (expected {dense}, or "
            f"{-(-size // per_word)} in the older padded layout)"
        )
    return (values[:, :size] - offset).to(torch.int8)


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """NF4 codes ``[0, 15]`` (int8 ``[N, K]``) as uint8 ``[N, ceil(K/2)]``, even columns in the low nibble."""
    rows, cols = codes.shape
    values = torch.zeros(rows, cols + cols % 2, dtype=torch.uint8, device=codes.device)
    values[:, :cols] = codes.to(torch.uint8)
    return (values[:, 0::2] | (values[:, 1::2] << 4)).contiguous()


def unpack_nf4(packed: torch.Tensor, size: int) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NF4 codes must be uint8, not {packed.dtype}")
    if packed.shape[1] != -(-size // 2):
        raise ValueError(f"{packed.shape[1]} bytes per row cannot hold {size} NF4 codes")
    values = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)
    return values[:, :size].to(torch.int8).contiguous()
