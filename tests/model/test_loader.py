"""Loading: sharded checkpoints, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.model.config import ConfigError
from slimlm.model.loader import LoadError, load_model
from tests.conftest import make_hf_model


@pytest.fixture
def checkpoint(tmp_path, hf_checkpoints):
    path = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["llama-mqa-llama3rope"], path)
    return path


def test_sharded_checkpoint_loads_identically(tmp_path, hf_checkpoints):
    sharded = tmp_path / "sharded"
    make_hf_model("llama-mqa-llama3rope").save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = load_model(sharded, dtype="float32", load_tokenizer_files=False).model
    b = load_model(hf_checkpoints["llama-mqa-llama3rope"], dtype="float32", load_tokenizer_files=False).model
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_missing_directory(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_hub_id_offline_names_the_id_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match=r"'someone/no-such-model'.*local directory"):
        load_model("someone/no-such-model")


def test_missing_and_corrupt_config(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="config.json is not valid JSON"):
        load_model(checkpoint, load_tokenizer_files=False)
    (checkpoint / "config.json").unlink()
    with pytest.raises(LoadError, match="config.json is missing"):
        load_model(checkpoint, load_tokenizer_files=False)


def test_unsupported_architecture(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'GPT2LMHeadModel' is not supported"):
        load_model(checkpoint, load_tokenizer_files=False)


def test_corrupt_safetensors(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoadError, match="model.safetensors is not a valid safetensors file"):
        load_model(checkpoint, load_tokenizer_files=False)


def test_missing_tensor_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(checkpoint, load_tokenizer_files=False)


def test_shape_mismatch_names_tensor_and_shapes(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        LoadError,
        match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .*96.* but config\.json implies .*100",
    ):
        load_model(checkpoint, load_tokenizer_files=False)


def test_pickle_only_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    torch.save({}, checkpoint / "pytorch_model.bin")
    with pytest.raises(LoadError, match="safetensors only"):
        load_model(checkpoint, load_tokenizer_files=False)


def test_missing_tokenizer_is_reported(checkpoint):
    with pytest.raises(LoadError, match="no tokenizer"):
        load_model(checkpoint)


def test_bad_dtype():
    from slimlm.model.dtype import parse_dtype

    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        parse_dtype("int3")
