"""`build_data`: documents → tokenizer → tokens → train loader and per-domain eval sets.

Issue: "Data on `datasets`" and its bad-input list. Every check that needs no tokenizer runs before the
tokenizer is trained or the corpus tokenized: argument consistency, paths, UTF-8, columns, empty
corpus, and (byte-level BPE) an upper bound on the token count. Caches are written atomically, so an
error or an interrupted run never leaves a half-written file behind.
"""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch

from .config import BPE_TOKENIZER, DataConfig
from .corpus import (TokenizedCorpus, held_out_documents, is_held_out_by_hash, iter_texts, scan_documents,
                     tokenize_corpus, tokenize_in_memory)
from .loader import MapSource, PackedLoader
from .packing import DocumentSequence, EpochStream, pack_rows, pack_sequence
from .sources import domain_label, load_documents
from .streaming import StreamingSource
from .tokenizer import TextTokenizer, build_tokenizer, check_bpe_vocab

TRAIN, EVAL = "train", "eval"


@dataclass
class DomainStats:
    """Size of one domain; for a streaming source the train numbers count the probed documents only."""

    train_documents: int
    train_tokens: int
    """Packed tokens, bos and eos included."""
    eval_documents: int
    eval_tokens: int


@dataclass
class EvalSet:
    """The held-out documents of one domain, packed like training rows (no shuffle, padded at the end)."""

    domain: str
    texts: list[str]
    sequence: DocumentSequence


@dataclass
class Data:
    """What `build_data` returns: tokenizer, this rank's train loader, per-domain eval sets and texts."""

    tokenizer: TextTokenizer
    train: PackedLoader
    domains: list[str]
    """Domain names; domain_ids in batches index this list."""
    stats: dict[str, DomainStats]
    """Per domain name."""
    source: str
    """`DataConfig.source` the documents came from."""
    streaming: bool
    seq_len: int
    global_batch: int
    dp_rank: int
    dp_size: int
    eval_sets: dict[str, EvalSet] = field(repr=False)
    _train_texts: Optional[dict[str, list[str]]] = field(default=None, repr=False)
    """Streaming: the probed training texts per domain."""
    _documents: Optional[datasets.Dataset] = field(default=None, repr=False)
    """Map-style: all documents (text, domain), in corpus order."""
    _train_documents_by_domain: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _eval_cache: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def eval_batches(self, domain: str) -> list[dict[str, torch.Tensor]]:
        """This rank's slices of the held-out batches of `domain` ([] if it has no held-out document).

        Global eval batches have `global_batch` rows; the last is completed with padding rows (labels -100),
        so every rank gets the same number of batches. Sum losses over ranks and divide by the count of
        labels != -100.
        """
        if domain not in self.eval_sets:
            raise KeyError(f"no eval set for domain {domain!r}; domains: {self.domains}")
        if domain not in self._eval_cache:
            local = self.global_batch // self.dp_size
            batches = pack_sequence(self.eval_sets[domain].sequence, self.seq_len, self.global_batch,
                                    self.tokenizer.pad_id) if self.eval_sets[domain].texts else []
            self._eval_cache[domain] = [
                pack_rows(*(array[self.dp_rank * local:(self.dp_rank + 1) * local] for array in batch))
                for batch in batches]
        return self._eval_cache[domain]

    def texts(self, domain: str, split: str = EVAL, limit: Optional[int] = None) -> list[str]:
        """Document texts of `domain` in corpus order (split "train" or "eval"), e.g. distillation prompts.

        For a streaming source, "train" texts are the training documents among the probed ones.
        """
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; domains: {self.domains}")
        if split == EVAL:
            return list(self.eval_sets[domain].texts[:limit])
        if split != TRAIN:
            raise ValueError(f"split must be {TRAIN!r} or {EVAL!r}, got {split!r}")
        if self._train_texts is not None:
            return list(self._train_texts[domain][:limit])
        return list(self._documents.select(self._train_documents_by_domain[domain][:limit])["text"])

    def summary(self) -> str:
        """A few lines for the run log: source, tokenizer, documents and tokens per domain, epoch size."""
        tokens_note = " (probed documents)" if self.streaming else ""
        lines = [f"data: {self.source}{' [streaming]' if self.streaming else ''}; tokenizer {self.tokenizer.origin} "
                 f"({self.tokenizer.vocab_size} tokens); seed {self.train.seed}",
                 f"  {'domain':<12}{'train docs':>12}{'train tokens':>15}{'eval docs':>11}{'eval tokens':>13}"
                 f"{tokens_note}"]
        for name in self.domains:
            stats = self.stats[name]
            lines.append(f"  {name:<12}{stats.train_documents:>12,}{stats.train_tokens:>15,}"
                         f"{stats.eval_documents:>11,}{stats.eval_tokens:>13,}")
        batch_tokens = self.global_batch * self.seq_len
        if self.train.tokens_per_epoch is not None:
            lines.append(f"  one epoch = {self.train.tokens_per_epoch:,} tokens = "
                         f"{self.train.tokens_per_epoch / batch_tokens:.1f} global batches of {self.global_batch} x "
                         f"{self.seq_len}")
        return "\n".join(lines)


