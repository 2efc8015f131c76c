"""The pieces of speculative decoding on their own: prompt lookup, the adaptive cost model, the Medusa hook (with
stand-in heads), and stop strings / stop tokens / max_tokens that end generation inside an accepted run."""

from __future__ import annotations

import random

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.bench.throughput import grounded_prompts
from slimlm.data.tokenizer import train_tokenizer
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import Engine
from slimlm.engine.sequence import Sequence
from slimlm.engine.speculative.adaptive import AdaptiveController, expected_tokens
from slimlm.engine.speculative.ngram import NgramProposer
from slimlm.model.new_model import new_model
from tests.conftest import SMALL_SHAPE

# ---- prompt lookup --------------------------------------------------------------------------------------


def make_seq(prompt: list[int], output: list[int] | None = None) -> Sequence:
    return Sequence(0, "r", 0, prompt, SamplingParams(), None, 100, 0.0, list(output or []))


@pytest.mark.parametrize(
    "tokens,k,expected",
    [
        ([1, 2, 3, 4, 1, 2, 3], 3, [4, 1, 2]),  # the 3-gram [1, 2, 3] occurred at the start
        ([1, 2, 9, 7, 2, 5, 1, 2], 3, [9, 7, 2]),  # the longest suffix wins over a more recent shorter one
        ([5, 9, 5, 8, 5], 3, [8, 5, 8]),  # the most recent match; its period extends a short continuation
        ([4, 4, 4, 4], 4, [4, 4, 4, 4]),
        ([1, 2, 3, 4], 2, []),  # nothing repeats
    ],
)
def test_prompt_lookup_proposes_what_followed_the_latest_longest_match(tokens, k, expected):
    assert NgramProposer(1, 3).propose([make_seq(tokens)], [k]).token_ids == [expected]


