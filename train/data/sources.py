"""Documents as `datasets` objects with columns text, domain (issue: "Data on `datasets`").

`load_documents(cfg)` returns a `datasets.Dataset` (or, with `cfg.streaming`, an `IterableDataset`)
from one of:
- the embedded corpus (`embedded.py`);
- local .jsonl/.json/.parquet/.txt/.text files, folders (searched recursively) or globs, comma-separated;
- a Hugging Face dataset name, read from the local HF cache only: this code never opens a connection.

Every column other than text and domain is dropped; a source without the domain column gets domain
"default" (so does a null domain value, see `domain_label`). Empty texts and, with `cfg.domains`, other
domains are removed. Bad input raises a one-line
ValueError naming the config field, the file and the fix, before anything expensive runs.
"""

import contextlib
import glob
import os
from pathlib import Path
from typing import Iterator, Union

import datasets

from .config import EMBEDDED_SOURCE, TEXT_UNITS, DataConfig
from .embedded import embedded_documents

Documents = Union[datasets.Dataset, datasets.IterableDataset]

DEFAULT_DOMAIN = "default"
FORMAT_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
# datasets' text builder calls these `sample_by` values.
_SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}
_UTF8_CHECK_CHUNK_BYTES = 1 << 24
_FILTER_BATCH_DOCS = 4096


def domain_label(value: object) -> str:
    """The domain of a row: its domain value, or 'default' where the column holds null."""
    return DEFAULT_DOMAIN if value is None else value


def load_documents(cfg: DataConfig) -> Documents:
    """The configured documents with exactly the columns text (str) and domain (str)."""
    if cfg.text_unit not in TEXT_UNITS:
        raise ValueError(f"data.text_unit={cfg.text_unit!r} is not one of {list(TEXT_UNITS)}; pick one of them")
    if cfg.domains is not None and len(cfg.domains) == 0:
        raise ValueError("data.domains is an empty list, which keeps no document; set it to null for all domains")
    if cfg.source == EMBEDDED_SOURCE:
        documents: Documents = datasets.Dataset.from_dict(embedded_documents(cfg))
        if cfg.streaming:
            documents = documents.to_iterable_dataset()
        origin = "the embedded corpus"
    else:
        files = local_files(cfg.source)
        if files is not None:
            if cfg.split != "train":
                raise ValueError(f"data.split={cfg.split!r} does not apply to local files (data.source="
                                 f"{cfg.source!r}), which form the single split 'train'; set data.split=train")
            documents = _load_local_files(files, cfg)
            origin = ", ".join(str(path) for path in files[:3]) + (" ..." if len(files) > 3 else "")
        else:
            documents = _load_cached_hub_dataset(cfg)
            origin = f"dataset {cfg.source!r}"
    documents = _select_text_and_domain(documents, cfg, origin)
    return _drop_unwanted(documents, cfg, origin)


def local_files(source: str) -> list[Path] | None:
    """The data files `source` names, sorted; None when `source` is not a local path (a hub name)."""
    parts = [part.strip() for part in source.split(",") if part.strip()]
    if not parts:
        raise ValueError("data.source is empty; set it to 'embedded', local data files or a dataset name")
    if len(parts) == 1 and not _looks_like_path(parts[0]):
        return None
    files: list[Path] = []
    for part in parts:
        expanded = os.path.expanduser(part)
        if glob.has_magic(expanded):
            matches = [Path(match) for match in sorted(glob.glob(expanded, recursive=True))]
            if not matches:
                raise ValueError(f"data.source: the pattern {part!r} matches no file; fix the pattern or the path")
            for match in matches:
                files.extend(_data_files_under(match) if match.is_dir() else [match])
            continue
        path = Path(expanded)
        if not path.exists():
            raise ValueError(f"data.source: {part!r} does not exist; fix the path, or set data.source=embedded "
                             f"for the built-in corpus")
        files.extend(_data_files_under(path) if path.is_dir() else [path])
    for path in files:
        if path.suffix.lower() not in FORMAT_BY_SUFFIX:
            raise ValueError(f"data.source: {path} has an unsupported extension; use one of "
                             f"{sorted(FORMAT_BY_SUFFIX)}")
    return files


