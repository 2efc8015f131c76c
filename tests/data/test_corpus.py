import importlib.util
from pathlib import Path

import pytest

from slimlm.data import corpus
from slimlm.data.corpus import (
    SEPARATOR,
    SPLITS,
    load_text,
    module_key,
    split_of,
    stdlib_files,
    stdlib_root,
    stdlib_text,
)


def test_split_is_deterministic():
    for split in SPLITS:
        a = stdlib_files(split)
        corpus._scan.cache_clear()
        b = stdlib_files(split)
        assert a == b
        assert a == sorted(a, key=lambda p: p.relative_to(stdlib_root()).as_posix())


def test_splits_are_disjoint_by_file_and_module():
    root = stdlib_root()
    files = {s: {p.relative_to(root).as_posix() for p in stdlib_files(s)} for s in SPLITS}
    modules = {s: {module_key(r) for r in files[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not files[a] & files[b], (a, b)
            assert not modules[a] & modules[b], (a, b)
    assert files["test"] and files["validation"]
    assert len(files["train"]) > 5 * (len(files["test"]) + len(files["validation"]))
    for split, mods in modules.items():
        assert all(split_of(m) == split for m in mods)


def test_split_rule_is_pinned():
    # The rule is part of the contract (held-out data must never move into training).
    assert split_of("sqlite3") == "validation"
    assert split_of("tomllib") == "validation"
    assert split_of("urllib") == "test"
    assert split_of("dis.py") == "test"
    for m in ("json", "email", "asyncio", "argparse.py", "collections", "typing.py"):
        assert split_of(m) == "train", m


def test_excludes_tests_site_packages_and_caches():
    root = stdlib_root()
    for split in SPLITS:
        for p in stdlib_files(split):
            parts = p.relative_to(root).parts
            assert p.suffix == ".py"
            assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), p
            assert not any(part.startswith("test_") for part in parts[:-1]), p


def test_stdlib_text_joins_files():
    files = stdlib_files("test")
    text = stdlib_text("test")
    first = files[0].read_text(encoding="utf-8")
    assert text.startswith(first + SEPARATOR)
    assert text.endswith(files[-1].read_text(encoding="utf-8"))
    assert load_text("stdlib-test") == text
    assert load_text("stdlib", split="test") == text
    assert load_text("stdlib", split="validation", max_chars=100) == stdlib_text("validation")[:100]


def test_load_text_file_dir_and_list(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(f) == "héllo\nworld\n"
    assert load_text(str(f)) == "héllo\nworld\n"

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "a.md").write_text("first", encoding="utf-8")
    (d / "sub" / "c.py").write_text("third", encoding="utf-8")
    (d / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (d / ".hidden").write_text("secret", encoding="utf-8")
    assert load_text(d) == SEPARATOR.join(["first", "second", "third"])
    assert load_text([f, d / "b.txt"]) == "héllo\nworld\n" + SEPARATOR + "second"

    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        load_text(d / "blob.bin")
    with pytest.raises(ValueError):
        stdlib_files("nope")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_gives_clear_error():
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1")
