"""Bad input: every case raises a one-line ValueError naming the field/file and the fix, before any
tokenizer is trained, and never damages what the cache already holds."""

import hashlib
import json
import os

import pytest

from train.data import build_data
from train.data import sources as sources_module
from train.data.sources import check_utf8


@pytest.fixture
def fresh_cache(tmp_path):
    return tmp_path / "cache"


def expect_error(cfg, run_args, pattern, **overrides):
    """Build, expect a one-line ValueError matching `pattern`, and check no tokenizer was trained."""
    with pytest.raises(ValueError, match=pattern) as raised:
        build_data(cfg, **{**run_args, **overrides})
    message = str(raised.value)
    assert "\n" not in message, message
    assert not os.path.exists(os.path.join(os.path.expanduser(cfg.cache_dir), "tokenizers")), \
        "a tokenizer was trained before the error"
    return message


def test_missing_paths(small_cfg, run_args, fresh_cache, tmp_path):
    missing = tmp_path / "nope.jsonl"
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(missing)), run_args,
                 rf"data.source: '{missing}' does not exist; fix the path")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(tmp_path / "no-folder")), run_args,
                 "does not exist")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(tmp_path / "*.parquet")), run_args,
                 r"the pattern .* matches no file")
    (tmp_path / "empty-folder").mkdir()
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(tmp_path / "empty-folder")), run_args,
                 r"folder .*empty-folder holds no .* file")


def test_empty_datasets(small_cfg, run_args, fresh_cache, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(tmp_path / "empty.jsonl")), run_args,
                 "every data file is empty")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(tmp_path / "blank.jsonl")), run_args,
                 "every 'text' text of .*blank.jsonl is empty")


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_domains_filter_that_removes_everything(small_cfg, run_args, fresh_cache, streaming):
    message = expect_error(small_cfg(cache_dir=str(fresh_cache), domains=["poetry"], streaming=streaming),
                           run_args, r"data.domains")
    if not streaming:
        assert "available domains: ['code', 'math', 'prose']" in message
    expect_error(small_cfg(cache_dir=str(fresh_cache), domains=[]), run_args, "data.domains is an empty list")


def test_non_utf8_text_file(small_cfg, run_args, fresh_cache, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Grüße aus Köln\n".encode("utf-8") + "café au lait\n".encode("latin-1"))
    offset = len("Grüße aus Köln\n".encode("utf-8")) + 3
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(path)), run_args,
                 rf"{path} is not valid UTF-8 \(byte 0xe9 at byte offset {offset}\); re-encode it to UTF-8")


def test_utf8_check_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "_UTF8_CHECK_CHUNK_BYTES", 5)
    good = tmp_path / "good.txt"
    good.write_text("ab€cd€€e日本語 ok\n" * 3, encoding="utf-8")  # multi-byte characters straddle chunks
    check_utf8(good)
    bad = tmp_path / "bad.txt"
    prefix = "ab€cd€€e".encode("utf-8")
    bad.write_bytes(prefix + b"\xff" + "more text".encode("utf-8"))
    with pytest.raises(ValueError, match=rf"byte 0xff at byte offset {len(prefix)}\)"):
        check_utf8(bad)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes("complete €".encode("utf-8")[:-1])
    with pytest.raises(ValueError, match=rf"at byte offset {len('complete '.encode())}\)"):
        check_utf8(truncated)


def test_text_field_absent_or_not_text(small_cfg, run_args, fresh_cache, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "hello", "lang": "en"}) + "\n")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(path)), run_args,
                 r"data.text_field='text' is not a column of .*docs.jsonl \(columns: \['content', 'lang'\]\); "
                 r"set data.text_field")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(path), streaming=True), run_args,
                 r"columns: \['content', 'lang'\]")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"text": 5}) + "\n")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(numbers)), run_args, r"holds .*int64.*, not text")


def test_split_of_local_files(small_cfg, run_args, fresh_cache, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(path), split="validation"), run_args,
                 "data.split='validation' does not apply to local files")


def test_run_argument_errors(small_cfg, run_args, fresh_cache):
    cfg = small_cfg(cache_dir=str(fresh_cache))
    expect_error(cfg, run_args, "global_batch=6 is not divisible by the data-parallel size 4", global_batch=6,
                 dp_size=4)
    expect_error(cfg, run_args, r"dp_rank=2 is outside \[0, 2\)", dp_rank=2, dp_size=2)
    expect_error(small_cfg(cache_dir=str(fresh_cache), eval_fraction=1.0), run_args, "data.eval_fraction=1.0")
    expect_error(small_cfg(cache_dir=str(fresh_cache), tokenizer_vocab_size=1024), run_args,
                 r"data.tokenizer_vocab_size=1024 exceeds the model's vocab_size=512")
    expect_error(small_cfg(cache_dir=str(fresh_cache), text_unit="sentence"), run_args, "data.text_unit='sentence'")


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_fewer_tokens_than_one_batch(small_cfg, run_args, fresh_cache, tmp_path, streaming):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": f"short document {i}"}) + "\n" for i in range(3)))
    expect_error(small_cfg(cache_dir=str(fresh_cache), source=str(path), streaming=streaming), run_args,
                 r"gives at most \d+ training tokens, fewer than one global batch \(4 x 32 \+ 1 = 129\)")


def _tree_digest(root):
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def test_errors_leave_the_cache_intact(small_cfg, run_args, tmp_path):
    cache = tmp_path / "cache"
    good = build_data(small_cfg(cache_dir=str(cache)), **run_args)
    before = _tree_digest(cache)
    with pytest.raises(ValueError):
        build_data(small_cfg(cache_dir=str(cache), tokenizer_vocab_size=1024), **run_args)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_data(small_cfg(cache_dir=str(cache)), **{**run_args, "seq_len": 10_000_000})
    with pytest.raises(ValueError):
        build_data(small_cfg(cache_dir=str(cache), source=str(tmp_path / "missing.jsonl")), **run_args)
    assert _tree_digest(cache) == before
    again = build_data(small_cfg(cache_dir=str(cache)), **run_args)
    assert again.tokenizer.origin == good.tokenizer.origin
    assert again.tokenizer.fingerprint == good.tokenizer.fingerprint


def test_fewer_tokens_than_one_batch_after_tokenization(small_cfg, run_args, tmp_path):
    # 300 bytes pass the one-token-per-byte bound (129 needed), but BPE compresses the repetition far below it.
    path = tmp_path / "repetitive.jsonl"
    path.write_text(json.dumps({"text": "ab" * 150}) + "\n")
    with pytest.raises(ValueError, match=r"gives \d+ training tokens, fewer than one global batch") as raised:
        build_data(small_cfg(cache_dir=str(tmp_path / "cache"), source=str(path)), **run_args)
    assert "at most" not in str(raised.value)


def test_streaming_domain_unseen_in_probe(small_cfg, run_args, tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document number {i} " * 20, "domain": "early"} for i in range(4)]
    rows.append({"text": "a late document " * 20, "domain": "late"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = build_data(small_cfg(cache_dir=str(tmp_path / "cache"), source=str(path), streaming=True,
                                stream_probe_docs=2, eval_fraction=0.0), **{**run_args, "global_batch": 2})
    with pytest.raises(RuntimeError, match=r"domain 'late' first appears after the first 2 documents.*data.domains"):
        for _ in range(20):
            next(data.train)
