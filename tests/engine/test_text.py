"""Text-level behaviour with a real (small, project-trained) tokenizer: stop strings, UTF-8, chat, streaming."""

from __future__ import annotations

import pytest

from slimlm import LLM, SamplingParams
from slimlm.data.tokenizer import train_tokenizer
from slimlm.model.new_model import new_model
from tests.conftest import SMALL_SHAPE

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Café:\n    '''Ünïcödé 日本語 текст 🙂🚀'''\n"
    "    naïve = 'über'\n# 東京は晴れ。 Ça va? ½ ∑ ∞ → ✓\n"
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    tok = train_tokenizer([TEXT * 20], vocab_size=320)
    path = tmp_path_factory.mktemp("text") / "model"
    overrides = {**SMALL_SHAPE, "vocab_size": len(tok)}
    new_model("smollm2-135m", path, num_layers=2, seed=3, dtype="float32", overrides=overrides, tokenizer=tok)
    return LLM(str(path), dtype="float32", max_model_len=512, num_kv_blocks=64)


def seeded(**kw) -> SamplingParams:
    # Seeded sampling, reproducible by design: a random tiny model's greedy output is one repeated token.
    return SamplingParams(**{"temperature": 1.0, "seed": 0, "max_tokens": 48, "ignore_eos": True, **kw})


def test_output_text_is_the_decoded_tokens_including_multibyte(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(["日本語 🙂", "Café naïve", "def add("], seeded(), use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert len(c.token_ids) == 48


def test_streamed_deltas_add_up_to_the_final_text(llm):
    seen, texts = "", []
    for out in llm.stream("class Café:", seeded(max_tokens=40)):
        text = out.outputs[0].text
        assert text.startswith(seen)  # never retracts what was already shown
        seen = text
        texts.append(text)
    assert out.finished
    assert texts[-1] == llm.generate(["class Café:"], seeded(max_tokens=40), use_tqdm=False)[0].outputs[0].text


def test_stop_string_spanning_tokens_cuts_the_text(llm):
    tok = llm.get_tokenizer()
    full = llm.generate(["def add("], seeded(), use_tqdm=False)[0].outputs[0]
    # A stop string made of the end of one generated token and the start of the next.
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    cut = full.text.index(stop)
    out = llm.generate(["def add("], seeded(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(["def add("], seeded(stop=[stop], include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == full.text[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm):
    full = llm.generate(["def add("], seeded(), use_tqdm=False)[0].outputs[0]
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate(["def add("], seeded(stop_token_ids=[target]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Say hi"}]
    out = llm.chat(messages, seeded(max_tokens=8), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(out.prompt_token_ids) == expected
    assert len(out.outputs[0].token_ids) == 8


def test_invalid_sampling_values_are_named():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
