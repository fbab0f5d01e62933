"""Real sources: local jsonl/json/parquet/text files and folders, map-style and streaming, custom text and
domain fields, domain filters, and a dataset name served from the local Hugging Face cache."""

import glob
import json
import os
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.data import load_documents

# Enough text for a byte-level BPE and a few batches of 4 x 8 tokens.
EN = [f"The {word} sat on the mat number {i}. It was a quiet afternoon in the garden." for i, word in
      enumerate(["cat", "dog", "bird", "fox", "owl", "hen", "cow", "pig", "elk", "bat"])]
FR = [f"Le {word} est assis sur le tapis numéro {i}. C'était un après-midi calme." for i, word in
      enumerate(["chat", "chien", "oiseau", "renard", "hibou", "poule"])]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    rows = [{"content": text, "lang": "en", "id": i} for i, text in enumerate(EN)]
    rows += [{"content": text, "lang": "fr", "id": 100 + i} for i, text in enumerate(FR)]
    return write_jsonl(tmp_path / "docs.jsonl", rows)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_jsonl_with_custom_fields(small_cfg, make_data, jsonl_file, streaming):
    cfg = small_cfg(source=str(jsonl_file), text_field="content", domain_field="lang", streaming=streaming,
                    eval_fraction=0.2)
    documents = load_documents(cfg)
    assert isinstance(documents, datasets.IterableDataset if streaming else datasets.Dataset)
    rows = list(documents)
    assert [row["text"] for row in rows] == EN + FR
    assert [row["domain"] for row in rows] == ["en"] * len(EN) + ["fr"] * len(FR)
    assert set(rows[0]) == {"text", "domain"}

    data = make_data(cfg, seq_len=8, global_batch=2)
    assert data.domains == ["en", "fr"]
    for domain, texts in (("en", EN), ("fr", FR)):
        held_out, train = data.texts(domain, "eval"), data.texts(domain, "train")
        assert sorted(held_out + train) == sorted(texts)
        assert not set(held_out) & set(train)
    batch = next(data.train)
    assert batch["input_ids"].shape == (2, 8)
    decoded = data.tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=True)
    assert any(piece in text for text in EN + FR for piece in decoded.split(".")[:1] if piece.strip())


def test_domains_filter_sets_order(small_cfg, make_data, jsonl_file):
    cfg = small_cfg(source=str(jsonl_file), text_field="content", domain_field="lang", domains=["fr"])
    data = make_data(cfg, seq_len=8, global_batch=2)
    assert data.domains == ["fr"]
    assert sorted(data.texts("fr", "train") + data.texts("fr", "eval")) == sorted(FR)
    both = make_data(small_cfg(source=str(jsonl_file), text_field="content", domain_field="lang",
                               domains=["fr", "en"]), seq_len=8, global_batch=2)
    assert both.domains == ["fr", "en"]
    assert all(int(next(both.train)["domain_ids"].max()) <= 1 for _ in range(3))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_parquet_without_domain_column(small_cfg, make_data, tmp_path, streaming):
    pq.write_table(pa.table({"body": EN, "n": list(range(len(EN)))}), tmp_path / "part-0.parquet")
    cfg = small_cfg(source=str(tmp_path / "part-0.parquet"), text_field="body", streaming=streaming)
    assert [row["domain"] for row in load_documents(cfg)] == ["default"] * len(EN)
    data = make_data(cfg, seq_len=8, global_batch=2)
    assert data.domains == ["default"]
    assert next(data.train)["domain_ids"].eq(0).all()


@pytest.mark.parametrize("unit, expected", [("file", 2), ("paragraph", 4), ("line", 5)])
def test_text_folder_units(small_cfg, tmp_path, unit, expected):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph, line one.\nLine two.\n\nSecond paragraph.\n", encoding="utf-8")
    (folder / "nested" / "b.text").write_text("Another file.\n\nWith two paragraphs.\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("ignored\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a data file\n", encoding="utf-8")
    documents = load_documents(small_cfg(source=str(folder), text_unit=unit))
    assert len(documents) == expected
    assert "ignored" not in "".join(documents["text"])


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_mixed_formats_and_globs(small_cfg, make_data, tmp_path, streaming):
    write_jsonl(tmp_path / "a.jsonl", [{"text": text, "domain": "en"} for text in EN])
    (tmp_path / "b.txt").write_text("\n".join(FR), encoding="utf-8")
    cfg = small_cfg(source=f"{tmp_path}/*.jsonl, {tmp_path}/b.txt", streaming=streaming, text_unit="line")
    rows = list(load_documents(cfg))
    assert sorted(row["text"] for row in rows) == sorted(EN + FR)
    assert {row["domain"] for row in rows} == {"en", "default"}
    assert make_data(cfg, seq_len=8, global_batch=2).domains == ["default", "en"]


def _cache_as_hub_dataset(jsonl_file, hf_cache, repo_id):
    """Put `jsonl_file` in the HF datasets cache the way a download of `repo_id` would leave it."""
    staging = os.path.join(hf_cache, "staging")
    datasets.load_dataset("json", data_files=str(jsonl_file), split="train", cache_dir=staging)
    namespace, name = repo_id.split("/")
    target = os.path.join(hf_cache, f"{namespace}___{name}", "default")
    shutil.copytree(glob.glob(os.path.join(staging, "json", "*"))[0], target)
    for arrow in glob.glob(os.path.join(target, "*", "*", "json-*.arrow")):
        os.rename(arrow, arrow.replace(f"{os.sep}json-", f"{os.sep}{name}-"))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_dataset_name_from_local_cache(small_cfg, make_data, jsonl_file, tmp_path, streaming):
    hf_cache = str(tmp_path / "hf")
    _cache_as_hub_dataset(jsonl_file, hf_cache, "v4forge-test/tiny-docs")
    cfg = small_cfg(source="v4forge-test/tiny-docs", hf_cache_dir=hf_cache, text_field="content",
                    domain_field="lang", streaming=streaming)
    assert [row["text"] for row in load_documents(cfg)] == EN + FR
    assert make_data(cfg, seq_len=8, global_batch=2).domains == ["en", "fr"]
    with pytest.raises(ValueError, match=r"data.source='v4forge-test/missing' is neither a local path nor a dataset"):
        load_documents(small_cfg(source="v4forge-test/missing", hf_cache_dir=hf_cache))
    with pytest.raises(ValueError, match=r"data.split='validation'\): Unknown split"):
        load_documents(small_cfg(source="v4forge-test/tiny-docs", hf_cache_dir=hf_cache, split="validation"))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_null_domain_is_default(small_cfg, make_data, tmp_path, streaming):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": text, "domain": None if i % 2 else "en"}
                                                 for i, text in enumerate(EN)])
    data = make_data(small_cfg(source=str(path), streaming=streaming), seq_len=8, global_batch=2)
    assert data.domains == ["default", "en"]
    assert sorted(data.texts("default", "train") + data.texts("default", "eval")) == sorted(EN[1::2])
