"""Compressing a checkpoint end to end: load in float32, calibrate, compress, write, report."""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from slimlm.compress.calibration import CalibrationConfig, calibration_ids
from slimlm.compress.pipeline import PipelineOptions, check_recipe, compress_model
from slimlm.compress.recipe import Recipe
from slimlm.model.dtype import parse_dtype
from slimlm.model.loader import load_config, load_model, resolve_model_path
from slimlm.model.quantized_weight import QuantScheme

__all__ = ["compress_checkpoint", "peak_rss_mib", "scheme_name"]

logger = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1 << 20) if sys.platform == "darwin" else kib / 1024  # bytes on macOS, KiB on Linux


def scheme_name(scheme: QuantScheme) -> str:
    """Short label: ``w4a16-g128``, ``w4a16-g64-asym``, ``w8a8``, ``nf4-b64`` ..."""
    if scheme.kind == "nf4":
        return f"nf4-b{scheme.group_size}"
    acts = "a8" if scheme.activations == "int8-token" else "a16"
    group = "" if scheme.group_size == -1 else f"-g{scheme.group_size}"
    return f"w{scheme.bits}{acts}{group}{'' if scheme.symmetric else '-asym'}"


def _holding_dtype(checkpoint_dtype: str | None) -> str:
    """The checkpoint's dtype where it is a float type torch holds exactly in float32, else float32."""
    return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16", "float32") else "float32"


def compress_checkpoint(
    model: str | Path,
    out_dir: str | Path,
    recipe: Recipe | Any,
    calibration: CalibrationConfig | None = None,
    *,
    device: str | None = None,
    save_dtype: str | None = None,
    options: PipelineOptions | None = None,
) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` (a :class:`Recipe`, or a callable ``ModelConfig -> Recipe`` for
    defaults that depend on the shape) and write it to ``out_dir``; returns the report."""
    from slimlm.compress.checkpoint import save_compressed

    start = time.perf_counter()
    path = resolve_model_path(model)
    config = load_config(path)
    if not isinstance(recipe, Recipe):
        recipe = recipe(config)
    calibration = calibration or CalibrationConfig()
    # Held in the checkpoint's own dtype; the pipeline upcasts one layer at a time (see _Runner).
    loaded = load_model(path, dtype=_holding_dtype(config.torch_dtype), device=device, kernels="torch")
    net = loaded.model
    check_recipe(net, recipe)
    device_type = net.embed_tokens.weight.device.type
    ids = None
    if recipe.required_stats():
        if loaded.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; calibration needs one")
        ids = calibration_ids(loaded.tokenizer, calibration, device_type, net.max_positions)
        logger.info("calibration: %d x %d tokens from %s", ids.shape[0], ids.shape[1], calibration.source)
    result = compress_model(net, recipe, ids, options)
    dtype = parse_dtype(save_dtype or loaded.config.torch_dtype or "float32")
    scheme = recipe.quantizer.scheme
    calib = None
    if ids is not None:
        calib = {**asdict(calibration), "sequences": ids.shape[0], "seq_len": ids.shape[1], "tokens": ids.numel()}
    metadata = {
        "method": "+".join(m.name for m in recipe.modifiers),
        "scheme": scheme_name(scheme),
        "recipe": recipe.to_dict(),
        "calibration": calib,
        "schedule": result.schedule,
        "base_model": str(model),
    }
    out = save_compressed(net, loaded.tokenizer, out_dir, metadata, dtype=dtype)
    return {
        "method": metadata["method"],
        "scheme": metadata["scheme"],
        "scheme_fields": asdict(scheme),
        "recipe": metadata["recipe"],
        "calibration_tokens": result.calibration_tokens,
        "calibration": calib,
        "schedule": result.schedule,
        "quantized_linears": len(result.quantized),
        "compress_seconds": round(result.seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": device_type,
        "threads": torch.get_num_threads(),
        "output": str(out),
        "metrics": result.metrics,
    }
