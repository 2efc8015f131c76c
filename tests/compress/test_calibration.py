"""Calibration batches: shapes, defaults, BOS, spread over the corpus, determinism."""

from __future__ import annotations

import pytest

from slimlm.compress.calibration import CalibrationConfig, calibration_ids, calibration_shape


class CharTokenizer:
    """One token per character (ids 1..255), BOS = 0: enough to check windows and counts."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 255 for c in text]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i:05d} " + "x" * 40 + "\n" for i in range(2000)))
    return path


def test_default_shapes():
    assert calibration_shape(CalibrationConfig(), "cpu", 4096) == (64, 512)
    assert calibration_shape(CalibrationConfig(), "cuda", 4096) == (128, 2048)
    assert calibration_shape(CalibrationConfig(tokens=65536), "cpu", 4096) == (128, 512)
    assert calibration_shape(CalibrationConfig(), "cpu", 256) == (128, 256)  # clamped, same token budget
    with pytest.raises(ValueError, match="tokens"):
        CalibrationConfig(tokens=0)


def test_windows_from_a_text_file(text_file):
    cfg = CalibrationConfig(source=str(text_file), tokens=16 * 64, seq_len=64)
    ids = calibration_ids(CharTokenizer(), cfg, "cpu", 1024)
    assert ids.shape == (16, 64)
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] > 0).all()  # BOS, then text
    starts = sorted(ids[:, 1:11].tolist())
    assert all(bytes(c - 1 for c in s).decode().startswith("line ") for s in starts)  # windows start at a line
    line_numbers = sorted(int(bytes(c - 1 for c in s).decode()[5:10]) for s in starts)
    assert line_numbers[0] == 0 and line_numbers[-1] > 1800  # spread over the whole text
    assert (calibration_ids(CharTokenizer(), cfg, "cpu", 1024) == ids).all()
    reordered = calibration_ids(CharTokenizer(), CalibrationConfig(**{**cfg.__dict__, "seed": 1}), "cpu", 1024)
    assert sorted(reordered.tolist()) == sorted(ids.tolist()) and reordered.tolist() != ids.tolist()


def test_too_little_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(ValueError, match="only 4 tokens"):
        calibration_ids(CharTokenizer(), CalibrationConfig(source=str(path), tokens=64, seq_len=64), "cpu", 1024)
