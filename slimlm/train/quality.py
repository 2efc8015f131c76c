"""Quality facts of a trained model, measured from its saved (shipped) weights.

- test perplexity: the trainer's protocol (``evaluate_perplexity``: ``<bos> doc <eos>`` stream of the
  split, non-overlapping windows of the training length), recomputed from the saved bf16 weights
  loaded in float32, so the number describes the file a user gets;
- greedy continuations of held-out function signatures (they should read as Python);
- draft-vs-target greedy agreement: over held-out windows, the fraction of positions where the two
  models' argmax next tokens agree (teacher-forced). It is the speculative acceptance proxy: with
  greedy verification, a proposal survives exactly when the draft's argmax equals the target's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from slimlm.model.loader import LoadedModel, load_model
from slimlm.train.data import as_tensor, documents, eval_windows, load_tokens
from slimlm.train.evaluate import evaluate_perplexity

__all__ = ["greedy_agreement", "heldout_signatures", "shipped_test_perplexity", "greedy_continuations"]

QUALITY_FILE = "quality.json"
_SIGNATURE = re.compile(r"^def [a-z_][a-z0-9_]*\(.*\):$")


def load_fp32(path: str | Path) -> LoadedModel:
    return load_model(path, dtype="float32")


def split_tokens(loaded: LoadedModel, split: str) -> torch.Tensor:
    return as_tensor(load_tokens(split, loaded.tokenizer))


def shipped_test_perplexity(loaded: LoadedModel, seq_len: int, split: str = "stdlib-test") -> dict[str, float]:
    """Perplexity of the whole ``split`` with the trainer's protocol (see the module doc)."""
    with torch.inference_mode():
        return evaluate_perplexity(
            loaded.model,
            split_tokens(loaded, split),
            seq_len=seq_len,
            batch_size=1,
            device=torch.device("cpu"),
        )


def greedy_agreement(
    target: LoadedModel, draft: LoadedModel, seq_len: int, max_tokens: int = 16384
) -> tuple[float, int]:
    """Fraction of held-out (test split) positions where draft and target argmax tokens agree, and how
    many positions were compared."""
    tokens = split_tokens(target, "stdlib-test")
    agree = total = 0
    with torch.inference_mode():
        for batch in eval_windows(tokens, seq_len, 1, max_tokens):
            a = target.model.forward_dense(batch.input_ids).argmax(-1)
            b = draft.model.forward_dense(batch.input_ids).argmax(-1)
            agree += int((a == b).sum())
            total += a.numel()
    return agree / max(total, 1), total


def heldout_signatures(count: int = 4, split: str = "stdlib-test") -> list[str]:
    """The first one-line top-level function signature of each of the first ``count`` held-out files
    that has one (deterministic: the corpus order is).

    The prompts end at the colon, without the newline: the BPE merges a newline with the indentation
    that follows it, so a prompt ending in a bare newline token is one the model never saw in training
    (it answers with a blank line and a new top-level statement instead of a body)."""
    found = []
    for doc in documents(split):
        for line in doc.splitlines():
            if _SIGNATURE.match(line) and len(line) < 70:
                found.append(line)
                break
        if len(found) == count:
            break
    return found


def greedy_continuations(path: str | Path, prompts: list[str], max_tokens: int = 48) -> list[dict[str, Any]]:
    from slimlm import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [{"prompt": p, "completion": o.outputs[0].text} for p, o in zip(prompts, outs, strict=True)]
