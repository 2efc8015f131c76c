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
        """Decode rate from the first new token to the last, timed inside one ``generate`` (as ours is).

        Subtracting a separately timed prefill went negative where the prefill was slow and noisy: a 128-token
        bf16 prefill took ~12 s on a CPU without AVX512-BF16 and one round measured -27.8 tok/s.
        """
        if new_tokens < 2:
            raise ValueError(f"a decode rate needs at least 2 new tokens, got {new_tokens}")
        clock = _TokenClock()
        self.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, streamer=clock)
        return clock.decode_tokens_per_s()


class _TokenClock:
    """A ``generate`` streamer that only notes when each call comes: the prompt first, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tokens_per_s(self) -> float:
        tokens = self.times[1:]  # the first call hands over the prompt, before the prefill
        if len(tokens) < 2:
            raise RuntimeError(f"generate produced {len(tokens)} token(s); a decode rate needs at least 2")
        return (len(tokens) - 1) / (tokens[-1] - tokens[0])