def build_data(cfg: DataConfig, *, vocab_size: int, seq_len: int, global_batch: int, dp_rank: int = 0,
               dp_size: int = 1, seed: int) -> Data:
    """Tokenizer, train loader for rank `dp_rank` of `dp_size`, and per-domain eval sets of `cfg`.

    vocab_size: the model's vocabulary (the tokenizer must fit in it); seq_len: tokens per row;
    global_batch: rows per optimizer step over all data-parallel ranks; seed: run seed (used unless
    cfg.seed is set).
    """
    _check_arguments(cfg, vocab_size, seq_len, global_batch, dp_rank, dp_size, seed)
    data_seed = seed if cfg.seed is None else cfg.seed
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    # Loading a tokenizer.json is cheap, so a bad directory or a too-large vocabulary fails first.
    local_tokenizer = None if cfg.tokenizer == BPE_TOKENIZER else build_tokenizer(cfg, vocab_size)
    documents = load_documents(cfg)
    shape = dict(seq_len=seq_len, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size)
    if cfg.streaming:
        return _build_streaming(cfg, documents, local_tokenizer, vocab_size, data_seed, **shape)
    return _build_map_style(cfg, documents, local_tokenizer, vocab_size, data_seed, cache_dir, **shape)


def _check_arguments(cfg: DataConfig, vocab_size: int, seq_len: int, global_batch: int, dp_rank: int,
                     dp_size: int, seed: int) -> None:
    if seq_len < 1 or global_batch < 1 or dp_size < 1:
        raise ValueError(f"build_data needs seq_len, global_batch and dp_size >= 1 (got {seq_len}, {global_batch}, "
                         f"{dp_size}); fix the training config")
    if global_batch % dp_size:
        raise ValueError(f"global_batch={global_batch} is not divisible by the data-parallel size {dp_size}; set "
                         f"global_batch to a multiple of {dp_size}")
    if seed < 0 or (cfg.seed is not None and cfg.seed < 0):
        raise ValueError(f"the data seed must be >= 0 (run seed {seed}, data.seed {cfg.seed}); use a non-negative seed")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, {dp_size}); pass this process's data-parallel rank")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction} is outside [0, 1); set it to e.g. 0.02 (or 0)")
    if cfg.eval_max_docs < 0 or cfg.shuffle_buffer < 1 or cfg.stream_probe_docs < 1:
        raise ValueError("data.eval_max_docs must be >= 0 and data.shuffle_buffer, data.stream_probe_docs >= 1; "
                         "fix them")
    if cfg.tokenizer == BPE_TOKENIZER:
        check_bpe_vocab(cfg, vocab_size)


