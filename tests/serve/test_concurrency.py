"""Many streaming clients at once: all complete, each with exactly its offline greedy output."""

from __future__ import annotations

import asyncio
import random

from slimlm import SamplingParams
from tests.serve.conftest import API_KEY, MODEL

WORDS = "the quick brown fox jumps over lazy dog def add return a b".split()


def test_64_concurrent_streams_equal_offline_greedy(server, offline):
    import openai

    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(64)]
    lengths = [rng.randint(4, 24) for _ in prompts]
    ref = offline.generate(
        prompts,
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths],
        use_tqdm=False,
    )

    async def one(client, prompt, max_tokens):
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))

    # A random model's greedy text repeats a token, but differs across prompts; lengths differ too, so a
    # response delivered to the wrong client would show.
    assert len({r.outputs[0].text for r in ref}) > 5
    results = asyncio.run(run_all())
    assert [text for text, _ in results] == [r.outputs[0].text for r in ref]
    assert all(finish == "length" for _, finish in results)
