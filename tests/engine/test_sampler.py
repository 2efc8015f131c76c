import math

import pytest
import torch

from slimlm.engine.sampler import (
    Sampler,
    SamplingState,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
    make_generator,
)
from slimlm.sampling_params import SamplingParams

# chi-square critical values at p = 0.001 for df = 1..4
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def st(params, prompt=(0,), output=(), seed_index=0, eos=()):
    gen = make_generator(params.seed, seed_index, "cpu")
    return SamplingState(params, list(prompt), list(output), gen, tuple(eos))


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 97)
    states = [st(SamplingParams(temperature=0.0)) for _ in range(6)]
    out = Sampler()(logits, states)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None
    # bf16 input, and ties go to the lowest index like torch.argmax
    tie = torch.zeros(1, 10, dtype=torch.bfloat16)
    tie[0, 3] = tie[0, 7] = 1.0
    assert Sampler()(tie, [st(SamplingParams(temperature=0))]).token_ids == [3]


def test_greedy_rows_in_mixed_batch_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    states = [
        st(SamplingParams(temperature=0)),
        st(SamplingParams(temperature=1.0, top_p=0.9)),
        st(SamplingParams(temperature=0, logprobs=2)),
        st(SamplingParams(temperature=0.7, seed=3)),
    ]
    before = logits.clone()
    out = Sampler()(logits, states)
    am = logits.argmax(-1).tolist()
    assert out.token_ids[0] == am[0] and out.token_ids[2] == am[2]
    assert torch.equal(logits, before), "sampler must not modify the caller's logits"


def test_top_k_1_equals_greedy():
    torch.manual_seed(2)
    for _ in range(5):
        logits = torch.randn(8, 200)
        states = [st(SamplingParams(temperature=1.5, top_k=1)) for _ in range(8)]
        assert Sampler()(logits, states).token_ids == logits.argmax(-1).tolist()


def test_seeded_row_independent_of_batch():
    V, steps = 300, 25
    torch.manual_seed(3)
    seq_logits = [torch.randn(V) * 2 for _ in range(steps)]
    sampler = Sampler()
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def run(position, others):
        state = st(target)
        toks = []
        for t in range(steps):
            rows = [torch.randn(V) for _ in others]
            rows.insert(position, seq_logits[t])
            states = [st(p) for p in others]
            states.insert(position, state)
            out = sampler(torch.stack(rows), states)
            toks.append(out.token_ids[position])
            state.output_token_ids.append(out.token_ids[position])
        return toks

    alone = run(0, [])
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=7, seed=99),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, min_p=0.1, logprobs=3),
    ]
    assert run(2, others) == alone
    assert run(4, others) == alone
    assert run(1, others[:2]) == alone
    # a different seed gives a different sequence (the check can fail)
    other_seed = st(SamplingParams(temperature=0.9, top_p=0.95, seed=4321))
    toks = [sampler(seq_logits[t].unsqueeze(0), [other_seed]).token_ids[0] for t in range(steps)]
    assert toks != alone


def test_make_generator_streams():
    assert make_generator(None, 0) is None
    a = torch.rand(5, generator=make_generator(7, 0))
    assert torch.equal(a, torch.rand(5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(a, torch.rand(5, generator=make_generator(7, 0)))
    b = torch.rand(5, generator=make_generator(7, 1))
    c = torch.rand(5, generator=make_generator(8, 0))
    d = torch.rand(5, generator=make_generator(6, 1))
    assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(b, d)


def test_n_samples_of_seeded_request_differ_but_reproduce():
    logits = torch.zeros(4, 1000)
    p = SamplingParams(seed=5)
    toks1 = Sampler()(logits, [st(p, seed_index=i) for i in range(4)]).token_ids
    toks2 = Sampler()(logits, [st(p, seed_index=i) for i in reversed(range(4))]).token_ids
    assert toks1 == toks2[::-1]
    assert len(set(toks1)) > 1


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    s = st(p, prompt=[0], output=[1, 1, 2])
    apply_penalties(logits, [s])
    # repetition (seen = {0,1,2}): 2/2=1, -1*2=-2, 0.5/2=0.25
    # frequency/presence (output counts {1:2, 2:1}): -2-1-0.25, 0.25-0.5-0.25
    expected = torch.tensor([[1.0, -3.25, -0.5, -0.5, 1.0]])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_penalties_only_rows_that_ask_and_steer_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [-1.0, -1.05, -5.0]])
    states = [
        st(SamplingParams(temperature=0), prompt=[0], output=[]),
        st(SamplingParams(temperature=0, repetition_penalty=1.1), prompt=[0], output=[]),
        st(SamplingParams(temperature=0, repetition_penalty=1.1), prompt=[5 % 3], output=[0]),
    ]
    out = Sampler()(logits, states)
    # row 0 no penalty: 0; row 1: 3/1.1 = 2.727 < 2.9 -> 1; row 2: -1*1.1=-1.1 < -1.05 -> 1
    assert out.token_ids == [0, 1, 1]
    # frequency penalty on output tokens only (prompt occurrences do not count)
    lg = torch.tensor([[1.0, 0.9]])
    s = st(SamplingParams(temperature=0, frequency_penalty=0.2), prompt=[1, 1, 1], output=[0])
    assert Sampler()(lg, [s]).token_ids == [1]
    s = st(SamplingParams(temperature=0, frequency_penalty=0.2), prompt=[0, 0, 0], output=[1])
    assert Sampler()(lg, [s]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0]])  # eos=1 is the argmax, stop id 2 next
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    s = st(p, eos=(1,))
    assert Sampler()(logits, [s]).token_ids == [3]
    s.output_token_ids = [3]
    assert Sampler()(logits, [s]).token_ids == [3]
    s.output_token_ids = [3, 3]
    assert Sampler()(logits, [s]).token_ids == [1]
    # ignore_eos: eos is not masked (it does not stop anyway), stop ids still are
    s = st(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2], ignore_eos=True), eos=(1,))
    assert Sampler()(logits, [s]).token_ids == [1]


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


