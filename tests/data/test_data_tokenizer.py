"""Tokenizer: special ids, exact round trip, cache reuse, local HF directories, vocabulary limits."""

import json
import os

import pytest

from train.data import build_tokenizer
from train.data.tokenizer import MIN_BPE_VOCAB

ROUND_TRIP_TEXTS = [
    "def f(x):\n\treturn x ** 2  # square\n",
    "  leading and trailing spaces  \r\n\n",
    "Unicode: héllo wörld, x² + y² = z², 日本語, emoji 🤖, zero-width\u200bjoiner",
    "Answer: 7/2",
    "a literal <bos> and <eos> inside a document",
    "",
]


def test_special_ids_and_round_trip(small_data):
    tokenizer = small_data.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 512
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        # Document text never yields a special id, even when it spells one out: packing relies on that.
        assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} & set(ids), text
    assert tokenizer.encode_batch(ROUND_TRIP_TEXTS) == [tokenizer.encode(text) for text in ROUND_TRIP_TEXTS]


def test_bpe_learns_merges(small_data):
    tokenizer = small_data.tokenizer
    text = "Problem: Solve for x: 3x + 7 = 22.\nSolution: Subtract 7 from both sides"
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_second_build_reads_the_cache(small_cfg, tmp_path):
    cfg = small_cfg(cache_dir=str(tmp_path), tokenizer_vocab_size=300)
    first = build_tokenizer(cfg, vocab_size=512)
    tokenizer_file = os.path.join(first.origin, "tokenizer.json")
    written = os.stat(tokenizer_file)
    second = build_tokenizer(cfg, vocab_size=512)
    assert second.origin == first.origin
    assert second.fingerprint == first.fingerprint
    assert second.vocab_size == first.vocab_size == 300
    after = os.stat(tokenizer_file)
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "cache was rewritten"
    assert len(os.listdir(tmp_path / "tokenizers")) == 2  # the directory and its lock file


def test_cache_key_changes_with_corpus_and_vocab(small_cfg, tmp_path):
    base = build_tokenizer(small_cfg(cache_dir=str(tmp_path), tokenizer_vocab_size=300), vocab_size=512)
    other_vocab = build_tokenizer(small_cfg(cache_dir=str(tmp_path), tokenizer_vocab_size=320), vocab_size=512)
    other_corpus = build_tokenizer(small_cfg(cache_dir=str(tmp_path), tokenizer_vocab_size=300,
                                             embedded_math_problems=150), vocab_size=512)
    assert len({base.origin, other_vocab.origin, other_corpus.origin}) == 3
    assert other_vocab.vocab_size == 320


def test_saved_directory_loads_as_local_tokenizer(small_data, small_cfg, tmp_path):
    small_data.tokenizer.save(tmp_path / "tok")
    loaded = build_tokenizer(small_cfg(tokenizer=str(tmp_path / "tok")), vocab_size=512)
    assert loaded.fingerprint == small_data.tokenizer.fingerprint
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert loaded.encode(ROUND_TRIP_TEXTS[2]) == small_data.tokenizer.encode(ROUND_TRIP_TEXTS[2])


def test_local_tokenizer_special_tokens_from_config(small_data, small_cfg, tmp_path):
    directory = tmp_path / "tok"
    small_data.tokenizer.save(directory)
    # An HF-style config naming eos as an AddedToken dict and no pad token: pad falls back to eos.
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True}}))
    loaded = build_tokenizer(small_cfg(tokenizer=str(directory)), vocab_size=512)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 1)


def test_local_tokenizer_larger_than_model_vocab(small_data, small_cfg, tmp_path):
    small_data.tokenizer.save(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"data.tokenizer=.* has 512 tokens, more than the model's vocab_size=400"):
        build_tokenizer(small_cfg(tokenizer=str(tmp_path / "tok")), vocab_size=400)


def test_bpe_vocab_limits(small_cfg):
    with pytest.raises(ValueError, match=r"data.tokenizer_vocab_size=600 exceeds the model's vocab_size=512"):
        build_tokenizer(small_cfg(tokenizer_vocab_size=600), vocab_size=512)
    with pytest.raises(ValueError, match=rf"model.vocab_size=100 is below the {MIN_BPE_VOCAB} tokens"):
        build_tokenizer(small_cfg(), vocab_size=100)


def test_tokenizer_directory_without_tokenizer_json(small_cfg, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        build_tokenizer(small_cfg(tokenizer=str(tmp_path)), vocab_size=512)
    with pytest.raises(ValueError, match="neither 'bpe' nor an existing directory"):
        build_tokenizer(small_cfg(tokenizer=str(tmp_path / "missing")), vocab_size=512)
