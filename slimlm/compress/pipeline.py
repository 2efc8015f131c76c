"""The sequential calibration pipeline: compress a model one decoder layer at a time.

The embeddings of the calibration batch become the hidden states ``[B, L, H]``; then, for each layer,
statistics of its linears' inputs are gathered, the recipe's modifiers run, the linears are replaced by
``QuantizedLinear``, and the *quantized* layer's outputs overwrite the hidden states for the next layer
(so each layer learns to compensate the error of the ones before). Memory is the model plus one layer's
working set: the hidden states, one intermediate activation and the statistics.

Two schedules:

- stage-wise (default): a layer is four stages, qkv -> o -> gate_up -> down. Each stage's inputs are
  computed once, through the already-quantized stages before it, then that stage is compressed. Every
  linear is evaluated exactly once per layer (the cheapest possible schedule), and GPTQ sees the inputs
  the quantized model will really feed it ("true sequential" in the GPTQ code).
- layer-wise, when a modifier folds a scale into an earlier linear of the layer (AWQ into v and up): the
  float layer runs once with hooks gathering every stage's statistics, the modifiers transform and
  quantize the whole layer, and it runs again to produce its outputs.

Without any statistic to gather (rtn, nf4) there is nothing to calibrate: weights are quantized directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.compress.modifiers.base import DOWN, GATE_UP, LAYER_KEYS, LM_HEAD, QKV, LayerContext, O
from slimlm.compress.recipe import Recipe
from slimlm.compress.stats import InputStats, StatsAccumulator
from slimlm.model.causal_lm import CausalLM
from slimlm.model.layers import DecoderLayer
from slimlm.model.quantized_linear import QuantizedLinear

__all__ = ["CompressResult", "PipelineOptions", "check_recipe", "compress_model"]

logger = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    chunk_tokens: int = 8192  # tokens per forward call: bounds the temporaries, large enough for fast GEMMs
    progress: bool = True
    # Called after every compressed stage as (layer index, stage key) while that stage's buffers are alive
    # (tests use it to check what is held in memory).
    on_stage: Callable[[int, str], None] | None = None
    # Re-gather the engine's inference weights at the end. That prepares a kernel for every quantized
    # linear (on CPU: builds and repacks), which a caller that only writes a checkpoint can skip.
    refresh_inference_weights: bool = True

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"pipeline: chunk_tokens must be > 0, not {self.chunk_tokens}")


@dataclass
class CompressResult:
    seconds: float
    schedule: str  # "stage-wise", "layer-wise" or "weights-only"
    calibration_tokens: int
    quantized: list[str] = field(default_factory=list)  # full module names
    metrics: list[dict[str, Any]] = field(default_factory=list)  # what modifiers logged (AWQ alphas, ...)


class _StopForward(Exception):
    """Raised by a pre-hook once the input it waits for has been captured: the rest is not needed."""


def check_recipe(model: CausalLM, recipe: Recipe) -> None:
    """Fails before any work when the quantization scheme cannot tile some target linear."""
    scheme = recipe.quantizer.scheme
    for name, module in _targets(model, recipe):
        k = module.in_features
        if scheme.group_size != -1 and k % scheme.group_size:
            raise ValueError(
                f"group_size {scheme.group_size} does not divide the {k} input features of {name}; choose a "
                f"divisor of {k} (e.g. 64 or 32) or -1 (channel-wise), or ignore that linear"
            )


def _targets(model: CausalLM, recipe: Recipe) -> list[tuple[str, nn.Linear]]:
    found = []
    for i, layer in enumerate(model.layers):
        for key in LAYER_KEYS:
            module = layer.get_submodule(key)
            name = f"layers.{i}.{key}"
            if isinstance(module, nn.Linear) and not recipe.is_ignored(name):
                found.append((name, module))
    if isinstance(model.lm_head, nn.Linear) and not recipe.is_ignored(LM_HEAD):
        found.append((LM_HEAD, model.lm_head))
    return found


@torch.no_grad()
def compress_model(
    model: CausalLM, recipe: Recipe, input_ids: torch.Tensor | None, options: PipelineOptions | None = None
) -> CompressResult:
    """Compresses ``model`` in place with ``recipe``, calibrating on ``input_ids [B, L]`` when it needs data."""
    check_recipe(model, recipe)
    start = time.perf_counter()
    runner = _Runner(model, recipe, options or PipelineOptions())
    if not recipe.required_stats():
        runner.weights_only()
        schedule, tokens = "weights-only", 0
    else:
        if input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"recipe {recipe.quantizer.name} needs calibration input_ids of shape [sequences, len]")
        if input_ids.shape[1] > model.max_positions:
            raise ValueError(
                f"calibration sequences of {input_ids.shape[1]} tokens exceed the model's {model.max_positions} "
                "positions"
            )
        runner.calibrate(input_ids)
        schedule, tokens = ("layer-wise" if recipe.layerwise else "stage-wise"), input_ids.numel()
    if runner.options.refresh_inference_weights:
        model.refresh_inference_weights()
    return CompressResult(time.perf_counter() - start, schedule, tokens, runner.quantized, runner.metrics)


class _Runner:
    def __init__(self, model: CausalLM, recipe: Recipe, options: PipelineOptions):
        self.model, self.recipe, self.options = model, recipe, options
        self.stat_kinds = recipe.required_stats()
        self.quantized: list[str] = []
        self._replaced: list[tuple[nn.Module, str]] = []
        self.metrics: list[dict[str, Any]] = []
        param = model.embed_tokens.weight
        # The model may be held in its checkpoint's 16-bit dtype (a 7B model in float32 would not fit beside
        # its calibration on a 24 GB machine); each layer is upcast when its turn comes, so the maths runs in
        # float32 (at least) and, 16-bit to float32 being exact, gives what a float32 load would.
        self.device, self.dtype = param.device, torch.promote_types(param.dtype, torch.float32)

    # ----------------------------------------------------------------- driving
    def weights_only(self) -> None:
        for i, layer in enumerate(self._progress(self.model.layers)):
            self._compress(i, layer.to(self.dtype), {key: None for key in LAYER_KEYS})
        self._upcast_head()
        self._compress(-1, None, {LM_HEAD: None})
        self._finish_modules()

    def calibrate(self, input_ids: torch.Tensor) -> None:
        b, length = input_ids.shape
        self.length = length
        self.chunk = max(1, self.options.chunk_tokens // length)
        self.sample_seqs = -(-self.recipe.sample_tokens() // length)
        self.cos_sin = self.model.cos_sin
        ids = input_ids.to(self.device)
        hidden = torch.empty(b, length, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        for sl in self._chunks(b):
            hidden[sl] = self.model.embed_tokens(ids[sl])
        step = self._layerwise if self.recipe.layerwise else self._stagewise
        for i, layer in enumerate(self._progress(self.model.layers)):
            step(i, layer.to(self.dtype), hidden)
            self._finish_modules()
        if self._is_target(-1, LM_HEAD):
            self._upcast_head()  # the lm_head's inputs come through the final norm: both in float32
            norm = self.model.norm
            stats = self._gather(lambda sl: norm(hidden[sl]), self.model.lm_head.in_features, b)
            self._compress(-1, None, {LM_HEAD: stats})
            self._finish_modules()

    def _upcast_head(self) -> None:
        if self._is_target(-1, LM_HEAD):
            self.model.norm.to(self.dtype)
            self.model.lm_head.to(self.dtype)

    def _finish_modules(self) -> None:
        for parent, attr in self._replaced:
            _rewrap(parent, attr)
        self._replaced.clear()

    def _progress(self, layers):
        desc = f"compress ({self.recipe.quantizer.name})"
        return tqdm(layers, desc=desc, unit="layer", disable=not self.options.progress)

    def _chunks(self, b: int) -> list[slice]:
        return [slice(s, min(s + self.chunk, b)) for s in range(0, b, self.chunk)]

    def _positions(self, sl: slice) -> torch.Tensor:
        return torch.arange(self.length, device=self.device).expand(sl.stop - sl.start, self.length)

    # ----------------------------------------------------------------- schedules
    def _stagewise(self, i: int, layer: DecoderLayer, hidden: torch.Tensor) -> None:
        b, length, _ = hidden.shape
        attn, mlp = layer.self_attn, layer.mlp
        cfg = self.model.config

        def attention_inputs(sl: slice) -> torch.Tensor:
            return layer.input_layernorm(hidden[sl])

        def mlp_inputs(sl: slice) -> torch.Tensor:
            return layer.post_attention_layernorm(hidden[sl])

        self._stage(i, QKV, attention_inputs, b)
        # Each intermediate buffer lives for one stage: computed once through the quantized stages before
        # it, read for statistics, then once more through the freshly quantized linear.
        buffer = torch.empty(b, length, cfg.q_size, dtype=self.dtype, device=self.device)
        for sl in self._chunks(b):
            buffer[sl] = _capture_input(
                attn.o_proj, attn.forward_dense, attention_inputs(sl), self._positions(sl), self.cos_sin
            )
        self._stage(i, O, buffer.__getitem__, b)
        for sl in self._chunks(b):
            hidden[sl] += attn.o_proj(buffer[sl])
        self._stage(i, GATE_UP, mlp_inputs, b)
        buffer = torch.empty(b, length, cfg.intermediate_size, dtype=self.dtype, device=self.device)
        for sl in self._chunks(b):
            buffer[sl] = _capture_input(mlp.down_proj, mlp, mlp_inputs(sl))
        self._stage(i, DOWN, buffer.__getitem__, b)
        for sl in self._chunks(b):
            hidden[sl] += mlp.down_proj(buffer[sl])

    def _stage(self, i: int, key: str, inputs: Callable[[slice], torch.Tensor], b: int) -> None:
        if self._is_target(i, key):
            in_features = self.model.layers[i].get_submodule(key).in_features
            stats = self._gather(inputs, in_features, b)
            self._compress(i, self.model.layers[i], {key: stats})
            if self.options.on_stage is not None:
                self.options.on_stage(i, key)

    def _layerwise(self, i: int, layer: DecoderLayer, hidden: torch.Tensor) -> None:
        b = hidden.shape[0]
        keys = [key for key in LAYER_KEYS if self._is_target(i, key)]
        hook = _GatherHook(
            {
                key: StatsAccumulator(
                    layer.get_submodule(key).in_features, self.stat_kinds, self.sample_seqs, self.device
                )
                for key in keys
            }
        )
        handles = [layer.get_submodule(key).register_forward_pre_hook(hook.for_key(key)) for key in keys]
        try:
            for sl in self._chunks(b):
                hook.first_sequence = sl.start
                try:
                    layer.forward_dense(hidden[sl], self._positions(sl), self.cos_sin)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        self._compress(i, layer, {key: acc.result() for key, acc in hook.accumulators.items()})
        hook.accumulators.clear()
        if self.options.on_stage is not None:
            self.options.on_stage(i, "layer")
        for sl in self._chunks(b):
            hidden[sl] = layer.forward_dense(hidden[sl], self._positions(sl), self.cos_sin)

    # ----------------------------------------------------------------- shared steps
    def _is_target(self, i: int, key: str) -> bool:
        owner = self.model if i < 0 else self.model.layers[i]
        module = getattr(owner, key) if i < 0 else owner.get_submodule(key)
        name = key if i < 0 else f"layers.{i}.{key}"
        return isinstance(module, nn.Linear) and not self.recipe.is_ignored(name)

    def _gather(self, inputs, in_features: int, b: int) -> InputStats:
        acc = StatsAccumulator(in_features, self.stat_kinds, self.sample_seqs, self.device)
        for sl in self._chunks(b):
            acc.add(inputs(sl), sl.start)
        return acc.result()

    def _compress(self, i: int, layer: DecoderLayer | None, stats: dict[str, InputStats | None]) -> None:
        owner = self.model if i < 0 else layer
        targets = {key: owner.get_submodule(key) for key in stats if self._is_target(i, key)}
        if not targets:
            return
        ctx = LayerContext(
            index=i,
            layer=layer,
            config=self.model.config,
            targets=targets,
            stats={k: s for k, s in stats.items() if s is not None},
            cos_sin=self.model.cos_sin,
        )
        for modifier in self.recipe.modifiers:
            modifier.apply(ctx)
        for key, qweight in ctx.quantized.items():
            self._replaced.append(_replace(owner, key, qweight))
            self.quantized.append(ctx.full_name(key))
        self.metrics.extend(ctx.metrics)


class _GatherHook:
    """Forward pre-hooks feeding each linear's inputs to its accumulator (the layer-wise schedule)."""

    def __init__(self, accumulators: dict[str, StatsAccumulator]):
        self.accumulators = accumulators
        self.first_sequence = 0

    def for_key(self, key: str):
        def hook(_module, args):
            self.accumulators[key].add(args[0], self.first_sequence)
            if key == DOWN:  # the layer's last linear: its output is not needed in this pass
                raise _StopForward

        return hook


