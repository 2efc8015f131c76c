"""The one interface every compression algorithm implements, and what it sees of the model.

A :class:`Modifier` (llm-compressor's name) has a ``name``, a dataclass ``config`` and two hooks into
the sequential pipeline: ``required_stats()`` says which statistics of its target linears' inputs to
gather, and ``apply(ctx)`` transforms the layer (rewrites weights, folds scales) and/or quantizes the
targets into ``ctx.quantized``. The maths lives in pure functions next door (``gptq.py``, ``awq.py``
...); a modifier only wires them to the layer.

Linears are named by their role inside a decoder layer (:data:`LAYER_KEYS`); q/k/v and gate/up are
merged in this model and compressed as one matrix each, which is exact since they share their input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimlm.compress.stats import InputStats
from slimlm.model.config import ModelConfig
from slimlm.model.layers import DecoderLayer
from slimlm.model.quantized_weight import QuantizedWeight, QuantScheme

__all__ = [
    "DOWN",
    "GATE_UP",
    "LAYER_KEYS",
    "LM_HEAD",
    "O",
    "QKV",
    "LayerContext",
    "Modifier",
    "QuantConfig",
    "QuantizingModifier",
]

QKV = "self_attn.qkv_proj"
O = "self_attn.o_proj"
GATE_UP = "mlp.gate_up_proj"
DOWN = "mlp.down_proj"
LM_HEAD = "lm_head"
LAYER_KEYS = (QKV, O, GATE_UP, DOWN)  # in execution order: each one's input depends on the ones before


@dataclass
class LayerContext:
    """One step of the pipeline: some linears of decoder layer ``index`` (or the lm_head, ``index = -1``)."""

    index: int
    layer: DecoderLayer | None
    config: ModelConfig
    targets: dict[str, nn.Linear]  # role key -> float linear to compress in this step (not ignored)
    stats: dict[str, InputStats]
    cos_sin: torch.Tensor
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def full_name(self, key: str) -> str:
        return key if self.index < 0 else f"layers.{self.index}.{key}"

    def pending(self) -> list[tuple[str, nn.Linear]]:
        """Targets no modifier has quantized yet."""
        return [(k, m) for k, m in self.targets.items() if k not in self.quantized]

    def positions(self, batch: int, length: int) -> torch.Tensor:
        return torch.arange(length, device=self.cos_sin.device).expand(batch, length)

    def inputs_rescaled(self, key: str, s: torch.Tensor) -> None:
        """Record that a scale was folded in front of ``key``: its inputs are now ``x / s``."""
        if key in self.stats:
            self.stats[key].rescale(s)

    def log(self, modifier: str, key: str, **values: Any) -> None:
        self.metrics.append({"modifier": modifier, "linear": self.full_name(key), **values})


@dataclass
class QuantConfig:
    """The weight (and activation) format a quantizing modifier produces; see :class:`QuantScheme`."""

    bits: int = 4
    group_size: int = 128  # -1: channel-wise
    symmetric: bool = True
    activations: str | None = None  # None or "int8-token" (W8A8)

    def __post_init__(self) -> None:
        self.scheme()  # validates, naming the bad field

    def scheme(self) -> QuantScheme:
        return QuantScheme(
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, activations=self.activations
        )


class Modifier(ABC):
    """One compression algorithm; see the module docstring."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    quantizes: ClassVar[bool] = False

    def __init__(self, config: Any = None, **fields: Any):
        if config is not None and fields:
            raise ValueError(f"{self.name}: pass a config or fields, not both")
        self.config = config if config is not None else self.config_class(**fields)
        if not isinstance(self.config, self.config_class):
            raise ValueError(f"{self.name}: config must be a {self.config_class.__name__}")

    @property
    def cross_stage(self) -> bool:
        """True when ``apply`` rewrites a linear that feeds another target of the same layer (AWQ folding a
        scale into v or the up projection): the pipeline then calibrates whole layers in float before any
        of their linears is quantized, instead of quantizing linear by linear."""
        return False

    def required_stats(self) -> frozenset[str]:
        return frozenset()

    def sample_tokens(self) -> int:
        """Calibration tokens of raw inputs to keep (as whole sequences) for ``apply``; 0: none."""
        return 0

    @property
    def scheme(self) -> QuantScheme | None:
        return None

    @abstractmethod
    def apply(self, ctx: LayerContext) -> None: ...

    def to_dict(self) -> dict[str, Any]:
        return {self.name: asdict(self.config)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class QuantizingModifier(Modifier):
    """A modifier whose ``apply`` ends by quantizing every pending target."""

    quantizes = True

    @property
    def scheme(self) -> QuantScheme:
        return self.config.scheme()