def draw_many(params, n_rows=4000, seeded=False):
    torch.manual_seed(1234)
    logits = PROBS.log().expand(n_rows, 5).contiguous()
    if seeded:
        states = [st(SamplingParams(**{**params, "seed": i})) for i in range(n_rows)]
    else:
        states = [st(SamplingParams(**params)) for _ in range(n_rows)]
    toks = torch.tensor(Sampler()(logits, states).token_ids)
    return torch.bincount(toks, minlength=5)


def chi_square_ok(counts, expected_probs):
    support = expected_probs > 0
    assert torch.equal(counts > 0, support), f"support {counts.tolist()} vs {expected_probs.tolist()}"
    n = counts.sum()
    exp = expected_probs[support] * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    return df == 0 or chi2 < CHI2_CRIT[df]


def renorm(mask, temp=1.0):
    p = PROBS ** (1.0 / temp) * mask
    return p / p.sum()


@pytest.mark.parametrize(
    "params,keep",
    [
        ({}, [1, 1, 1, 1, 1]),
        ({"top_k": 2}, [1, 1, 0, 0, 0]),
        ({"top_k": 4}, [1, 1, 1, 1, 0]),
        ({"top_k": 10}, [1, 1, 1, 1, 1]),
        ({"top_p": 0.6}, [1, 1, 0, 0, 0]),  # 0.4 < 0.6 <= 0.7
        ({"top_p": 0.8}, [1, 1, 1, 0, 0]),  # 0.7 < 0.8 <= 0.85
        ({"top_p": 0.3}, [1, 0, 0, 0, 0]),
        ({"min_p": 0.3}, [1, 1, 1, 0, 0]),  # threshold 0.12
        ({"min_p": 0.5}, [1, 1, 0, 0, 0]),  # threshold 0.2
        ({"top_k": 3, "top_p": 0.6}, [1, 1, 0, 0, 0]),
        ({"top_k": 3, "min_p": 0.2}, [1, 1, 1, 0, 0]),  # min_p threshold 0.08 keeps 0.1, top_k drops it
        ({"top_p": 0.95, "min_p": 0.3}, [1, 1, 1, 0, 0]),
    ],
)
@pytest.mark.parametrize("seeded", [False, True])
def test_truncation_support_and_distribution(params, keep, seeded):
    counts = draw_many(params, seeded=seeded)
    assert chi_square_ok(counts, renorm(torch.tensor(keep, dtype=torch.float32)))


def test_temperature_distribution():
    counts = draw_many({"temperature": 0.5})
    assert chi_square_ok(counts, renorm(torch.ones(5), temp=0.5))
    counts = draw_many({"temperature": 2.0, "top_k": 3})
    assert chi_square_ok(counts, renorm(torch.tensor([1.0, 1, 1, 0, 0]), temp=2.0))


def test_wrong_distribution_is_detected():
    counts = draw_many({"top_k": 3})
    assert not chi_square_ok(counts, torch.tensor([0.5, 0.3, 0.2, 0, 0]))


def test_mixed_truncation_rows_in_one_batch():
    torch.manual_seed(0)
    n = 3000
    logits = PROBS.log().expand(3 * n, 5).contiguous()
    states = (
        [st(SamplingParams(top_k=2)) for _ in range(n)]
        + [st(SamplingParams(top_p=0.8)) for _ in range(n)]
        + [st(SamplingParams()) for _ in range(n)]
    )
    toks = torch.tensor(Sampler()(logits, states).token_ids)
    c = [torch.bincount(toks[i * n : (i + 1) * n], minlength=5) for i in range(3)]
    assert chi_square_ok(c[0], renorm(torch.tensor([1.0, 1, 0, 0, 0])))
    assert chi_square_ok(c[1], renorm(torch.tensor([1.0, 1, 1, 0, 0])))
    assert chi_square_ok(c[2], renorm(torch.ones(5)))