def _check_enough_tokens(train_tokens: int, seq_len: int, global_batch: int, bound: bool, source: str) -> None:
    needed = global_batch * seq_len + 1
    if train_tokens < needed:
        amount = f"at most {train_tokens}" if bound else str(train_tokens)
        raise ValueError(f"data.source={source!r} gives {amount} training tokens, fewer than one global batch "
                         f"({global_batch} x {seq_len} + 1 = {needed}); add documents, lower global_batch or seq_len, "
                         f"or lower data.eval_fraction")


def _fingerprint(*parts: object) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _build_map_style(cfg: DataConfig, documents: datasets.Dataset, local_tokenizer: Optional[TextTokenizer],
                     vocab_size: int, seed: int, cache_dir: Path, *, seq_len: int, global_batch: int, dp_rank: int,
                     dp_size: int) -> Data:
    scanned = scan_documents(documents, cfg.domains)
    num_domains = len(scanned.domain_names)
    held_out = held_out_documents(scanned.domain_ids, scanned.text_hashes, num_domains, cfg.eval_fraction,
                                  cfg.eval_max_docs)
    is_train = np.ones(len(scanned.domain_ids), dtype=bool)
    for indices in held_out:
        is_train[indices] = False
    train_documents = np.flatnonzero(is_train)
    if local_tokenizer is None:
        # A byte-level BPE emits at most one token per byte: too few bytes means too few tokens.
        _check_enough_tokens(int((scanned.utf8_bytes[train_documents] + 2).sum()), seq_len, global_batch,
                             bound=True, source=cfg.source)
        tokenizer = build_tokenizer(cfg, vocab_size,
                                    documents=(text for texts in iter_texts(documents) for text in texts))
    else:
        tokenizer = local_tokenizer
    corpus = tokenize_corpus(documents, tokenizer, scanned.content_hash, cache_dir)
    packed_lengths = corpus.lengths + 2
    _check_enough_tokens(int(packed_lengths[train_documents].sum()), seq_len, global_batch, bound=False,
                         source=cfg.source)

    stream = EpochStream(corpus.tokens, corpus.offsets, scanned.domain_ids, train_documents, seed,
                         tokenizer.bos_id, tokenizer.eos_id)
    fingerprint = _fingerprint("map", scanned.content_hash, tokenizer.fingerprint, cfg.eval_fraction, cfg.eval_max_docs)
    loader = PackedLoader(MapSource(stream), seq_len=seq_len, global_batch=global_batch, dp_rank=dp_rank,
                          dp_size=dp_size, seed=seed, fingerprint=fingerprint, tokens_per_epoch=stream.tokens_per_epoch)
    eval_sets, stats, train_by_domain = {}, {}, {}
    for domain_id, name in enumerate(scanned.domain_names):
        eval_indices = held_out[domain_id]
        train_indices = train_documents[scanned.domain_ids[train_documents] == domain_id]
        train_by_domain[name] = train_indices
        eval_sets[name] = EvalSet(domain=name, texts=list(documents.select(eval_indices)["text"]),
                                  sequence=DocumentSequence(corpus.tokens, corpus.offsets, scanned.domain_ids,
                                                            eval_indices, tokenizer.bos_id, tokenizer.eos_id))
        stats[name] = DomainStats(train_documents=len(train_indices),
                                  train_tokens=int(packed_lengths[train_indices].sum()),
                                  eval_documents=len(eval_indices), eval_tokens=int(packed_lengths[eval_indices].sum()))
    return Data(tokenizer=tokenizer, train=loader, domains=scanned.domain_names, stats=stats, source=cfg.source,
                streaming=False, seq_len=seq_len, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size,
                eval_sets=eval_sets, _documents=documents, _train_documents_by_domain=train_by_domain)