def _capture_input(module: nn.Module, run: Callable[..., Any], *args: Any) -> torch.Tensor:
    """The input ``module`` receives while ``run(*args)`` executes; execution stops right there."""
    captured: list[torch.Tensor] = []

    def hook(_module, hook_args):
        captured.append(hook_args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run(*args)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(module).__name__} was never called")
    return captured[0]


def _replace(owner: nn.Module, key: str, qweight) -> tuple[nn.Module, str]:
    parent_name, _, attr = key.rpartition(".")
    parent = owner.get_submodule(parent_name) if parent_name else owner
    old = getattr(parent, attr)
    weight = old.weight
    qweight = type(qweight)(
        qweight.scheme,
        qweight.codes.to(weight.device),
        qweight.scales.to(weight.device),
        None if qweight.zero_points is None else qweight.zero_points.to(weight.device),
        None if qweight.g_idx is None else qweight.g_idx.to(weight.device),
    )
    module = QuantizedLinear(qweight, old.bias, compute_dtype=weight.dtype)
    # Calibration propagates through the reference semantics (exact, fast at many tokens, nothing to build).
    module.kernel_backend = "torch"
    setattr(parent, attr, module)
    return parent, attr


def _rewrap(parent: nn.Module, attr: str) -> None:
    """A fresh module for a finished layer: drops the reference kernel's dequantized weight, and the default
    kernel backend applies again once inference prepares it."""
    old = getattr(parent, attr)
    setattr(parent, attr, QuantizedLinear(old.qweight, old.bias, compute_dtype=old.compute_dtype))
