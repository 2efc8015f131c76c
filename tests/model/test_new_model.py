import json
from pathlib import Path

import pytest
import torch

from slimlm.data.corpus import stdlib_text
from slimlm.data.tokenizer import train_tokenizer
from slimlm.model.new_model import list_shapes, load_shape, new_model

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([stdlib_text("validation")[:200_000]], vocab_size=512)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_list_and_load_shapes(tmp_path):
    names = list_shapes()
    assert {"smollm2-135m", "tinyllama-1.1b", "qwen2.5-0.5b"} <= set(names)
    shape = load_shape("smollm2-135m")
    assert shape["model_type"] == "llama" and shape["num_hidden_layers"] == 30
    p = tmp_path / "config.json"
    p.write_text(json.dumps(shape))
    assert load_shape(p) == shape
    assert load_shape(tmp_path) == shape


def test_unknown_shape_lists_known(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m") as e:
        new_model("no-such-model", tmp_path / "out")
    assert "no-such-model" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_new_model_loads_and_is_seeded(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    a = new_model("smollm2-135m", tmp_path / "a", num_layers=2, overrides=SMALL, tokenizer=tok)
    assert a == tmp_path / "a"
    names = {p.name for p in a.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names

    cfg = json.loads((a / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64 and cfg["vocab_size"] == 1024
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 2)
    gen = GenerationConfig.from_pretrained(a)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 2)

    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2
    t = AutoTokenizer.from_pretrained(a)
    ids = t("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits.float()).all()

    b = new_model("smollm2-135m", tmp_path / "b", num_layers=2, overrides=SMALL, tokenizer=tok)
    c = new_model("smollm2-135m", tmp_path / "c", num_layers=2, overrides=SMALL, tokenizer=tok, seed=1)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == tb.keys() and ta
    assert all(ta[k].dtype == torch.bfloat16 and torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    # the global RNG is not disturbed
    torch.manual_seed(7)
    x = torch.rand(3)
    torch.manual_seed(7)
    new_model("smollm2-135m", tmp_path / "d", num_layers=1, overrides=SMALL, tokenizer=tok)
    assert torch.equal(torch.rand(3), x)


def test_refuses_overwrite_and_tokenizer_too_big(tmp_path, tok):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        new_model("smollm2-135m", out, num_layers=1, overrides=SMALL, tokenizer=tok)
    assert (out / "keep.txt").read_text() == "x"
    new_model("smollm2-135m", out, num_layers=1, overrides=SMALL, tokenizer=tok, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(ValueError, match="vocab_size"):
        new_model(
            "smollm2-135m",
            tmp_path / "n",
            num_layers=1,
            overrides={**SMALL, "vocab_size": 300},
            tokenizer=tok,
        )


def test_interrupted_write_leaves_nothing(tmp_path, tok, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash after the weights were written")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        new_model("smollm2-135m", tmp_path / "out", num_layers=1, overrides=SMALL, tokenizer=tok)
    assert list(tmp_path.iterdir()) == []

    # an existing directory being replaced survives an interrupted overwrite
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        new_model("smollm2-135m", keep, num_layers=1, overrides=SMALL, tokenizer=tok, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert (keep / "old.txt").read_text() == "old"
