"""Ship trained runs as the project's reference models: ``models/<name>/`` with a model card.

``python -m slimlm.train.ship --target-run runs/py-target --draft-run runs/py-draft --out models``
copies each run's Hugging Face directory, measures the quality facts from the copied (bf16) weights
(:mod:`slimlm.train.quality`) and writes ``quality.json`` and a ``README.md`` card next to them. The
new directory replaces the old one only when complete (temp dir, then rename).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from slimlm.train import quality

QUALITY_FILE = quality.QUALITY_FILE


def _fmt_seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _train_command(training: dict[str, Any], name: str) -> str:
    cfg = training["config"]
    parts = [f"slimlm train --preset {name} --out runs/{name}"]
    if cfg.get("time_limit"):
        parts.append(f"--time-limit {cfg['time_limit']:g}")
    if cfg.get("fit_to_time_limit"):
        parts.append("--fit-to-time-limit")
    return " ".join(parts)


def model_card(name: str, training: dict[str, Any], facts: dict[str, Any], commands: list[str] | None = None) -> str:
    """``commands``: the exact training commands in order (a run resumed for more time has several)."""
    cfg, mc = training["config"], training["model_config"]
    status = "completed" if training["completed"] else f"stopped by {training['stopped_by']}"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [slimlm, llama, python, code]",
        "---",
        f"# {name}",
        "",
        f"A {training['parameters'] / 1e6:.1f}M-parameter Llama-architecture model trained from scratch by slimlm "
        "on the Python standard library's own source (the text every machine with Python has). It exists so "
        "that slimlm's quality claims (quantization loss, speculative acceptance) rest on a real trained model; "
        "it is small and it writes plausible-looking Python, not correct programs.",
        "",
        "## Shape",
        f"- {mc['num_hidden_layers']} layers, hidden {mc['hidden_size']}, {mc['num_attention_heads']} heads "
        f"({mc['num_key_value_heads']} KV heads, GQA), MLP {mc['intermediate_size']}, vocab {mc['vocab_size']} "
        f"(byte-level BPE trained on the same split), tied embeddings, context {mc['max_position_embeddings']}.",
        f"- {training['parameters']:,} parameters ({training['non_embedding_parameters']:,} non-embedding); "
        "weights stored in bfloat16.",
        "",
        "## Training",
        (
            "- Commands, in order (the run was resumed from its checkpoint): "
            + "; then ".join(f"`{c}`" for c in commands)
            if commands and len(commands) > 1
            else f"- Command: `{commands[0] if commands else _train_command(training, name)}`"
        ),
        f"- Data: `{cfg['train_data']}` (the stdlib `.py` files outside the held-out modules; split by a hash of "
        "the module name, see `slimlm.data.corpus`), documents as `<bos> text <eos>`, windows of "
        f"{cfg['seq_len']} tokens.",
        f"- Optimiser: AdamW (lr {cfg['lr']:g} -> {cfg['min_lr']:g}, warmup + cosine, weight decay "
        f"{cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}), {cfg['batch_tokens']} tokens per step.",
        f"- Steps: {training['steps']} ({status}); "
        f"tokens seen: {training['tokens_seen']:,}; training time {_fmt_seconds(training['train_seconds'])}, "
        f"wall time {_fmt_seconds(training['wall_seconds'])} on {training['device']} "
        f"({training['threads']} threads, {training['autocast']}).",
        "",
        "## Quality (measured from these bf16 weights, loaded in float32)",
        f"- Validation perplexity at the end of training (float32 weights): {training['val_ppl']:.3f} "
        f"({training['val_tokens']:,} tokens).",
        f"- **Test perplexity: {facts['test_ppl']:.3f}** over the whole `stdlib-test` split "
        f"({facts['test_tokens']:,} predicted tokens, windows of {facts['seq_len']}; the trainer's own float32 "
        f"figure was {training['test_ppl']:.3f}).",
    ]
    if "draft_agreement" in facts:
        lines.append(
            f"- Greedy agreement with `{facts['agreement_with']}` on held-out text: "
            f"{facts['draft_agreement'] * 100:.1f}% of {facts['agreement_tokens']:,} positions (the speculative "
            "acceptance proxy: a greedy proposal is accepted exactly when the argmaxes agree)."
        )
    lines += ["", "## Greedy continuations of held-out function signatures", ""]
    for c in facts["continuations"]:
        lines += ["```python", c["prompt"] + c["completion"], "```", ""]
    lines += [
        "## Use",
        "```python",
        "from slimlm import LLM, SamplingParams",
        f'llm = LLM("models/{name}")',
        'print(llm.generate("def parse_args(argv):", SamplingParams(max_tokens=64))[0].outputs[0].text)',
        "```",
        "It loads unchanged in `transformers.AutoModelForCausalLM`.",
        "",
    ]
    return "\n".join(lines)


def _stage(run_dir: Path, out_root: Path, name: str) -> Path:
    src = run_dir / "model"
    if not (src / "training.json").is_file():
        raise SystemExit(f"{src} has no training.json: finish the training run first")
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_root))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def ship(
    target_run: Path, draft_run: Path, out_root: Path, commands: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """``commands``: per model name, the exact training commands for its card (default: rebuilt from its config)."""
    staged = {
        "py-target": _stage(target_run, out_root, "py-target"),
        "py-draft": _stage(draft_run, out_root, "py-draft"),
    }
    try:
        trainings = {n: json.loads((d / "training.json").read_text()) for n, d in staged.items()}
        loaded = {n: quality.load_fp32(d) for n, d in staged.items()}
        prompts = quality.heldout_signatures()
        facts: dict[str, dict[str, Any]] = {}
        for name, lm in loaded.items():
            seq_len = trainings[name]["config"]["seq_len"]
            t0 = time.perf_counter()
            ppl = quality.shipped_test_perplexity(lm, seq_len)
            facts[name] = {
                "test_ppl": ppl["ppl"],
                "test_loss": ppl["loss"],
                "test_tokens": ppl["tokens"],
                "seq_len": seq_len,
                "split": "stdlib-test",
                "protocol": "slimlm.train.quality.shipped_test_perplexity",
                "continuations": quality.greedy_continuations(staged[name], prompts),
            }
            print(f"{name}: test ppl {ppl['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)")
        seq_len = trainings["py-target"]["config"]["seq_len"]
        agreement, compared = quality.greedy_agreement(loaded["py-target"], loaded["py-draft"], seq_len)
        for name, other in (("py-target", "py-draft"), ("py-draft", "py-target")):
            facts[name].update(draft_agreement=agreement, agreement_with=other, agreement_tokens=compared)
        for name, d in staged.items():
            facts[name]["training_commands"] = (commands or {}).get(name) or [_train_command(trainings[name], name)]
            (d / QUALITY_FILE).write_text(json.dumps(facts[name], indent=2) + "\n")
            card = model_card(name, trainings[name], facts[name], facts[name]["training_commands"])
            (d / "README.md").write_text(card)
        for name, d in staged.items():
            _publish(d, out_root / name)
    finally:
        for d in staged.values():
            shutil.rmtree(d, ignore_errors=True)
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-run", type=Path, default=Path("runs/py-target"))
    p.add_argument("--draft-run", type=Path, default=Path("runs/py-draft"))
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--target-command", action="append", help="a training command for the card (repeat, in order)")
    p.add_argument("--draft-command", action="append", help="a training command for the card (repeat, in order)")
    a = p.parse_args(argv)
    commands = {"py-target": a.target_command, "py-draft": a.draft_command}
    facts = ship(a.target_run, a.draft_run, a.out, {k: v for k, v in commands.items() if v})
    print(json.dumps({n: {k: v for k, v in f.items() if k != "continuations"} for n, f in facts.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
