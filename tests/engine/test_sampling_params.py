import pytest

from slimlm.sampling_params import SamplingParams, SamplingType


def test_defaults_mirror_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.include_stop_str_in_output is False and p.ignore_eos is False
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy
    assert not p.has_penalties


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["ab", "abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0


@pytest.mark.parametrize("t", [0.0, 1e-6])
def test_greedy(t):
    p = SamplingParams(temperature=t, top_k=5, top_p=0.5, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    # truncation knobs are irrelevant for greedy and reset (as vLLM does)
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)


def test_seeded_type_and_penalties_flag():
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0, seed=3).sampling_type is SamplingType.GREEDY
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("n", 0),
        ("n", 1.0),
        ("n", True),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 1.5),
        ("prompt_logprobs", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", None),
        ("seed", 1.5),
        ("seed", "42"),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", 7),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
        ("include_stop_str_in_output", None),
    ],
)
def test_rejects_invalid(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


def test_message_names_range():
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