def _brute_force(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    length = len(tokens)
    for n in range(min(hi, length), lo - 1, -1):
        suffix = tokens[length - n :]
        for end in range(length - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                found = tokens[end : end + k]
                while len(found) < k:
                    found.append(found[len(found) - (length - end)])
                return found
    return []


def test_prompt_lookup_index_follows_appended_tokens():
    rng = random.Random(0)
    proposer = NgramProposer(2, 4)
    for _ in range(20):
        seq = make_seq([rng.randrange(6) for _ in range(rng.randint(1, 12))])
        for _ in range(25):
            k = rng.randint(1, 5)
            got = proposer.propose([seq], [k]).token_ids[0]
            assert got == _brute_force(seq.prompt_token_ids + seq.output_token_ids, k, 2, 4)
            seq.output_token_ids.extend(rng.randrange(6) for _ in range(rng.randint(1, 3)))


# ---- adaptive K ------------------------------------------------------------------------------------------


def test_expected_tokens_is_the_geometric_sum():
    for a in (0.0, 0.3, 0.9):
        for k in (1, 4):
            assert expected_tokens(a, k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))
    assert expected_tokens(1.0, 4) == 5


def _controller(acceptance: float, step_cost, batch: int = 1, **kw) -> AdaptiveController:
    c = AdaptiveController(4, probe_interval=1000, **kw)
    c.record_acceptance(planned=100, proposed=100, accepted=round(100 * acceptance), trials=100)
    for k in range(5):
        c.record_cost(batch, k, step_cost(k))
    return c


def test_adaptive_k_follows_acceptance_and_step_costs():
    # Memory-bound batch 1: verifying k tokens costs little more than one.
    cheap = _controller(0.8, lambda k: 1.0 + 0.05 * k)
    assert cheap.choose(1) == 4
    assert cheap.predict(1, 4) == pytest.approx(expected_tokens(0.8, 4) / 1.2)
    # Compute-bound batch 16: a step costs ~ (k + 1) plain steps: never worth it.
    bound = _controller(0.8, lambda k: 1.0 + 0.95 * k, batch=16)
    assert bound.choose(16) == 0
    # Expensive proposals and moderate acceptance: a short run is best.
    mid = _controller(0.5, lambda k: 1.0 + 0.3 * k)
    assert mid.choose(1) == 1
    # Zero acceptance always predicts a slowdown, even if a (noisy) verify step measured cheaper than plain.
    zero = _controller(0.0, lambda k: 1.0 - 0.01 * k)
    assert zero.choose(1) == 0 and zero.predicted_speedup <= 1.0
    # Not adaptive: always K; disable_by_batch_size wins over everything.
    assert _controller(0.0, lambda k: 1.0, adaptive=False).choose(1) == 4
    assert _controller(0.9, lambda k: 1.0, disable_by_batch_size=8).choose(8) == 0


def test_adaptive_measures_before_deciding_and_probes_while_off():
    c = AdaptiveController(3, probe_interval=4)
    step_cost = {0: 1.0, 1: 1.1, 3: 1.5}
    ks, prev = [], None
    for _ in range(26):
        k = c.choose(2)
        ks.append(k)
        # A speculative step right after plain ones (a draft catching up) costs 9 s: it must not be timed.
        c.record_cost(2, k, 9.0 if k and prev == 0 else step_cost[k])
        if k:
            c.record_acceptance(k, k, 0, 1)
        prev = k
    # Plain step first, then K (twice: the first is a catch-up), then off (acceptance 0) with probe pairs at
    # the next interval boundary, then after a wait that doubles with each pair that still finds no gain.
    assert ks == [0, 3, 3] + [0] * 4 + [1, 1] + [0] * 6 + [1, 1] + [0] * 9
    # One slope from the timed speculative steps: (1.5 - 1) / 3 once, (1.1 - 1) / 1 twice; no 9 s step in it.
    assert c.cost(2, 1) == pytest.approx(1.1) and c.cost(2, 3) == pytest.approx(1.3)
    assert c.choose(5) == 0  # another batch bucket starts over


def _set_acceptance(c: AdaptiveController, acceptance: float) -> None:
    for _ in range(200):  # the running average forgets the earlier rate
        c.record_acceptance(planned=100, proposed=100, accepted=round(100 * acceptance), trials=100)


def test_switching_back_on_needs_a_margin_over_break_even():
    # k = 1 predicts 1.5 / 1.4 = 1.07: enough to stay on, not enough to switch back on.
    c = _controller(0.5, lambda k: 1.0 + 0.4 * k)
    assert c.choose(1) == 1 and c.predicted_speedup == pytest.approx(1.5 / 1.4)
    _set_acceptance(c, 0.0)
    assert c.choose(1) == 0
    _set_acceptance(c, 0.5)
    assert [c.choose(1) for _ in range(20)] == [0] * 20
    assert c.predicted_speedup == pytest.approx(1.5 / 1.4)
    _set_acceptance(c, 0.8)  # k = 2 predicts 2.44 / 1.8 = 1.36
    assert c.choose(1) == 2
    # Without a margin, 1.07 switches back on.
    c = _controller(0.5, lambda k: 1.0 + 0.4 * k, switch_margin=0.0)
    _set_acceptance(c, 0.0)
    assert c.choose(1) == 0
    _set_acceptance(c, 0.5)
    assert c.choose(1) == 1


def test_a_larger_batch_starts_off_where_a_smaller_one_measured_no_gain():
    # Batch 1 measured: k proposals cost 0.6 plain steps each, acceptance 0.3 -> no k pays.
    c = _controller(0.3, lambda k: 1.0 + 0.6 * k)
    assert c.choose(1) in (0, 1) and c.predicted_speedup <= 1.0
    # Batch 16 has no measurements: it stays off, without probes, while batch 1 says no gain.
    ks = []
    for _ in range(8):
        k = c.choose(16)
        ks.append(k)
        c.record_cost(16, k, 2.0 if k == 0 else 2.5)
    assert ks == [0] * 8
    # Acceptance rises (measured at batch 1): now batch 1 would gain, and batch 16 explores.
    c.record_acceptance(planned=100, proposed=100, accepted=100, trials=100)
    for _ in range(40):
        c.record_acceptance(planned=100, proposed=100, accepted=100, trials=100)
    assert c.choose(16) == 4
    # Where batch 1 gains, batch 16 explores max_k as before.
    g = _controller(0.8, lambda k: 1.0 + 0.05 * k)
    assert g.choose(16) == 0
    g.record_cost(16, 0, 2.0)
    assert g.choose(16) == 4


# ---- Medusa hook -----------------------------------------------------------------------------------------


class OracleHeads:
    """Stand-in for MedusaHeads (``heads(hidden [T, H]) -> logits [K, T, V]``). It finds each hidden state's
    position by comparing its LM-head distribution with the target's rows for the known greedy output, then
    proposes the true tokens 2.. K+1 positions ahead. So acceptance is 100% exactly when the engine passes the
    hidden state of the row that produced each sequence's newest token, as the Medusa contract says."""

    num_heads = 3

    def __init__(self, weight: torch.Tensor, row_logprobs: torch.Tensor, tokens: list[int]):
        self.weight = weight.float()
        self.rows = row_logprobs
        self.tokens = tokens
        self.calls = 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        lp = torch.log_softmax(hidden.float() @ self.weight.T, -1)
        positions = torch.cdist(lp, self.rows).argmin(-1).tolist()
        out = torch.full((self.num_heads, hidden.shape[0], self.weight.shape[0]), -1e4)
        for t, p in enumerate(positions):
            for k in range(self.num_heads):
                if p + 2 + k < len(self.tokens):
                    out[k, t, self.tokens[p + 2 + k]] = 0.0
        return out


class RandomHeads(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, vocab) for _ in range(num_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self.heads])


