"""Speculative decoding end to end: greedy outputs are token-identical to plain decoding whatever the proposer,
batch, arrivals, prefix cache or KV pressure, and the counters say what happened."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.engine.speculative.proposer import Proposals, Proposer
from slimlm.sampling_params import SamplingParams
from tests.conftest import TINY

VOCAB = TINY["vocab_size"]
K = 4


@pytest.fixture(scope="module")
def target(hf_checkpoints):
    # Varied greedy outputs, and a sliding window (7) shorter than prompt + proposals: verification queries
    # must see exactly the keys a one-token step would.
    return hf_checkpoints["mistral-window"]


@pytest.fixture(scope="module")
def drafts(target, tmp_path_factory):
    """A smaller random model with the target's vocabulary, and a noisy copy of the target (partial acceptance)."""
    root = tmp_path_factory.mktemp("drafts")
    cfg = AutoConfig.for_model(
        "llama", **{**TINY, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "head_dim": 16}
    )
    torch.manual_seed(1)
    small = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    small.save_pretrained(root / "small")
    noisy = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() > 1:
                p.add_(0.5 * p.std() * torch.randn_like(p))
    noisy.save_pretrained(root / "noisy")
    return {"small": str(root / "small"), "noisy": str(root / "noisy"), "self": str(target)}


def make_engine(path, spec=None, **kwargs) -> Engine:
    defaults = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=256)
    return Engine(EngineConfig(model=str(path), speculative_config=spec, **{**defaults, **kwargs}))


def spec_config(method: str, drafts: dict | None = None, draft: str = "small", **kw) -> dict:
    cfg = {"method": method, "num_speculative_tokens": K, **kw}
    if method == "draft":
        cfg["model"] = drafts[draft]
    return cfg


def mixed_params(count: int) -> list[SamplingParams]:
    """Greedy requests that exercise what verification must reproduce: penalties (which see accepted proposals
    as output), min_tokens, logprobs, and max_tokens that end inside an accepted run."""
    kinds = [
        dict(),
        dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
        dict(logprobs=3),
        dict(min_tokens=9, stop_token_ids=[7, 11, 19]),
    ]
    return [
        SamplingParams(temperature=0, max_tokens=17 + 5 * (i % 4), ignore_eos=True, **kinds[i % len(kinds)])
        for i in range(count)
    ]


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat their own pieces, as copied code does, so prompt lookup finds something."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        piece = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))]
        prompts.append((piece * rng.randint(2, 4) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))])[:80])
    return prompts


def generate(engine: Engine, prompts, params, join_every: int = 0) -> dict[str, object]:
    """Runs the prompts to completion; join_every > 0 adds two requests every join_every steps instead of all."""
    pending = list(range(len(prompts)))
    results = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (not join_every or step % join_every == 0):
            take = pending if not join_every else pending[:2]
            for i in take:
                engine.add_request(str(i), prompts[i], params[i])
            pending = pending[len(take) :]
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0]
        step += 1
    return [results[str(i)] for i in range(len(prompts))]


def assert_same(outs, refs):
    for out, ref in zip(outs, refs, strict=True):
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == ref.finish_reason
        assert out.stop_reason == ref.stop_reason
        if ref.logprobs is not None:
            for got, want in zip(out.logprobs, ref.logprobs, strict=True):
                assert list(got) == list(want)  # same chosen token and top ids, in order
                for tid, lp in want.items():
                    assert got[tid].logprob == pytest.approx(lp.logprob, abs=1e-4)
                    assert got[tid].rank == lp.rank
            assert out.cumulative_logprob == pytest.approx(ref.cumulative_logprob, abs=1e-3)


@pytest.fixture(scope="module")
def reference(target):
    prompts = repetitive_prompts(16, seed=5)
    params = mixed_params(16)
    return prompts, params, generate(make_engine(target), prompts, params)


@pytest.mark.parametrize(
    "method,draft",
    [("ngram", None), ("draft", "small"), ("draft", "noisy"), ("draft", "self")],
)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_greedy_outputs_are_identical_to_plain_decoding(target, drafts, reference, method, draft, batch):
    prompts, params, refs = reference
    engine = make_engine(target, spec_config(method, drafts, draft, adaptive=batch != 3))
    # Batch 16 arrives two requests at a time while earlier ones are prefilling or decoding.
    outs = generate(engine, prompts[:batch], params[:batch], join_every=3 if batch == 16 else 0)
    assert_same(outs, refs[:batch])
    stats = engine.stats.speculative
    assert stats.proposed_tokens > 0 and stats.verify_steps > 0
    if draft == "self" and batch == 3:  # not adaptive: every decode step proposes K (less at the max_tokens cut)
        assert stats.accepted_tokens == stats.proposed_tokens
        assert stats.acceptance_rate == 1.0


