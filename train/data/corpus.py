"""A map-style corpus scanned once and tokenized once, with the token arrays cached on disk.

Issue: "tokenization should be cached/precomputed so per-step cost is tiny". `scan_documents` reads the
texts once for everything that needs no tokenizer (domain ids, a content hash, the held-out choice,
byte counts for the early size check); `tokenize_corpus` stores the documents' tokens as one flat
uint32 array plus offsets under `cache_dir/tokens/<corpus hash>-<tokenizer hash>/`, loaded memory-mapped.
"""

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import datasets
import filelock
import numpy as np

from .sources import domain_label
from .tokenizer import TextTokenizer

_SCAN_BATCH_DOCS = 4096


def text_hash(text: str) -> int:
    """Stable 64-bit hash of a document's text; chooses held-out documents independently of any seed."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def is_held_out_by_hash(text: str, eval_fraction: float) -> bool:
    """Streaming held-out rule: the text hash falls in the lowest `eval_fraction` of the hash range."""
    return text_hash(text) < eval_fraction * 2.0 ** 64


@dataclass
class ScannedCorpus:
    """What one pass over the texts gives, before any tokenizer exists."""

    domain_names: list[str]
    domain_ids: np.ndarray
    """int64 [D] index into domain_names, per document."""
    text_hashes: np.ndarray
    """uint64 [D] `text_hash` per document."""
    utf8_bytes: np.ndarray
    """int64 [D] encoded length per document; a byte-level BPE never emits more tokens than bytes."""
    content_hash: str
    """Hash of every (domain, text) in order; keys the token cache."""


def iter_texts(documents: datasets.Dataset) -> Iterator[list[str]]:
    for batch in documents.iter(batch_size=_SCAN_BATCH_DOCS):
        yield batch["text"]


def scan_documents(documents: datasets.Dataset, wanted_domains: Optional[list[str]]) -> ScannedCorpus:
    """Domain ids (in `wanted_domains` order, else sorted by name), text hashes, byte counts, content hash."""
    content = hashlib.blake2b(digest_size=16)
    domain_labels: list[str] = []
    hashes: list[int] = []
    sizes: list[int] = []
    for batch in documents.iter(batch_size=_SCAN_BATCH_DOCS):
        for text, value in zip(batch["text"], batch["domain"]):
            domain = domain_label(value)
            encoded = text.encode()
            content.update(domain.encode() + b"\0" + encoded + b"\0")
            hashes.append(int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little"))
            sizes.append(len(encoded))
            domain_labels.append(domain)
    names = list(wanted_domains) if wanted_domains is not None else sorted(set(domain_labels))
    index = {name: i for i, name in enumerate(names)}
    return ScannedCorpus(domain_names=names,
                         domain_ids=np.array([index[label] for label in domain_labels], dtype=np.int64),
                         text_hashes=np.array(hashes, dtype=np.uint64), utf8_bytes=np.array(sizes, dtype=np.int64),
                         content_hash=content.hexdigest())


def held_out_documents(domain_ids: np.ndarray, text_hashes: np.ndarray, num_domains: int, eval_fraction: float,
                       max_docs: int) -> list[np.ndarray]:
    """Per domain, the corpus indices (ascending) of its held-out documents.

    A domain of n documents holds out min(max_docs, max(1, round(eval_fraction * n))) of them, those with
    the smallest text hashes, but none when eval_fraction is 0 or n < 2 (a domain keeps a training document).
    """
    held_out = []
    for domain in range(num_domains):
        members = np.flatnonzero(domain_ids == domain)
        if eval_fraction <= 0 or len(members) < 2:
            count = 0
        else:
            count = min(max_docs, max(1, round(eval_fraction * len(members))), len(members) - 1)
        chosen = members[np.argsort(text_hashes[members], kind="stable")[:count]]
        held_out.append(np.sort(chosen))
    return held_out


@dataclass
class TokenizedCorpus:
    """Every document's tokens (no bos/eos) concatenated; document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray
    """uint32 [N], memory-mapped from the cache."""
    offsets: np.ndarray
    """int64 [D+1]."""

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_corpus(documents: datasets.Dataset, tokenizer: TextTokenizer, content_hash: str,
                    cache_dir: Path) -> TokenizedCorpus:
    """Tokens of every document, read from the cache or computed once and cached (atomically)."""
    directory = cache_dir / "tokens" / f"{content_hash}-{tokenizer.fingerprint}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(directory) + ".lock"):
        if not (directory / "offsets.npy").exists():
            pieces: list[np.ndarray] = []
            lengths: list[int] = []
            for texts in iter_texts(documents):
                for ids in tokenizer.encode_batch(texts):
                    pieces.append(np.asarray(ids, dtype=np.uint32))
                    lengths.append(len(ids))
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
            _save_arrays_atomically(directory, tokens=tokens, offsets=offsets)
    return TokenizedCorpus(tokens=np.load(directory / "tokens.npy", mmap_mode="r"),
                           offsets=np.load(directory / "offsets.npy"))


def tokenize_in_memory(texts: list[str], tokenizer: TextTokenizer) -> TokenizedCorpus:
    """Tokens of a few documents (streaming eval sets), not cached."""
    encoded = tokenizer.encode_batch(texts)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in encoded], out=offsets[1:])
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint32) for ids in encoded]) if encoded else \
        np.zeros(0, dtype=np.uint32)
    return TokenizedCorpus(tokens=tokens, offsets=offsets)


def _save_arrays_atomically(directory: Path, **arrays: np.ndarray) -> None:
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