def _engine(path, spec=None) -> Engine:
    return Engine(
        EngineConfig(
            model=str(path),
            dtype="float32",
            skip_tokenizer_init=True,
            max_model_len=256,
            num_kv_blocks=64,
            speculative_config=spec,
        )
    )


def _run(engine: Engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def test_medusa_hook_gets_the_newest_tokens_hidden_state(hf_checkpoints):
    path = hf_checkpoints["qwen3-qknorm"]
    rng = random.Random(1)
    prompt = [rng.randrange(300) for _ in range(20)]
    params = SamplingParams(temperature=0, max_tokens=31, ignore_eos=True, repetition_penalty=1.2)
    ref = _run(_engine(path), [prompt], params)[0]
    plain = _engine(path)
    full = prompt + ref
    with torch.no_grad():
        rows = torch.log_softmax(plain.loaded.model.forward_dense(torch.tensor([full]))[0].float(), -1)
    heads = OracleHeads(plain.loaded.model.output_weight, rows, full)
    engine = _engine(path, {"method": "medusa", "model": heads, "num_speculative_tokens": 3, "adaptive": False})
    assert _run(engine, [prompt], params)[0] == ref
    s = engine.stats.speculative
    assert heads.calls == s.verify_steps > 0
    assert s.accepted_tokens == s.proposed_tokens > 0


def test_medusa_with_untrained_heads_keeps_outputs_identical(hf_checkpoints):
    path = hf_checkpoints["qwen3-qknorm"]
    rng = random.Random(2)
    prompts = [[rng.randrange(300) for _ in range(5 + 7 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    heads = RandomHeads(64, 300, 2).double()  # another dtype than the model: the proposer converts
    engine = _engine(path, {"method": "medusa", "model": heads, "num_speculative_tokens": 2, "adaptive": False})
    assert _run(engine, prompts, params) == _run(_engine(path), prompts, params)
    assert engine.stats.speculative.proposed_tokens > 0
    with pytest.raises(ValueError, match="only 2 heads"):
        _engine(path, {"method": "medusa", "model": heads, "num_speculative_tokens": 3})


def _trained_like_heads(model, num_heads: int, seed: int):
    """MedusaHeads on ``model`` with random non-zero blocks (zero-init heads would all say the lm_head's token)."""
    from slimlm.train.medusa import MedusaHeads

    heads = MedusaHeads(model, num_heads)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            block.linear.weight.copy_(torch.randn(block.linear.weight.shape, generator=gen) * 0.5)
            block.linear.bias.copy_(torch.randn(block.linear.bias.shape, generator=gen) * 0.5)
    return heads.eval()


def test_medusa_stacked_heads_propose_what_the_heads_say(hf_checkpoints):
    """The engine's path (one stacked block matmul, the target's own projection of only the rows asked for)
    proposes each head's argmax, as calling the heads module does."""
    from slimlm.engine.speculative.medusa import MedusaProposer

    plain = _engine(hf_checkpoints["qwen3-qknorm"])
    model = plain.loaded.model
    heads = _trained_like_heads(model, 3, seed=0)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    seqs = [make_seq([1, 2, 3]) for _ in range(5)]
    proposer = MedusaProposer(heads, project=model.compute_logits)
    proposer.observe(seqs, hidden)
    wants = [3, 1, 0, 2, 3]
    got = proposer.propose(seqs, wants).token_ids
    with torch.no_grad():
        ref = heads(hidden).argmax(-1).T.tolist()  # [T, K]
    assert got == [row[:k] for row, k in zip(ref, wants, strict=True)]
    assert sum(map(len, got)) == 9


def test_medusa_heads_from_a_directory_keep_outputs_identical(hf_checkpoints, tmp_path):
    """The CLI's way in: heads saved to a directory, loaded by the engine against its own target."""
    path = hf_checkpoints["qwen3-qknorm"]
    plain = _engine(path)
    _trained_like_heads(plain.loaded.model, 3, seed=2).save_pretrained(tmp_path / "heads")
    rng = random.Random(3)
    prompts = [[rng.randrange(300) for _ in range(4 + 9 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = _engine(
        path, {"method": "medusa", "model": str(tmp_path / "heads"), "num_speculative_tokens": 3, "adaptive": False}
    )
    assert engine.speculator.proposer._stacked is not None
    assert _run(engine, prompts, params) == _run(plain, prompts, params)
    assert engine.stats.speculative.proposed_tokens > 0


# ---- stops inside accepted runs --------------------------------------------------------------------------

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n# a comment, then more code\n"
K = 4


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    tok = train_tokenizer([TEXT * 20], vocab_size=300)
    path = tmp_path_factory.mktemp("spec-text") / "model"
    overrides = {**SMALL_SHAPE, "vocab_size": len(tok)}
    new_model("smollm2-135m", path, num_layers=2, seed=5, dtype="float32", overrides=overrides, tokenizer=tok)
    return str(path)


def _llm(path, spec=None) -> LLM:
    return LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=64, speculative_config=spec)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_stops_inside_accepted_runs_end_where_plain_decoding_ends(text_model, method):
    spec = {"method": method, "num_speculative_tokens": K, "adaptive": False}
    if method == "draft":
        spec["model"] = text_model  # the target as its own draft: every run is fully accepted
    plain, fast = _llm(text_model), _llm(text_model, spec)
    prompt = "class Point:\n"
    base = dict(temperature=0, max_tokens=40, frequency_penalty=0.5)  # the penalty keeps the text varied
    full = plain.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    tok = plain.get_tokenizer()
    pieces = [tok.decode([t]) for t in full.token_ids]
    stops = []
    for i in range(2, 14):  # stop strings spanning two tokens, ending at token i + 1
        if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1 and pieces[i][-1:] + pieces[i + 1][:1]:
            stops.append(pieces[i][-1:] + pieces[i + 1][:1])
    cases = [SamplingParams(**base, stop=[s]) for s in stops]
    cases += [SamplingParams(**base, stop=[s], include_stop_str_in_output=True) for s in stops[:3]]
    cases += [SamplingParams(**{**base, "max_tokens": m}) for m in (2, 3, 7, 8, 13)]
    cases += [SamplingParams(**base, stop_token_ids=[full.token_ids[i]]) for i in (3, 6, 9)]
    cases += [SamplingParams(**base, stop_token_ids=[full.token_ids[6]], min_tokens=8)]
    inside = 0
    for params in cases:
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = fast.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text,
            want.token_ids,
            want.finish_reason,
            want.stop_reason,
        )
        inside += (len(want.token_ids) - 1) % (K + 1) != 0  # not at the end of a prefill + full runs
    assert inside >= 5
    s = fast.engine.stats.speculative
    assert s.proposed_tokens > 0
    if method == "draft":  # (prompt lookup finds little in this penalised text: there it is identity only)
        assert s.accepted_tokens == s.proposed_tokens


def test_grounded_workload_repeats_the_start_of_a_held_out_function(text_model):
    tok = _llm(text_model).get_tokenizer()
    prompts = grounded_prompts(tok, 3, 256, seed=0)
    assert len({tuple(p) for p in prompts}) == 3
    for ids in prompts:
        assert 128 <= len(ids) <= 256
        body, cue, head = tok.decode(ids).partition("# The same function again, unchanged:\n")
        # Two lines, the second without its line break (which BPE would merge with the next indentation).
        assert cue and head.count("\n") == 1 and not head.endswith("\n") and body.startswith(head + "\n")


def test_bench_throughput_reports_speculation_on_the_grounded_workload(text_model, capsys):
    import json

    from slimlm.cli import main

    argv = ["bench", "throughput", text_model, "--input-len", "256", "--output-len", "8", "--concurrency", "2"]
    argv += ["--repeats", "2", "--max-model-len", "512", "--json", "--workload", "grounded"]
    assert main(argv + ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    s = r["speculative"]
    assert r["workload"] == "grounded" and s["method"] == "ngram" and s["num_speculative_tokens"] == 3
    for phase in ("batch1", "concurrent"):
        assert s[phase]["measured_speedup"] > 0 and 0 <= s[phase]["acceptance_rate"] <= 1
        assert "predicted_speedup" in s[phase] and "mean_accepted_length" in s[phase]
    assert s["metrics"]["proposed_tokens"] >= s["metrics"]["accepted_tokens"]
    # A/B pairs at concurrency, after an untimed run that put the prompts in the prefix cache for both sides.
    assert len(r["concurrent_runs"]) == len(s["concurrent"]["output_plain_runs"]) == 2
    # One ratio per round, each round on its own prompt: speculation and plain decoding of the same prompt.
    runs = zip(r["decode_batch1_runs"], s["batch1"]["decode_plain_runs"], strict=True)
    assert s["batch1"]["round_speedups"] == pytest.approx([a / b for a, b in runs])