def _looks_like_path(source: str) -> bool:
    expanded = os.path.expanduser(source)
    return (os.path.exists(expanded) or glob.has_magic(source) or source.startswith(("/", "./", "../", "~"))
            or Path(source).suffix.lower() in FORMAT_BY_SUFFIX or source.count("/") > 1)


def _data_files_under(folder: Path) -> list[Path]:
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and path.suffix.lower() in FORMAT_BY_SUFFIX
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not files:
        raise ValueError(f"data.source: the folder {folder} holds no {'/'.join(sorted(FORMAT_BY_SUFFIX))} "
                         f"file; point data.source at the data files")
    return files


def check_utf8(path: Path) -> None:
    """Raise a ValueError naming the file and byte offset of the first invalid UTF-8 sequence."""
    offset = 0
    pending = b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_UTF8_CHECK_CHUNK_BYTES)
            data = pending + chunk
            try:
                data.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as error:
                # A multi-byte character cut by the chunk boundary is completed by the next chunk.
                truncated_at_end = error.reason == "unexpected end of data" and chunk
                if not truncated_at_end:
                    bad_offset = offset + error.start
                    raise ValueError(
                        f"data.source: {path} is not valid UTF-8 (byte 0x{data[error.start]:02x} at byte offset "
                        f"{bad_offset}); re-encode it to UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}`") from None
                pending = data[error.start:]
                offset += error.start
                continue
            if not chunk:
                return
            offset += len(data)


