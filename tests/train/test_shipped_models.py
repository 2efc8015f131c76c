"""The shipped reference models (models/py-target, models/py-draft): they load in slimlm and in
transformers, and their quality facts are what the cards say, re-measured here from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.train import quality

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = ("py-target", "py-draft")


def facts(name: str) -> dict:
    return json.loads((MODELS / name / quality.QUALITY_FILE).read_text())


@pytest.fixture(scope="module")
def loaded():
    return {name: quality.load_fp32(MODELS / name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_test_perplexity_matches_the_card_within_1_percent(loaded, name):
    card = facts(name)
    measured = quality.shipped_test_perplexity(loaded[name], card["seq_len"], card["split"])
    assert measured["tokens"] == card["test_tokens"]
    assert measured["ppl"] == pytest.approx(card["test_ppl"], rel=0.01)
    # The card's README states the same figure the JSON holds.
    assert f"Test perplexity: {card['test_ppl']:.3f}" in (MODELS / name / "README.md").read_text()


def test_target_is_clearly_better_than_draft_and_they_share_a_tokenizer():
    target, draft = facts("py-target"), facts("py-draft")
    assert target["test_ppl"] < 0.95 * draft["test_ppl"]
    assert (MODELS / "py-target" / "tokenizer.json").read_bytes() == (
        MODELS / "py-draft" / "tokenizer.json"
    ).read_bytes()


def test_sizes_fit_the_budget():
    total = sum(f.stat().st_size for name in NAMES for f in (MODELS / name).iterdir())
    assert total <= 60e6
    params = {name: json.loads((MODELS / name / "training.json").read_text())["parameters"] for name in NAMES}
    assert 15e6 <= params["py-target"] <= 30e6
    assert 2e6 <= params["py-draft"] <= 4e6


def test_draft_agreement_is_reproduced(loaded):
    card = facts("py-target")
    agreement, compared = quality.greedy_agreement(loaded["py-target"], loaded["py-draft"], card["seq_len"])
    assert compared == card["agreement_tokens"]
    assert agreement == pytest.approx(card["draft_agreement"], abs=0.005)


@pytest.mark.parametrize("name", NAMES)
def test_loads_in_transformers_with_the_same_logits(loaded, name):
    ids = loaded[name].tokenizer("def parse_args(argv):\n    parser = argparse.ArgumentParser(")["input_ids"]
    ids = torch.tensor([ids])
    ref = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = ref(ids).logits
        got = loaded[name].model.forward_dense(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
