import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimlm.engine.detokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamingDetokenizer,
    find_stop_string,
    stop_prefix_holdback,
)
from slimlm.sampling_params import SamplingParams

CORPUS = [
    "The café served crème brûlée and a naïve résumé was left on the table.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "Emoji time: 🎉🚀🙂 and a family 👨‍👩‍👧 plus flags 🇫🇷🇯🇵.",
    "Ελληνικά και русский текст, 中文字符, and العربية for good measure.",
    "def f(x):\n    return x * 2  # code with\ttabs and   spaces\n",
    "Plain ASCII sentences about tokenizers, decoding and streaming output text.",
    "Stop strings like </end> or ### or STOP may span several tokens.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,  # small: most non-ASCII characters stay split into byte tokens
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def incremental(tokenizer, ids, skip=True, chunks=1, seed=0):
    d = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens=skip)
    rng = random.Random(seed)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, chunks)
        deltas.append(d.add_tokens(ids[i : i + n]))
        i += n
    deltas.append(d.flush())
    assert "".join(deltas) == d.output_text
    return deltas


def test_text_with_multibyte_chars_streams_without_replacement_chars(tokenizer):
    for text in CORPUS + ["🙂🙂é日", "x🇯🇵y", "naïve 日本"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        deltas = incremental(tokenizer, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas), deltas
    # the small vocabulary really splits characters across tokens
    assert len(tokenizer.encode("🙂")) > 1 and len(tokenizer.encode("日")) > 1


def test_one_token_at_a_time_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("a🙂")
    d = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    out = [d.add_tokens(t) for t in ids]
    assert out[0] == "a" and all(o == "" for o in out[1:-1]) and out[-1] == "🙂"


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("chunks", [1, 3])
def test_random_id_sequences_match_full_decode(tokenizer, skip, chunks):
    rng = random.Random(1234 + chunks + skip)
    V = tokenizer.backend_tokenizer.get_vocab_size()
    for trial in range(300):
        ids = [rng.randrange(V) for _ in range(rng.randint(0, 40))]
        deltas = incremental(tokenizer, ids, skip=skip, chunks=chunks, seed=trial)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_random_slices_of_real_text_match_full_decode(tokenizer):
    # token windows cut at arbitrary places: start/end inside multi-byte characters
    ids = tokenizer.encode(" ".join(CORPUS))
    rng = random.Random(7)
    for trial in range(200):
        a = rng.randrange(len(ids))
        b = min(len(ids), a + rng.randint(1, 60))
        window = ids[a:b]
        assert "".join(incremental(tokenizer, window, chunks=2, seed=trial)) == tokenizer.decode(window)


def test_special_tokens(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.encode("hi 日本") + [eos] + tokenizer.encode(" ok")
    assert "".join(incremental(tokenizer, ids, skip=True)) == "hi 日本 ok"
    assert "".join(incremental(tokenizer, ids, skip=False)) == "hi 日本<|endoftext|> ok"


@pytest.fixture(scope="module")
def metaspace():
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4, "é": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def stream(tokenizer, prompt, ids):
    d = IncrementalDetokenizer(tokenizer, prompt)
    return [d.add_tokens(i) for i in ids] + [d.flush()]


def test_metaspace_output_continues_the_prompt_with_its_leading_space(metaspace):
    # SentencePiece-style decoders drop the space of a word-initial token at the start of a
    # decode; the output continues the prompt, so (as in vLLM) " world" keeps its space.
    assert metaspace.decode([2, 3, 1]) == "world! Hello"
    assert stream(metaspace, [1], [2, 3, 1]) == [" world", "!", " Hello", ""]
    assert stream(metaspace, [1, 3], [5]) == ["é", ""]  # no space where the prompt's text runs on


def test_without_a_prompt_the_first_token_decodes_like_plain_decode(metaspace):
    ids = [1, 2, 3, 1]
    assert metaspace.decode(ids) == "Hello world! Hello"
    assert stream(metaspace, [], ids)[:4] == ["Hello", " world", "!", " Hello"]


def test_a_prompt_ending_inside_a_character_gives_its_completion_to_the_output(tokenizer):
    ids = tokenizer.encode("鬱蒼", add_special_tokens=False)  # characters the training corpus never had
    assert len(ids) > 2  # so they stay split into byte tokens
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    out = "".join(stream(tokenizer, ids[:cut], ids[cut:]))
    assert out == tokenizer.decode(ids[cut:])  # no prompt context: the completed bytes decode alone


# ---------------------------------------------------------------- stop strings


def test_find_stop_string_basic_and_spanning():
    assert find_stop_string("hello wor", 3, ["world"]) is None
    # completed by the last delta, started before it
    assert find_stop_string("hello world!", 3, ["world"]) == ("world", 6)
    assert find_stop_string("hello world!", 3, ["world"], include_stop_str_in_output=True) == ("world", 11)
    # a match that ended before the new chars was already handled: not reported again
    assert find_stop_string("world and more", 3, ["world"]) is None
    # the stop string completed first wins, ties go to the one starting first
    assert find_stop_string("xabcd", 4, ["abcd", "c"]) == ("c", 3)
    assert find_stop_string("xabc", 3, ["bc", "abc"]) == ("abc", 1)


def test_holdback():
    assert stop_prefix_holdback("Hello </e", ["</end>"]) == 3
    assert stop_prefix_holdback("Hello", ["</end>"]) == 0
    assert stop_prefix_holdback("ab#", ["###", "#x"]) == 1
    assert stop_prefix_holdback("a##", ["###"]) == 2
    assert stop_prefix_holdback("###", ["####"]) == 3


def test_matcher_doctest_example():
    m = StopStringMatcher(["</end>"])
    assert m.append("Hello </e") is None
    assert m.stream() == "Hello "
    assert m.append("nd> trailing") == "</end>"
    assert m.text == "Hello " and m.stream(finished=True) == ""


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_is_never_cut(fixed, include):
    rng = random.Random(5)
    stops = ["###", "</end>", "STOP"]
    alphabet = ["#", "<", "/", "e", "n", "d", ">", "S", "T", "O", "P", "a", " ", "日"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        m = StopStringMatcher(stops, include, fixed_holdback=fixed)
        streamed, i, hit = "", 0, None
        while i < len(text) and hit is None:
            n = rng.randint(1, 4)
            hit = m.append(text[i : i + n])
            i += n
            streamed += m.stream(finished=hit is not None)
            assert m.text.startswith(streamed)
        streamed += m.stream(finished=True)
        assert streamed == m.text
        # reference: character by character, the first completed stop string
        ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if ends:
            end, start, s = min(ends)
            assert hit == s and m.text == (text[:end] if include else text[:start])
        else:
            assert hit is None and m.text == text


def test_streaming_detokenizer_stop_string_across_tokens(tokenizer):
    text = "Stop strings like </end> or ### here"
    ids = tokenizer.encode(text)
    params = SamplingParams(stop=["</end>", "###"])
    sd = StreamingDetokenizer(tokenizer, [1], params)
    streamed, stop = "", None
    token_texts = [tokenizer.decode([t]) for t in ids]
    assert "</end>" not in token_texts  # the stop string really spans tokens
    for t in ids:
        step = sd.step(t)
        streamed += step.delta
        assert "<" not in streamed  # nothing of the stop string is ever streamed
        if step.stop_str is not None:
            stop = step.stop_str
            break
    assert stop == "</end>"
    assert streamed == sd.text == "Stop strings like "

    params = SamplingParams(stop=["</end>"], include_stop_str_in_output=True)
    sd = StreamingDetokenizer(tokenizer, [1], params)
    streamed = ""
    for t in ids:
        step = sd.step(t)
        streamed += step.delta
        if step.stop_str:
            break
    assert streamed == "Stop strings like </end>"


def test_streaming_detokenizer_eos_and_flush(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    emoji = tokenizer.encode("🙂")
    ids = tokenizer.encode("ab") + emoji[:-1]  # ends inside a character
    sd = StreamingDetokenizer(tokenizer, [1], SamplingParams(stop=["bz"]))
    streamed = "".join(sd.step(t).delta for t in ids)
    assert streamed == "a"  # "b" could start "bz"; the partial emoji is not decodable yet
    out = sd.step(eos, finished=True, stop_token_terminated=True)
    assert streamed + out.delta == tokenizer.decode(ids) and out.stop_str is None
    assert "\ufffd" in out.delta  # an incomplete character at the end decodes as U+FFFD, as decode() does