def _load_local_files(files: list[Path], cfg: DataConfig) -> Documents:
    # datasets' builders fail obscurely on 0-byte files (StopIteration from schema inference), so skip them.
    non_empty = [path for path in files if path.stat().st_size > 0]
    if not non_empty:
        raise ValueError(f"data.source={cfg.source!r}: every data file is empty ({', '.join(map(str, files[:3]))}"
                         f"{' ...' if len(files) > 3 else ''}); point data.source at files with documents")
    by_format: dict[str, list[str]] = {}
    for path in non_empty:
        data_format = FORMAT_BY_SUFFIX[path.suffix.lower()]
        if data_format in ("json", "text"):
            check_utf8(path)
        by_format.setdefault(data_format, []).append(str(path))
    parts = []
    for data_format, format_files in by_format.items():
        extra = {"sample_by": _SAMPLE_BY[cfg.text_unit]} if data_format == "text" else {}
        with _offline():
            part = datasets.load_dataset(data_format, data_files=format_files, split="train",
                                         streaming=cfg.streaming, cache_dir=cfg.hf_cache_dir, **extra)
        parts.append(_select_text_and_domain(part, cfg, ", ".join(format_files)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    # `datasets.load` reads `config.HF_HUB_OFFLINE` before every network access: for a dataset name it then
    # falls back to the local cache (CachedDatasetModuleFactory), and for local files it skips the
    # download-count request (`increase_load_count`, a HEAD request with a 3 s timeout).
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _load_cached_hub_dataset(cfg: DataConfig) -> Documents:
    try:
        with _offline():
            documents = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split, cache_dir=cfg.hf_cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        cache = cfg.hf_cache_dir or datasets.config.HF_DATASETS_CACHE
        raise ValueError(
            f"data.source={cfg.source!r} is neither a local path nor a dataset in the local Hugging Face cache "
            f"({cache}); run `datasets.load_dataset({cfg.source!r})` where there is network and copy the cache, "
            f"or point data.source at local files ({type(error).__name__}: {_first_line(error)})") from None
    except ValueError as error:
        raise ValueError(f"data.source={cfg.source!r} (data.subset={cfg.subset!r}, data.split={cfg.split!r}): "
                         f"{_first_line(error)}; fix data.subset or data.split") from None
    # A cached dataset is memory-mapped Arrow already; streaming reads it lazily in the same order.
    return documents.to_iterable_dataset() if cfg.streaming else documents


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return " ".join(line.strip() for line in lines) if lines else type(error).__name__


def _column_names(documents: Documents) -> list[str]:
    names = documents.column_names
    if names is None:  # an IterableDataset whose features are unknown until read
        first = next(iter(documents), None)
        names = list(first) if first is not None else []
    return names


def _select_text_and_domain(documents: Documents, cfg: DataConfig, origin: str) -> Documents:
    """Keep only the text and domain columns, renamed to text/domain; a missing domain becomes 'default'."""
    columns = _column_names(documents)
    if columns == ["text", "domain"] and documents.features is not None \
            and documents.features["domain"] == datasets.Value("string"):
        return documents
    if cfg.text_field not in columns:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {origin} (columns: {columns}); "
                         f"set data.text_field to the column holding the text")
    features = documents.features
    if features is not None and features[cfg.text_field] not in (datasets.Value("string"),
                                                                 datasets.Value("large_string")):
        raise ValueError(f"data.text_field={cfg.text_field!r} of {origin} holds {features[cfg.text_field]}, not "
                         f"text; set data.text_field to a string column (columns: {columns})")
    if cfg.domain_field == cfg.text_field:
        raise ValueError(f"data.domain_field and data.text_field are both {cfg.text_field!r}; set data.domain_field "
                         f"to the column holding the domain label")
    has_domain = cfg.domain_field in columns
    documents = documents.select_columns([cfg.text_field] + ([cfg.domain_field] if has_domain else []))
    if cfg.text_field != "text":
        documents = documents.rename_column(cfg.text_field, "text")
    if has_domain:
        if cfg.domain_field != "domain":
            documents = documents.rename_column(cfg.domain_field, "domain")
        if features is None or features[cfg.domain_field] != datasets.Value("string"):
            documents = documents.cast_column("domain", datasets.Value("string"))
        return documents
    if isinstance(documents, datasets.IterableDataset):
        return documents.map(lambda batch: {"domain": [DEFAULT_DOMAIN] * len(batch["text"])}, batched=True,
                             features=datasets.Features({"text": datasets.Value("string"),
                                                         "domain": datasets.Value("string")}))
    return documents.add_column("domain", [DEFAULT_DOMAIN] * len(documents))


def _drop_unwanted(documents: Documents, cfg: DataConfig, origin: str) -> Documents:
    """Remove empty texts and, with data.domains, the other domains; a map-style result must not be empty."""
    wanted = set(cfg.domains) if cfg.domains is not None else None

    def keep(texts: list[str], domains: list[str]) -> list[bool]:
        return [bool(text) and (wanted is None or domain_label(domain) in wanted)
                for text, domain in zip(texts, domains)]

    if isinstance(documents, datasets.IterableDataset):
        return documents.filter(keep, input_columns=["text", "domain"], batched=True)
    if len(documents) == 0:
        raise ValueError(f"data.source: {origin} holds no rows; point data.source at a non-empty dataset")
    # `select` only records the kept row indices: no Arrow rewrite, no cache file.
    kept = []
    for start, batch in enumerate(documents.iter(batch_size=_FILTER_BATCH_DOCS)):
        kept.extend(start * _FILTER_BATCH_DOCS + i for i, ok in enumerate(keep(batch["text"], batch["domain"])) if ok)
    if not kept:
        if wanted is not None:
            available = sorted(set(documents.unique("domain")))
            raise ValueError(f"data.domains={cfg.domains} matches no non-empty document of {origin}; available "
                             f"domains: {available}")
        raise ValueError(f"data.source: every {cfg.text_field!r} text of {origin} is empty; point data.source at "
                         f"a dataset with text or fix data.text_field")
    return documents if len(kept) == len(documents) else documents.select(kept)
