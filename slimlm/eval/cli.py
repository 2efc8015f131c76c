"""``slimlm eval MODEL --perplexity [--kl-div BASE_MODEL]``: quality of a (compressed) model on a text corpus.

Perplexity follows the GPTQ protocol (documents joined with a blank line, tokenized once,
non-overlapping windows of ``--seq-len`` tokens, exp of the mean next-token NLL); ``--kl-div`` also
loads BASE_MODEL and reports the mean KL(base || model) of the next-token distributions on the same
windows. The default data is the held-out test split of the built-in stdlib corpus.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["cmd_eval", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``eval`` to the ``slimlm`` subcommands."""
    p = subparsers.add_parser(
        "eval",
        help="perplexity (GPTQ protocol) and KL divergence against a base model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory (dense or compressed) or Hugging Face hub id")
    p.add_argument("--perplexity", action="store_true", help="report the perplexity")
    p.add_argument("--kl-div", metavar="BASE_MODEL", default=None, help="also report KL(base || model)")
    p.add_argument(
        "--data",
        default="stdlib-test",
        help="stdlib-test (default), a UTF-8 text file or directory, or hf:NAME[:CONFIG] (its test split)",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="window length (clamped to the model's positions)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the data")
    p.add_argument("--dtype", default=None, help="auto (fastest measured), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "cpu"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(a: argparse.Namespace) -> int:
    from slimlm.data.corpus import load_text
    from slimlm.eval.kl_div import kl_divergence
    from slimlm.eval.perplexity import perplexity, tokenize
    from slimlm.model.loader import load_model

    if not a.perplexity and not a.kl_div:
        raise ValueError("nothing to evaluate: pass --perplexity and/or --kl-div BASE_MODEL")
    loaded = load_model(a.model, dtype=a.dtype, device=a.device, kernels=a.kernels)
    dtype = loaded.model.embed_tokens.weight.dtype
    ids = tokenize(loaded.tokenizer, load_text(a.data, split="test"))
    report = {"model": a.model, "data": a.data, "dtype": str(dtype).removeprefix("torch.")}
    if a.kl_div:
        base = load_model(a.kl_div, dtype=dtype, device=a.device, kernels=a.kernels)
        if base.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise ValueError(f"{a.kl_div} and {a.model} have different tokenizers; KL divergence needs the same one")
        result = kl_divergence(loaded.model, base.model, ids, a.seq_len, max_tokens=a.max_tokens)
        report["base_model"] = a.kl_div
    else:
        result = perplexity(loaded.model, ids, a.seq_len, max_tokens=a.max_tokens)
    report.update(result.to_dict())
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{a.model} on {a.data}: perplexity {report['perplexity']:.4f}")
        if a.kl_div:
            print(
                f"KL({a.kl_div} || model) {report['kl_div']:.6f} nats/token; "
                f"base perplexity {report['base_perplexity']:.4f}"
            )
        print(
            f"{report['windows']} windows of {report['seq_len']} tokens ({report['tokens']} tokens), "
            f"{report['seconds']:.1f} s"
        )
    return 0
