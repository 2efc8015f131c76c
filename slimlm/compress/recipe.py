"""Recipes: which modifiers run, in which order, and which linears they leave alone.

A recipe is a list of modifiers ending in exactly one quantizing modifier (rtn, gptq, awq, nf4); the
ones before it only transform weights (smoothquant). As YAML::

    ignore: [lm_head]            # module names, globs (*.down_proj) or "re:<regex>"; default [lm_head]
    modifiers:
      - smoothquant: {alpha: 0.5}
      - gptq: {bits: 8, group_size: -1, activations: int8-token}

Modifier names may also be spelled as llm-compressor's classes (``GPTQModifier``). Embeddings are never
quantized; a tied lm_head is the embedding and stays dense too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.compress.modifiers import (
    AWQModifier,
    GPTQModifier,
    Modifier,
    NF4Modifier,
    RTNModifier,
    SmoothQuantModifier,
    modifier_class,
)
from slimlm.model.config import ModelConfig

__all__ = ["DEFAULT_IGNORE", "METHODS", "Recipe", "default_group_size", "method_recipe"]

DEFAULT_IGNORE = ("lm_head",)
METHODS = ("rtn", "gptq", "awq", "smoothquant", "nf4")


@dataclass
class Recipe:
    modifiers: list[Modifier]
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self) -> None:
        if not self.modifiers:
            raise ValueError("recipe: modifiers must not be empty")
        quantizing = [m.name for m in self.modifiers if m.quantizes]
        if len(quantizing) != 1:
            raise ValueError(
                f"recipe: modifiers must hold exactly one quantizing modifier (rtn, gptq, awq or nf4), not "
                f"{len(quantizing)} ({', '.join(quantizing) or 'none'})"
            )
        if not self.modifiers[-1].quantizes:
            raise ValueError(
                f"recipe: the quantizing modifier ({quantizing[0]}) must come last; transforms such as "
                f"smoothquant go before it"
            )
        if isinstance(self.ignore, str):
            raise ValueError("recipe: ignore must be a list of names or patterns, not a string")
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"recipe: ignore pattern {pattern!r} is not a valid regex ({e})") from None

    @property
    def quantizer(self) -> Modifier:
        return self.modifiers[-1]

    @property
    def layerwise(self) -> bool:
        """Whole layers are calibrated in float before quantizing (some modifier folds across linears)."""
        return any(m.cross_stage for m in self.modifiers)

    def required_stats(self) -> frozenset[str]:
        needs = frozenset().union(*(m.required_stats() for m in self.modifiers))
        return needs | ({"samples"} if self.sample_tokens() else frozenset())

    def sample_tokens(self) -> int:
        return max(m.sample_tokens() for m in self.modifiers)

    def is_ignored(self, name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif pattern == name or fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"ignore": list(self.ignore), "modifiers": [m.to_dict() for m in self.modifiers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping with 'modifiers' (and optionally 'ignore')")
        unknown = set(data) - {"modifiers", "ignore"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; expected 'modifiers' and 'ignore'")
        items = data.get("modifiers")
        if not isinstance(items, list):
            raise ValueError(f"{source}: 'modifiers' must be a list")
        ignore = data.get("ignore", list(DEFAULT_IGNORE))
        if ignore is None:
            ignore = []
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise ValueError(f"{source}: 'ignore' must be a list of strings")
        return cls([_modifier_from_item(item, source) for item in items], ignore)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"recipe file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        return cls.from_dict(data, source=str(path))


def _modifier_from_item(item: Any, source: str) -> Modifier:
    if isinstance(item, str):
        name, fields = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        ((name, fields),) = item.items()
        fields = fields or {}
    else:
        raise ValueError(f"{source}: each modifier must be a name or a one-key mapping {{name: {{fields}}}}")
    cls = modifier_class(str(name))
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: the fields of {name} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    for key in fields:
        if key not in known:
            raise ValueError(f"{source}: {cls.name} has no field {key!r} (fields: {', '.join(sorted(known))})")
    return cls(**fields)


def default_group_size(config: ModelConfig, bits: int) -> int:
    """128 (the common choice) when it divides every linear's input width, else 64 or 32; channel-wise at 8 bits
    or when none divides (e.g. SmolLM2-135M's 576-wide hidden state takes 64)."""
    if bits >= 8:
        return -1
    widths = (config.hidden_size, config.q_size, config.intermediate_size)
    for gs in (128, 64, 32):
        if all(w % gs == 0 for w in widths):
            return gs
    return -1


def method_recipe(
    method: str,
    config: ModelConfig,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    act_order: bool = False,
    double_quant: bool = False,
    ignore: list[str] | None = None,
) -> Recipe:
    """The recipe ``slimlm compress --method`` runs. ``None`` options take the method's defaults: 4 bits
    (8 for smoothquant), :func:`default_group_size`, symmetric. ``smoothquant`` is W8A8: smoothing, then
    GPTQ on int8 channel-wise weights with dynamic per-token int8 activations (llm-compressor's recipe)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    ignore = list(DEFAULT_IGNORE) if ignore is None else ignore
    if act_order and method not in ("gptq", "smoothquant"):
        raise ValueError(f"act_order is a GPTQ option; method {method} does not use it")
    if double_quant and method != "nf4":
        raise ValueError(f"double_quant is an nf4 option; method {method} does not use it")
    if method == "nf4":
        if bits not in (None, 4) or symmetric is False:
            raise ValueError("nf4 is 4-bit and symmetric: drop --bits / --no-symmetric")
        return Recipe([NF4Modifier(block_size=group_size or 64, double_quant=double_quant)], ignore)
    if method == "smoothquant":
        if bits not in (None, 8) or group_size not in (None, -1) or symmetric is False:
            raise ValueError("smoothquant is W8A8: 8-bit symmetric channel-wise weights (drop --bits/--group-size)")
        gptq = GPTQModifier(bits=8, group_size=-1, symmetric=True, activations="int8-token", act_order=act_order)
        return Recipe([SmoothQuantModifier(), gptq], ignore)
    bits = 4 if bits is None else bits
    fields = dict(
        bits=bits,
        group_size=default_group_size(config, bits) if group_size is None else group_size,
        symmetric=True if symmetric is None else symmetric,
    )
    if method == "rtn":
        return Recipe([RTNModifier(**fields)], ignore)
    if method == "gptq":
        return Recipe([GPTQModifier(**fields, act_order=act_order)], ignore)
    return Recipe([AWQModifier(**fields)], ignore)