def _build_streaming(cfg: DataConfig, documents: datasets.IterableDataset, local_tokenizer: Optional[TextTokenizer],
                     vocab_size: int, seed: int, *, seq_len: int, global_batch: int, dp_rank: int,
                     dp_size: int) -> Data:
    probe_texts, probe_domains = [], []
    for row in documents:
        probe_texts.append(row["text"])
        probe_domains.append(domain_label(row["domain"]))
        if len(probe_texts) >= cfg.stream_probe_docs:
            break
    stream_is_probed_whole = len(probe_texts) < cfg.stream_probe_docs
    if not probe_texts:
        filter_note = f" with data.domains={cfg.domains}" if cfg.domains is not None else ""
        raise ValueError(f"data.source={cfg.source!r} holds no non-empty document{filter_note}; point data.source at "
                         f"documents with text (check data.text_field and data.domains)")
    names = list(cfg.domains) if cfg.domains is not None else sorted(set(probe_domains))
    domain_index = {name: i for i, name in enumerate(names)}
    held = [is_held_out_by_hash(text, cfg.eval_fraction) for text in probe_texts]
    if local_tokenizer is None and stream_is_probed_whole:
        train_bytes = sum(len(text.encode()) + 2 for text, out in zip(probe_texts, held) if not out)
        _check_enough_tokens(train_bytes, seq_len, global_batch, bound=True, source=cfg.source)
    tokenizer = local_tokenizer if local_tokenizer is not None else build_tokenizer(cfg, vocab_size,
                                                                                    documents=probe_texts)
    eval_texts: dict[str, list[str]] = {name: [] for name in names}
    train_texts: dict[str, list[str]] = {name: [] for name in names}
    for text, domain, out in zip(probe_texts, probe_domains, held):
        if out:
            if len(eval_texts[domain]) < cfg.eval_max_docs:
                eval_texts[domain].append(text)
        else:
            train_texts[domain].append(text)
    stats, eval_sets = {}, {}
    for domain_id, name in enumerate(names):
        eval_corpus = tokenize_in_memory(eval_texts[name], tokenizer)
        train_lengths = [len(ids) + 2 for ids in tokenizer.encode_batch(train_texts[name])]
        stats[name] = DomainStats(train_documents=len(train_lengths), train_tokens=sum(train_lengths),
                                  eval_documents=len(eval_texts[name]),
                                  eval_tokens=int((eval_corpus.lengths + 2).sum()))
        eval_sets[name] = EvalSet(domain=name, texts=eval_texts[name], sequence=_in_memory_sequence(
            eval_corpus, domain_id, tokenizer))
    if stream_is_probed_whole:
        _check_enough_tokens(sum(s.train_tokens for s in stats.values()), seq_len, global_batch, bound=False,
                             source=cfg.source)
    probe_hash = hashlib.blake2b(digest_size=16)
    for text, domain in zip(probe_texts, probe_domains):
        probe_hash.update(domain.encode() + b"\0" + text.encode() + b"\0")
    fingerprint = _fingerprint("stream", cfg.source, cfg.subset, cfg.split, cfg.domains, probe_hash.hexdigest(),
                               tokenizer.fingerprint, cfg.eval_fraction, cfg.shuffle_buffer)
    source = StreamingSource(documents, tokenizer, domain_index, seed, cfg.shuffle_buffer, cfg.eval_fraction,
                             cfg.stream_probe_docs)
    loader = PackedLoader(source, seq_len=seq_len, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size,
                          seed=seed, fingerprint=fingerprint, tokens_per_epoch=None)
    return Data(tokenizer=tokenizer, train=loader, domains=names, stats=stats, source=cfg.source, streaming=True,
                seq_len=seq_len, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, eval_sets=eval_sets,
                _train_texts=train_texts)


def _in_memory_sequence(corpus: TokenizedCorpus, domain_id: int, tokenizer: TextTokenizer) -> DocumentSequence:
    count = len(corpus.offsets) - 1
    return DocumentSequence(corpus.tokens, corpus.offsets, np.full(count, domain_id, dtype=np.int64),
                            np.arange(count, dtype=np.int64), tokenizer.bos_id, tokenizer.eos_id)
