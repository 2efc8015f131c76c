"""``slimlm compress``: quantize a checkpoint into a compressed-tensors directory.

Methods: ``rtn`` (no calibration), ``gptq``, ``awq``, ``smoothquant`` (W8A8: smoothing + GPTQ int8 with
dynamic per-token int8 activations) and ``nf4``; defaults 4 bits, group 128 (64 or 32 where 128 does not
divide the model's widths), symmetric. ``--recipe FILE`` runs a YAML recipe instead (see
``slimlm.compress.recipe``), e.g. SmoothQuant followed by RTN, or AWQ with other search settings.

Calibration: ``--calib-data`` is ``stdlib`` (the built-in corpus' train split), a text file or
directory, or ``hf:NAME[:CONFIG]``; defaults on CPU 64 x 512 tokens, on CUDA 128 x 2048.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging

from slimlm.compress.calibration import CalibrationConfig
from slimlm.compress.pipeline import PipelineOptions
from slimlm.compress.recipe import METHODS, Recipe, method_recipe

__all__ = ["cmd_compress", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``compress`` to the ``slimlm`` subcommands."""
    p = subparsers.add_parser(
        "compress",
        help="quantize a model (rtn, gptq, awq, smoothquant, nf4) into a compressed checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory or Hugging Face hub id")
    p.add_argument("--method", choices=METHODS, default=None, help="the algorithm (or give --recipe)")
    p.add_argument("--recipe", default=None, metavar="FILE", help="a YAML recipe (replaces --method and its flags)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    g = p.add_argument_group("scheme")
    g.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4; smoothquant: 8)")
    g.add_argument("--group-size", type=int, default=None, help="input columns per scale; -1: channel-wise")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None, help="default: symmetric")
    g.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation")
    g.add_argument("--double-quant", action="store_true", help="nf4: quantize the block scales to 8 bits")
    g.add_argument(
        "--ignore",
        action="append",
        default=None,
        metavar="NAME",
        help="keep a linear dense (repeatable; "
        "a name such as layers.0.mlp.down_proj, a glob, or re:REGEX; default: lm_head)",
    )
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-data", default="stdlib", help="stdlib, a text file or directory, or hf:NAME[:CONFIG]")
    c.add_argument("--calib-tokens", type=int, default=None, help="total tokens (default: 32768 CPU, 262144 CUDA)")
    c.add_argument("--calib-seq-len", type=int, default=None, help="tokens per sequence (default: 512 CPU, 2048 CUDA)")
    c.add_argument("--seed", type=int, default=0, help="order of the calibration sequences")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--save-dtype", default=None, help="dtype of the dense tensors (default: the base checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_compress)
    return p


def _recipe_source(a: argparse.Namespace):
    if a.recipe is not None:
        flags = {"--method": a.method, "--bits": a.bits, "--group-size": a.group_size, "--symmetric": a.symmetric}
        given = [flag for flag, value in flags.items() if value is not None]
        given += [flag for flag, on in (("--act-order", a.act_order), ("--double-quant", a.double_quant)) if on]
        if given:
            raise ValueError(f"--recipe replaces {', '.join(given)}; put those settings in the recipe file")
        recipe = Recipe.from_yaml(a.recipe)
        if a.ignore is not None:
            recipe.ignore = list(a.ignore)
        return recipe
    if a.method is None:
        raise ValueError("give --method (rtn, gptq, awq, smoothquant, nf4) or --recipe FILE")
    return functools.partial(
        method_recipe,
        a.method,
        bits=a.bits,
        group_size=a.group_size,
        symmetric=a.symmetric,
        act_order=a.act_order,
        double_quant=a.double_quant,
        ignore=a.ignore,
    )


def cmd_compress(a: argparse.Namespace) -> int:
    from slimlm.compress.run import compress_checkpoint

    if a.json:
        logging.getLogger("slimlm").setLevel(logging.WARNING)
    calibration = CalibrationConfig(source=a.calib_data, tokens=a.calib_tokens, seq_len=a.calib_seq_len, seed=a.seed)
    report = compress_checkpoint(
        a.model,
        a.out,
        _recipe_source(a),
        calibration,
        device=a.device,
        save_dtype=a.save_dtype,
        options=PipelineOptions(progress=a.progress, refresh_inference_weights=False),
    )
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['method']} {report['scheme']}: {report['quantized_linears']} linears, "
            f"{report['calibration_tokens']} calibration tokens, {report['seconds']:.1f}s, "
            f"peak RSS {report['peak_rss_mib']:.0f} MiB -> {report['output']}"
        )
    return 0
