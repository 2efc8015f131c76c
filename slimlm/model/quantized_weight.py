"""The one quantized-weight type: what compression produces, the checkpoint writer stores, the loader
builds and the runtime linear runs. Kernels may keep their own packed layout of it as a cache, but
there is no second representation to convert between.

Codes are kept unpacked (one int8 per weight) in memory: packing is a property of a file format
(compressed-tensors packs int4 into int32) or of a kernel (nibbles interleaved for SIMD), not of the
weight. Integer codes use compressed-tensors' signed convention so a checkpoint round-trips exactly:

- ``kind="int"``: ``codes`` in ``[-2**(bits-1), 2**(bits-1) - 1]``; symmetric: ``w = codes * scale``;
  asymmetric: ``w = (codes - zero_point) * scale`` with ``zero_point`` in the same signed range.
- ``kind="nf4"``: ``codes`` in ``[0, 15]`` index :data:`NF4_TABLE`; ``w = NF4_TABLE[codes] * scale``
  (``scale`` is the block absmax, already including any double-quantization error).

Groups run along the input dimension: ``group_size`` input columns share one scale per output row
(``group_size == -1``: one per row, "channel-wise"). With GPTQ's act-order, ``g_idx[k]`` names the group
of input column ``k`` (groups are then not contiguous in ``k``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from slimlm.kernels.quant import NF4_TABLE, QuantLinearSpec, dequantize

__all__ = ["NF4_TABLE", "QuantScheme", "QuantizedWeight"]

KINDS = ("int", "nf4")
ACTIVATIONS = (None, "int8-token")


@dataclass(frozen=True)
class QuantScheme:
    """How a linear's weights (and, for W8A8, its activations) are quantized."""

    bits: int = 4
    group_size: int = 128  # input columns per scale; -1: one scale per output row (channel-wise)
    symmetric: bool = True
    kind: str = "int"  # "int" or "nf4"
    activations: str | None = None  # None: weight-only; "int8-token": dynamic per-token int8 (W8A8)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quant scheme: kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "int" and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"quant scheme: bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.kind == "nf4" and (self.bits != 4 or not self.symmetric):
            raise ValueError("quant scheme: nf4 is 4-bit and symmetric (blockwise absmax)")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"quant scheme: group_size must be > 0 or -1 (channel-wise), not {self.group_size}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"quant scheme: activations must be one of {ACTIVATIONS}, not {self.activations!r}")
        if self.activations == "int8-token" and (self.bits != 8 or self.group_size != -1 or not self.symmetric):
            raise ValueError("quant scheme: W8A8 needs 8-bit symmetric channel-wise weights")

    @property
    def qmin(self) -> int:
        return 0 if self.kind == "nf4" else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 15 if self.kind == "nf4" else 2 ** (self.bits - 1) - 1

    def num_groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {self.group_size}")
        return in_features // self.group_size


@dataclass
class QuantizedWeight:
    """A ``[out_features, in_features]`` weight as integer codes plus per-group scales (see module doc)."""

    scheme: QuantScheme
    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float [N, G]
    zero_points: torch.Tensor | None = None  # int8 [N, G], asymmetric int only
    g_idx: torch.Tensor | None = None  # int32 [K], act-order only

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g = self.scheme.num_groups(k)
        if self.codes.dtype != torch.int8:
            raise ValueError(f"quantized weight: codes must be int8, not {self.codes.dtype}")
        if tuple(self.scales.shape) != (n, g):
            raise ValueError(f"quantized weight: scales have shape {tuple(self.scales.shape)}, expected {(n, g)}")
        if self.scheme.symmetric != (self.zero_points is None):
            raise ValueError("quantized weight: zero_points are needed exactly when the scheme is asymmetric")
        if self.zero_points is not None and tuple(self.zero_points.shape) != (n, g):
            raise ValueError(
                f"quantized weight: zero_points have shape {tuple(self.zero_points.shape)}, expected {(n, g)}"
            )
        if self.g_idx is not None and tuple(self.g_idx.shape) != (k,):
            raise ValueError(f"quantized weight: g_idx has shape {tuple(self.g_idx.shape)}, expected {(k,)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """The group of each input column ``[K]`` (``g_idx``, or contiguous groups)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.in_features
        size = k if self.scheme.group_size == -1 else self.scheme.group_size
        return torch.arange(k, device=self.codes.device) // size

    @property
    def spec(self) -> QuantLinearSpec:
        return QuantLinearSpec(self.scheme.bits, self.scheme.group_size, self.scheme.kind, self.scheme.activations)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight these codes stand for (the reference every kernel must match)."""
        return dequantize(self.codes, self.scales, self.zero_points, self.g_idx, self.spec, dtype)

    def nbytes(self) -> int:
        """Storage in a packed checkpoint: bits per weight plus scales and zero points."""
        n, k = self.shape
        total = (n * k * self.scheme.bits + 7) // 8 + self.scales.numel() * self.scales.element_size()
        if self.zero_points is not None:
            total += self.zero_points.numel()
        if self.g_idx is not None:
            total += self.g_idx.numel() * 4
        return total

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Row blocks (un-merging q/k/v or gate/up for a checkpoint)."""
        codes = self.codes.split(sizes)
        scales = self.scales.split(sizes)
        zeros = self.zero_points.split(sizes) if self.zero_points is not None else [None] * len(sizes)
        return [
            replace(self, codes=c, scales=s, zero_points=z, g_idx=self.g_idx)
            for c, s, z in zip(codes, scales, zeros, strict=True)
        ]

    @staticmethod
    def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stacks row blocks of one scheme (merging q/k/v or gate/up at load); they must share g_idx."""
        first = parts[0]
        for p in parts[1:]:
            if p.scheme != first.scheme:
                raise ValueError(f"cannot merge quantized weights of schemes {first.scheme} and {p.scheme}")
            if (p.g_idx is None) != (first.g_idx is None) or (
                p.g_idx is not None and not torch.equal(p.g_idx, first.g_idx)
            ):
                raise ValueError("cannot merge quantized weights with different act-order g_idx")
        zeros = None if first.zero_points is None else torch.cat([p.zero_points for p in parts])
        return QuantizedWeight(
            scheme=first.scheme,
            codes=torch.cat([p.codes for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            zero_points=zeros,
            g_idx=first.g_idx,
        )
