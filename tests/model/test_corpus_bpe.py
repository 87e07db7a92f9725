"""Tests for the offline stdlib corpus (model/training/corpus.py) and the byte-level BPE tokenizer (model/training/bpe.py)."""

from __future__ import annotations

import json
import platform

import pytest

from model.training import bpe
from model.training.corpus import build_corpus, is_heldout, list_source_files, stdlib_root

SMALL = 200_000  # bytes: enough text for a few hundred merges, fast to train on


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(max_bytes=SMALL)


@pytest.fixture(scope="module")
def small_tokenizer(small_corpus):
    return bpe.train_bpe(small_corpus.train_texts, vocab_size=600)


def test_source_selection_excludes_tests_idle_and_big_files():
    files = list_source_files(stdlib_root())
    assert files == sorted(files)
    assert len(files) > 300  # the stdlib has ~650 such files; a tiny number means the walk is broken
    for rel in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts[:-1]), rel
        assert not parts[-1].startswith("_sysconfigdata_"), rel
        assert (stdlib_root() / rel).stat().st_size <= 200_000, rel
    assert "json/decoder.py" in files
    assert "pydoc_data/topics.py" not in files  # > 200 KB generated table


def test_corpus_respects_max_bytes_and_records_manifest(small_corpus, tmp_path):
    manifest = small_corpus.manifest
    texts = small_corpus.train_texts + small_corpus.heldout_texts
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert manifest["num_bytes"] == total
    assert SMALL - 20_000 < total <= SMALL  # the last file is cut at a line boundary
    assert manifest["num_files"] == len(texts)
    assert manifest["python_version"] == platform.python_version()
    assert "PSF" in manifest["licence"] and manifest["licence_file"].endswith("LICENSE.txt")
    small_corpus.write_manifest(tmp_path / "corpus_manifest.json")
    assert json.loads((tmp_path / "corpus_manifest.json").read_text()) == manifest


def test_corpus_is_deterministic(small_corpus):
    again = build_corpus(max_bytes=SMALL)
    assert again.train_texts == small_corpus.train_texts
    assert again.manifest["content_sha256"] == small_corpus.manifest["content_sha256"]


def test_heldout_split_is_by_path_hash_and_about_two_percent():
    files = list_source_files(stdlib_root())
    held = [f for f in files if is_heldout(f)]
    assert 0.005 < len(held) / len(files) < 0.05
    assert is_heldout(held[0]) and is_heldout(held[0], heldout_fraction=0.5)  # larger fraction keeps it
    assert not any(is_heldout(f, heldout_fraction=0.0) for f in files)


def test_heldout_texts_are_the_heldout_files():
    corpus = build_corpus(max_bytes=1_500_000)
    paths = corpus.manifest["split"]["heldout_paths"]
    assert paths and all(is_heldout(p) for p in paths)
    assert corpus.heldout_texts[0] == (stdlib_root() / paths[0]).read_text(encoding="utf-8")
    assert not set(corpus.heldout_texts) & set(corpus.train_texts)


def test_special_token_ids_match_model_config(small_tokenizer):
    assert [small_tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    assert small_tokenizer.get_vocab_size() == 600


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x + 1\n",
        "   leading spaces and trailing   ",
        "\n\n\tclass A:\n\t\tpass\r\n",
        "naïve café — 日本語 🐍 ∑x²",
        "x<eos>y <pad>",  # special-token text inside ordinary text survives when specials are kept
        "",
        " ",
        "\x00\x07 control bytes \x7f",
    ],
)
def test_decode_encode_round_trip_is_exact(small_tokenizer, text):
    ids = small_tokenizer.encode(text).ids
    assert bpe.UNK_ID not in ids
    assert small_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_compresses_code(small_tokenizer, small_corpus):
    text = small_corpus.train_texts[0]
    # ~340 merges already give ~2 bytes per token on code; bytes-only would be 1.
    assert len(small_tokenizer.encode(text).ids) < len(text.encode("utf-8")) / 1.6


def test_training_is_byte_identical_and_save_load_round_trips(small_corpus, small_tokenizer, tmp_path):
    again = bpe.train_bpe(small_corpus.train_texts, vocab_size=600)
    a = bpe.save(small_tokenizer, tmp_path / "a" / "tokenizer.json")
    b = bpe.save(again, tmp_path / "b" / "tokenizer.json")
    assert a.read_bytes() == b.read_bytes()
    loaded = bpe.load(tmp_path / "a")
    text = "import os\nprint(os.getcwd())\n"
    assert loaded.encode(text).ids == small_tokenizer.encode(text).ids


def test_rejects_vocab_smaller_than_bytes_plus_specials():
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe(["abc"], vocab_size=200)
