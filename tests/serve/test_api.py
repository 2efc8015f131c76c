"""The OpenAI routes through the official ``openai`` client: results equal the offline engine's."""

from __future__ import annotations

import math

from slimlm import SamplingParams
from tests.serve.conftest import MODEL

GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_models_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert http.get("/health").status_code == 200


def test_completion_equals_offline_greedy(client, offline):
    prompts = ["def add(a, b):", "The quick brown"]
    out = client.completions.create(model=MODEL, prompt=prompts, **GREEDY)
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.outputs[0].text for r in ref]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)


def test_token_id_prompts_and_n(client, offline):
    ids = offline.get_tokenizer().encode("The lazy dog")
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], n=2, temperature=1.0, seed=5, max_tokens=4)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]


def test_streamed_completion_adds_up_to_the_whole(client):
    whole = client.completions.create(model=MODEL, prompt="def add(", **GREEDY).choices[0]
    chunks = list(client.completions.create(model=MODEL, prompt="def add(", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_whole_and_streamed(client, offline):
    messages = [{"role": "user", "content": "Say hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == ref[0].outputs[0].text
    assert whole.usage.prompt_tokens == len(ref[0].prompt_token_ids)

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_scores_the_prompt_like_lm_eval(client, offline):
    """lm-eval's local-completions loglikelihood request: a batch of token-id prompts, echo, logprobs, max_tokens
    1 (older versions: 0); it reads the prompt tokens' logprobs back from token_logprobs."""
    tok = offline.get_tokenizer()
    batch = [tok.encode("The quick brown fox jumps"), tok.encode("def add(a, b):")]
    refs = offline.generate(batch, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    for max_tokens in (0, 1):
        out = client.completions.create(
            model=MODEL, prompt=batch, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0, seed=1234
        )
        choices = sorted(out.choices, key=lambda c: c.index)
        assert len(choices) == 2
        for ids, ref, choice in zip(batch, refs, choices, strict=True):
            lp = choice.logprobs
            assert len(lp.token_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            for pos in range(1, len(ids)):
                expected = ref.prompt_logprobs[pos][ids[pos]].logprob
                assert math.isclose(lp.token_logprobs[pos], expected, abs_tol=1e-4)
                assert max(lp.top_logprobs[pos].values()) >= lp.token_logprobs[pos] - 1e-6
            assert lp.text_offset == sorted(lp.text_offset)
            assert choice.text.startswith(tok.decode(ids))
        assert out.usage.completion_tokens == 2 * max_tokens


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3, **GREEDY
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 12
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        # greedy: the chosen token is the most likely one
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-6)


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt="The quick", temperature=1.0, seed=1, max_tokens=24)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=MODEL, prompt="The quick", temperature=1.0, seed=1, max_tokens=24, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client):
    def sample(seed):
        kwargs = dict(model=MODEL, prompt="def add(a, b):", temperature=1.0, top_p=0.9, max_tokens=16, seed=seed)
        return client.completions.create(**kwargs).choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_tokenize_round_trip(http):
    ids = http.post("/tokenize", json={"prompt": "The lazy dog"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"].endswith("The lazy dog")
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 2
    # what lm-eval's remote tokenizer needs
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"]
    assert http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"]