def test_prefix_cache_hits_and_chunked_prompts_keep_outputs_identical(target, drafts):
    rng = random.Random(11)
    shared = [rng.randrange(VOCAB) for _ in range(40)]
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    params = mixed_params(6)
    refs = generate(make_engine(target, max_num_batched_tokens=24), prompts, params, join_every=2)
    for draft in ("self", "small"):
        engine = make_engine(target, spec_config("draft", drafts, draft, adaptive=False), max_num_batched_tokens=24)
        assert_same(generate(engine, prompts, params, join_every=2), refs)
        assert engine.block_manager.stats.hit_tokens > 0
    assert engine.stats.speculative.proposed_tokens > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tiny_kv_budget_preempts_and_outputs_stay_identical(target, drafts, method):
    prompts = repetitive_prompts(5, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * 5
    refs = generate(make_engine(target), prompts, params)
    # 10 blocks of 16 tokens: two of these sequences at most, so the engine must preempt (and recompute).
    spec = spec_config(method, drafts, "self", adaptive=False)
    engine = make_engine(target, spec, num_kv_blocks=10, max_model_len=160)
    assert_same(generate(engine, prompts, params), refs)
    assert engine.stats.preemptions > 0
    assert engine.stats.speculative.accepted_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked


def test_self_draft_accepts_everything_and_counters_add_up(target, drafts):
    prompts = repetitive_prompts(3, seed=2)
    # 1 token from the prefill, then runs of K + 1: max_tokens never cuts a run short.
    params = [SamplingParams(temperature=0, max_tokens=1 + 6 * (K + 1), ignore_eos=True)] * 3
    engine = make_engine(target, spec_config("draft", drafts, "self", adaptive=False))
    outs = generate(engine, prompts, params)
    s = engine.stats.speculative
    assert s.verified_seqs == 3 * 6
    assert s.planned_tokens == s.proposed_tokens == s.accepted_tokens == 3 * 6 * K
    assert s.emitted_tokens == s.accepted_tokens + s.verified_seqs
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length == K
    assert engine.stats.generation_tokens == sum(len(o.token_ids) for o in outs) == 3 + s.emitted_tokens
    m = engine.speculative_metrics()
    assert m["acceptance_rate"] == 1.0 and m["mean_accepted_length"] == K and m["mean_tokens_per_verify"] == K + 1
    assert m["method"] == "draft" and m["verify_steps"] == 6 and m["decode_steps"] == 6
    assert make_engine(target).speculative_metrics() == {}


class _AlwaysWrong(Proposer):
    """Proposes tokens that are known to differ from the greedy continuation: acceptance is exactly 0."""

    method = "wrong"

    def __init__(self, prompt: list[int], continuation: list[int]):
        self.full = prompt + continuation

    def propose(self, seqs, num_tokens):
        return Proposals(
            [
                [(self.full[s.num_tokens + j] + 1) % VOCAB for j in range(k)]
                for s, k in zip(seqs, num_tokens, strict=True)
            ]
        )


def test_zero_acceptance_switches_speculation_off(target):
    prompt = repetitive_prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    ref = generate(make_engine(target), [prompt], [params])[0]
    engine = make_engine(target, {"method": "ngram", "num_speculative_tokens": K, "probe_interval": 32})
    engine.speculator.proposer = _AlwaysWrong(prompt, ref.token_ids)
    engine.add_request("0", prompt, params)
    planned_after: list[int] = []
    while engine.has_unfinished_requests():
        out = engine.step()
        planned_after.append(engine.stats.speculative.planned_tokens)
    assert out[0].outputs[0].token_ids == ref.token_ids
    s = engine.stats.speculative
    assert s.accepted_tokens == 0 and s.proposed_tokens > 0
    # After the first measurements, only two one-token probes every probe_interval decode steps are left.
    late = planned_after[-1] - planned_after[40]
    assert late <= 2 * ((len(planned_after) - 40) // 32 + 1)
    assert s.plain_decode_steps > 100
    assert s.predicted_speedup is not None and s.predicted_speedup <= 1.0


def test_disable_by_batch_size_turns_speculation_off(target):
    prompts = repetitive_prompts(4, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 4
    spec = {"method": "ngram", "num_speculative_tokens": K, "disable_by_batch_size": 4, "adaptive": False}
    engine = make_engine(target, spec)
    generate(engine, prompts, params)
    assert engine.stats.speculative.planned_tokens == 0


def test_config_errors_name_the_field(target, tmp_path):
    with pytest.raises(ValueError, match="method"):
        make_engine(target, {"method": "eagle"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_engine(target, {"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="model"):
        make_engine(target, {"method": "draft", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown key"):
        make_engine(target, {"method": "ngram", "num_speculative_token": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        make_engine(target, {"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2})
    cfg = AutoConfig.for_model("llama", **{**TINY, "vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 1})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocab_size 200 but the target .* has 300"):
        make_engine(target, {"method": "draft", "model": str(tmp_path / "other")})


def test_cli_engine_args_build_the_speculative_config():
    from slimlm.cli import _engine_kwargs, build_parser

    args = build_parser().parse_args(
        ["generate", "m", "--prompt", "x", "--speculative-method", "draft", "--num-speculative-tokens", "3",
         "--draft-model", "d"]
    )  # fmt: skip
    assert _engine_kwargs(args)["speculative_config"] == {"method": "draft", "num_speculative_tokens": 3, "model": "d"}
    plain = build_parser().parse_args(["generate", "m", "--prompt", "x"])
    assert _engine_kwargs(plain)["speculative_config"] is None
