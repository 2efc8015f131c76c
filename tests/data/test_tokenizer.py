import random

import pytest

from slimlm.data.corpus import stdlib_text
from slimlm.data.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    default_tokenizer,
    default_tokenizer_path,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def text():
    return stdlib_text("validation")[:300_000]


@pytest.fixture(scope="module")
def tok(text):
    return train_tokenizer([text], vocab_size=512)


def _samples():
    rng = random.Random(1234)
    out = [
        "def f(x):\n    return x + 1\n",
        "é",
        "café naïve",
        "日本語のテキスト",
        "emoji 🎉 👨‍👩‍👧 🇫🇷",
        "   many    spaces   ",
        "\t\ttabs\tand\nnewlines\r\n\n\n",
        "",
        " leading space",
        "a , b . c ! d ? e 's do n't",
        "<|user|> literal special <|eos|>",
        "\x00\x01 control \x7f",
    ]
    for _ in range(20):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        out.append(raw.decode("utf-8", errors="replace"))
    for _ in range(10):
        out.append("".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF)])) for _ in range(40)))
    return out


def test_round_trip_exact(tok):
    for s in _samples():
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s, repr(s)


def test_specials_and_bos(tok):
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(ASSISTANT_TOKEN) == 5
    assert len(tok) == 512
    ids = tok("x = 1")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode("x = 1", add_special_tokens=False)


def test_deterministic(text, tok):
    again = train_tokenizer([text], vocab_size=512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_save_and_reload_identical(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    re = AutoTokenizer.from_pretrained(tmp_path)
    for s in _samples():
        assert re.encode(s) == tok.encode(s)
        assert re.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
    assert (re.bos_token_id, re.eos_token_id, re.pad_token_id) == (0, 1, 2)
    msgs = [{"role": "user", "content": "hi"}]
    assert re.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith(BOS_TOKEN + "<|system|>Be terse." + EOS_TOKEN)
    assert text.endswith("<|user|>2+2?" + EOS_TOKEN + ASSISTANT_TOKEN)
    out = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.convert_tokens_to_ids(ASSISTANT_TOKEN)
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith(ASSISTANT_TOKEN)


def test_too_small_vocab_rejected():
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], vocab_size=100)


def test_default_tokenizer_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path))
    path = default_tokenizer_path(300)
    assert path.parent.parent == tmp_path
    t1 = default_tokenizer(300)
    assert (path / "tokenizer.json").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left
    mtime = (path / "tokenizer.json").stat().st_mtime_ns
    t2 = default_tokenizer(300)
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime  # loaded, not retrained
    assert len(t1) == len(t2) == 300
    s = "import os\nprint('héllo')\n"
    assert t1.encode(s) == t2.encode(s)