def test_logprobs_from_raw_logits_and_ranks():
    torch.manual_seed(5)
    logits = torch.randn(5, 40)
    states = [
        st(SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3), prompt=[1, 2, 3]),
        st(SamplingParams(temperature=0, logprobs=0)),
        st(SamplingParams(temperature=2.0, top_k=5, logprobs=5)),
        st(SamplingParams(temperature=1.0)),  # no logprobs asked
        st(SamplingParams(temperature=0, presence_penalty=2.0, logprobs=1), output=list(range(0, 40, 2))),
    ]
    out = Sampler()(logits, states)
    raw = torch.log_softmax(logits, -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-6)
        assert out.ranks[i] == int((raw[i] > raw[i, tok]).sum()) + 1
        n = states[i].params.logprobs or 0
        vals, ids = raw[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert out.top_token_ids[i] == ids.tolist()
        assert out.top_logprobs[i] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.ranks[1] == 1
    assert len(out.top_token_ids[3]) == 0 and len(out.top_token_ids[2]) == 5
    # the presence penalty pushed greedy row 4 away from even tokens: rank > 1 unless argmax is odd
    assert out.token_ids[4] % 2 == 1


def test_compute_logprobs_bf16_and_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0]], dtype=torch.bfloat16)
    lp, ranks, top_ids, top_lp = compute_logprobs(logits, [2, 0], 2)
    ref = torch.log_softmax(logits.float(), -1)
    assert isinstance(lp[0], float) and isinstance(ranks[0], int) and isinstance(top_ids[0][0], int)
    assert lp == pytest.approx([ref[0, 2].item(), ref[1, 0].item()], abs=1e-6)
    assert ranks == [3, 2]  # two tokens strictly above 2.0; 5.0 above 0.0 (ties not counted)
    assert top_ids[1][0] == 3 and set(top_ids[0]) == {1, 3}
    assert [r[0] for r in top_lp] == pytest.approx(ref.max(-1).values.tolist(), abs=1e-6)
    lp, ranks, top_ids, top_lp = compute_logprobs(logits, torch.tensor([1, 3]), 0)
    assert top_ids == [[], []] and top_lp == [[], []] and ranks == [1, 1]
    assert math.isclose(lp[1], ref[1, 3].item(), abs_tol=1e-6)


def _reference_top_k_top_p(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """vLLM's sort-based rule in float64: the boolean mask of kept tokens."""
    x = row.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < len(x):
        keep &= x >= x.sort(descending=True).values[k - 1]
    if p < 1.0:
        probs = torch.where(keep, x, float("-inf")).softmax(-1)
        vals, order = probs.sort(descending=True)
        exclusive = vals.cumsum(-1) - vals
        nucleus = torch.zeros_like(keep)
        nucleus[order[exclusive < p]] = True
        keep &= nucleus
    return keep


@pytest.mark.parametrize("first_k", [64, 8])
@pytest.mark.parametrize("with_big_k", [False, True])
def test_top_k_top_p_matches_sort_reference(first_k, with_big_k):
    torch.manual_seed(11)
    B, V = 12, 3000
    # flat rows (nucleus of hundreds of tokens: beyond the first top-k window) and peaked rows
    scales = torch.tensor([0.5, 1.0, 3.0, 8.0] * 3).unsqueeze(1)
    logits = torch.randn(B, V) * scales
    ks = [0, 0, 0, 0, 5, 100, 700 if with_big_k else 0, 0, 2999 if with_big_k else 30, 0, 40, 1]
    ps = [0.9, 0.5, 0.99, 0.3, 1.0, 0.8, 0.95, 1.0, 0.7, 0.999, 0.6, 0.5]
    x = logits.clone()
    apply_top_k_top_p(x, torch.tensor(ks), torch.tensor(ps), first_k=first_k)
    for i in range(B):
        ref = _reference_top_k_top_p(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isfinite(x[i]), ref), f"row {i}: {int(ref.sum())} vs {int(torch.isfinite(x[i]).sum())}"
        assert torch.equal(x[i][ref], logits[i][ref])  # kept logits unchanged
    assert int(torch.isfinite(x[0]).sum()) > 700  # the nucleus is far wider than the first window
    # only top-p rows, all of them: the no-subset path
    x = logits.clone()
    apply_top_k_top_p(x, None, torch.full((B,), 0.9), first_k=first_k)
    for i in range(B):
        assert torch.equal(torch.isfinite(x[i]), _reference_top_k_top_p(logits[i], 0, 0.9)), f"row {i}"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1e-300),
        SamplingParams(temperature=1e300, min_tokens=4, seed=0),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300, seed=0),
    ],
    ids=["penalty-underflow-greedy", "huge-temperature-min-tokens", "penalty-underflow-random"],
)
def test_degenerate_values_still_give_an_in_vocabulary_token(params):
    vocab = 16
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    states = [
        SamplingState(params, list(range(vocab)), [], make_generator(params.seed, i), tuple(range(vocab)))
        for i in range(2)
    ]
    out = Sampler()(logits, states)
    assert all(0 <= t < vocab for t in out.token_ids)
