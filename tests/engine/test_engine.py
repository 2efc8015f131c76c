"""End-to-end engine behaviour on tiny random checkpoints, against transformers and against itself."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm import LLM, SamplingParams
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from tests.conftest import ARCHS

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def make_engine(path, **kwargs) -> Engine:
    defaults = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=256)
    return Engine(EngineConfig(model=str(path), **{**defaults, **kwargs}))


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("alone", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final.outputs[0].token_ids


def random_prompts(count: int, vocab: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_transformers_for_64_tokens(hf_checkpoints, arch):
    path = hf_checkpoints[arch]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    # Like ignore_eos: EOS may be generated but does not stop (min_new_tokens would instead forbid it).
    ref.generation_config.eos_token_id = None
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=128)
    prompts = random_prompts(3, ref.config.vocab_size, seed=7)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, len(prompt) :]
        assert len(expected) == 64
        expected = expected.tolist()
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"


def test_requests_arriving_mid_run_match_their_solo_outputs(hf_checkpoints):
    path = hf_checkpoints["qwen2-bias"]
    engine = make_engine(path, max_num_batched_tokens=48)  # small budget: prompts are chunked too
    prompts = random_prompts(16, 300, seed=3, lo=2, hi=90)
    lengths = [5 + 7 * (i % 5) for i in range(16)]
    solo = [
        run_alone(engine, p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    pending = list(range(16))
    results: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        # Two new requests join every third step while earlier ones are mid-prefill or decoding.
        if pending and step % 3 == 0:
            for i in pending[:2]:
                engine.add_request(
                    str(i), prompts[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True)
                )
            pending = pending[2:]
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [results[str(i)] for i in range(16)] == solo


def test_shared_prefix_reuses_cached_blocks(hf_checkpoints):
    engine = make_engine(hf_checkpoints["llama-gqa-tied"], block_size=8)
    prefix = random_prompts(1, 300, seed=11, lo=40, hi=40)[0]
    first = run_alone(engine, prefix + [5, 6, 7], GREEDY)
    stats = engine.block_manager.stats
    hits_before = stats.hit_tokens
    second = run_alone(engine, prefix + [5, 6, 7], GREEDY)
    assert stats.hit_tokens - hits_before == 40  # five full 8-token blocks of the 43-token prompt
    assert second == first
    # A different suffix still shares the prefix blocks, and its output equals a cache-free engine's.
    third = run_alone(engine, prefix + [9], GREEDY)
    assert stats.hit_tokens - hits_before == 80
    cold = make_engine(hf_checkpoints["llama-gqa-tied"], block_size=8, enable_prefix_caching=False)
    assert third == run_alone(cold, prefix + [9], GREEDY)


def test_tiny_kv_budget_preempts_and_still_finishes_everything(hf_checkpoints):
    path = hf_checkpoints["mistral-window"]
    prompts = random_prompts(8, 300, seed=5, lo=30, hi=50)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    roomy = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=200)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # 9 blocks of 16 tokens: room for one 110-token sequence at a time, so the engine must preempt.
    tight = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=9)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert tight.engine.stats.preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == 9


def test_seeded_sampling_reproduces_whatever_the_batch(hf_checkpoints):
    llm = LLM(
        str(hf_checkpoints["llama-gqa-tied"]),
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=256,
        num_kv_blocks=128,
    )
    prompt = [1, 2, 3, 4]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(5, 300, seed=2)
    mixed = llm.generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3
        + [seeded]
        + [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 2,
        use_tqdm=False,
    )
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = llm.generate(
        [prompt],
        SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=99, ignore_eos=True),
        use_tqdm=False,
    )
    assert other_seed[0].outputs[0].token_ids != alone
    # n > 1 samples of one seeded request differ from each other yet reproduce together.
    pair = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    a = [c.token_ids for c in llm.generate([prompt], pair, use_tqdm=False)[0].outputs]
    b = [c.token_ids for c in llm.generate([prompt], pair, use_tqdm=False)[0].outputs]
    assert a == b and a[0] != a[1]


def test_logprobs_and_prompt_logprobs_match_the_reference_model(hf_checkpoints):
    path = hf_checkpoints["qwen3-qknorm"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64)
    prompt = random_prompts(1, 300, seed=9, lo=12, hi=12)[0]
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True),
        use_tqdm=False,
    )[0]
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref_lp[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (which may include it)
    for i, token in enumerate(out.outputs[0].token_ids):
        entry = out.outputs[0].logprobs[i]
        row = ref_lp[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the top token
        top3 = torch.topk(row, 3).indices.tolist()
        assert set(entry) == set(top3)


def test_bad_requests_are_rejected_without_disturbing_others(hf_checkpoints):
    llm = LLM(
        str(hf_checkpoints["llama-gqa-tied"]),
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=64,
        num_kv_blocks=32,
    )
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 64], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2], [5, 100000]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 32
    good = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == 5


def test_abort_frees_blocks(hf_checkpoints):
    engine = make_engine(hf_checkpoints["llama-gqa-tied"], num_kv_blocks=32)
    engine.add_request("a", [1, 2, 3] * 10, GREEDY)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 32
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == 32
    assert not engine.has_unfinished_requests()
