"""transformers' own ``generate`` on the same checkpoint and dtype: the baseline slimlm must beat."""

from __future__ import annotations

import time

import torch


class HFBaseline:
    def __init__(self, path: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        # Generate exactly the requested number of tokens, as slimlm's ignore_eos runs do.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def prefill_tokens_per_s(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        self.model(ids, logits_to_keep=1)
        return len(prompt) / (time.perf_counter() - start)

    @torch.inference_mode()
    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float:
        """Decode rate with the prompt's prefill subtracted (timed separately, as ours is)."""
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        self.model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
        generated = out.shape[1] - len(prompt)
        return (generated - 1) / (total - first)
