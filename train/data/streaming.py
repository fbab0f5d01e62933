"""The training token stream of a streaming source (`DataConfig.streaming`), read lazily.

Same stream layout as `packing.py` (documents as [bos] + tokens + [eos], epochs end to end), but the
documents come from a `datasets.IterableDataset`: each epoch reads its shards (files) in an order drawn
from (seed, epoch), passes the rows through a shuffle buffer driven by the same generator, skips
held-out documents (stable text hash, `corpus.is_held_out_by_hash`) and is tokenized a chunk of
documents at a time. Only the tokens between the oldest unconsumed row and the furthest row asked for
are kept.

The shuffle is ours rather than `IterableDataset.shuffle`: that one interleaves shards through a thread
pool which, for parquet sources, sleeps 5 s whenever an iterator shuts down (datasets
`CyclingMultiSourcesExamplesIterable`, working around apache/arrow#45214), i.e. at every epoch end and
every resume.

Resuming: the stream position of the next row maps to (epoch, index of its document within the epoch's
training documents, token offset inside that document). `seek` re-opens that epoch and skips `index`
documents without tokenizing them, so the continuation is bit-identical to an uninterrupted run.
"""

import itertools
from typing import Iterator, Optional

import datasets
import numpy as np

from .corpus import is_held_out_by_hash
from .sources import domain_label
from .tokenizer import TextTokenizer

_TOKENIZE_CHUNK_DOCS = 256
_RANDOM_DRAWS_PER_CALL = 4096
# Document ordinals are epoch * _EPOCH_STRIDE + index; any stride above the documents of one epoch works.
_EPOCH_STRIDE = 1 << 40


class StreamingSource:
    """Stream positions → (tokens, document ordinal, domain), for positions at or after the last release."""

    def __init__(self, documents: datasets.IterableDataset, tokenizer: TextTokenizer, domain_index: dict[str, int],
                 seed: int, shuffle_buffer: int, eval_fraction: float, probe_docs: int):
        self.documents = documents
        self.tokenizer = tokenizer
        self.domain_index = domain_index
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.eval_fraction = eval_fraction
        self.probe_docs = probe_docs
        self.seek(0, None)

    # ----------------------------------------------------------------------------------- positioning

    def seek(self, position: int, resume: Optional[dict]) -> None:
        """Continue at stream `position`; `resume` is what `resume_point(position)` returned (None at 0)."""
        if resume is None:
            if position != 0:
                raise ValueError("loader state of a streaming source lacks its 'resume' entry; pass the state "
                                 "saved by PackedLoader.state_dict() unchanged")
            epoch, index, offset = 0, 0, 0
        else:
            epoch, index, offset = int(resume["epoch"]), int(resume["document"]), int(resume["offset"])
        self._epoch = epoch
        self._next_index = index
        self._texts = self._training_documents(epoch)
        for _ in range(index):
            if next(self._texts, None) is None:
                raise ValueError(f"loader state points at document {index} of epoch {epoch}, but that epoch of "
                                 f"data.source has fewer training documents; resume with the same data")
        # Buffer: tokens from stream position _buffer_start on, with each token's document ordinal and
        # domain, and one entry per buffered document for resume points.
        self._buffer_start = position - offset
        self._tokens = np.zeros(0, dtype=np.int64)
        self._ordinals = np.zeros(0, dtype=np.int64)
        self._domains = np.zeros(0, dtype=np.int64)
        self._doc_starts: list[int] = []
        self._doc_keys: list[tuple[int, int]] = []

    def resume_point(self, position: int) -> dict:
        """{"epoch", "document", "offset"} of the document holding stream `position`."""
        self._extend_to(position + 1)
        which = int(np.searchsorted(self._doc_starts, position, side="right")) - 1
        epoch, index = self._doc_keys[which]
        return {"epoch": epoch, "document": index, "offset": position - self._doc_starts[which]}

    def epoch_at(self, position: int) -> int:
        return self.resume_point(position)["epoch"]

    def release(self, position: int) -> None:
        """Forget buffered documents that end at or before `position`."""
        keep_from = int(np.searchsorted(self._doc_starts, position, side="right")) - 1
        if keep_from <= 0:
            return
        cut = self._doc_starts[keep_from] - self._buffer_start
        self._tokens, self._ordinals, self._domains = self._tokens[cut:], self._ordinals[cut:], self._domains[cut:]
        self._buffer_start = self._doc_starts[keep_from]
        del self._doc_starts[:keep_from], self._doc_keys[:keep_from]

    # -------------------------------------------------------------------------------------- reading

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, ordinals, domains) int64 at `positions` (any shape)."""
        if positions.size == 0:
            empty = np.zeros(positions.shape, dtype=np.int64)
            return empty, empty, empty
        if positions.min() < self._buffer_start:
            raise RuntimeError("streaming source asked for released stream positions; the loader only moves forward")
        self._extend_to(int(positions.max()) + 1)
        index = positions - self._buffer_start
        return self._tokens[index], self._ordinals[index], self._domains[index]

    def _extend_to(self, end: int) -> None:
        while self._buffer_start + len(self._tokens) < end:
            self._append_chunk()

    def _append_chunk(self) -> None:
        texts, domains, keys = [], [], []
        while len(texts) < _TOKENIZE_CHUNK_DOCS:
            document = next(self._texts, None)
            if document is None:
                if texts:
                    break
                if self._next_index == 0:
                    raise RuntimeError(f"data.source yielded no training document in epoch {self._epoch}; check "
                                       f"data.source, data.domains and data.eval_fraction")
                self._epoch += 1
                self._next_index = 0
                self._texts = self._training_documents(self._epoch)
                continue
            text, domain = document
            texts.append(text)
            domains.append(domain)
            keys.append((self._epoch, self._next_index))
            self._next_index += 1
        encoded = self.tokenizer.encode_batch(texts)
        pieces, ordinal_pieces, domain_pieces = [self._tokens], [self._ordinals], [self._domains]
        position = self._buffer_start + len(self._tokens)
        for ids, domain, key in zip(encoded, domains, keys):
            packed = np.empty(len(ids) + 2, dtype=np.int64)
            packed[0], packed[1:-1], packed[-1] = self.tokenizer.bos_id, ids, self.tokenizer.eos_id
            pieces.append(packed)
            ordinal_pieces.append(np.full(len(packed), key[0] * _EPOCH_STRIDE + key[1], dtype=np.int64))
            domain_pieces.append(np.full(len(packed), domain, dtype=np.int64))
            self._doc_starts.append(position)
            self._doc_keys.append(key)
            position += len(packed)
        self._tokens = np.concatenate(pieces)
        self._ordinals = np.concatenate(ordinal_pieces)
        self._domains = np.concatenate(domain_pieces)

    def _training_documents(self, epoch: int) -> Iterator[tuple[str, int]]:
        """(text, domain id) of the epoch's training documents, in the epoch's shuffled order."""
        for row in shuffled_rows(self.documents, self.seed, epoch, self.shuffle_buffer):
            if is_held_out_by_hash(row["text"], self.eval_fraction):
                continue
            domain = self.domain_index.get(domain_label(row["domain"]))
            if domain is None:
                raise RuntimeError(f"data: domain {domain_label(row['domain'])!r} first appears after the first "
                                   f"{self.probe_docs} documents of the stream; list every domain in data.domains or "
                                   f"raise data.stream_probe_docs")
            yield row["text"], domain


def shuffled_rows(documents: datasets.IterableDataset, seed: int, epoch: int, buffer_size: int) -> Iterator[dict]:
    """Rows of `documents` in the order of `epoch`: shards permuted, then a buffer shuffle of `buffer_size`.

    A pure function of (documents, seed, epoch, buffer_size); every row comes out exactly once.
    """
    generator = np.random.default_rng([seed, epoch])
    num_shards = documents.num_shards
    if num_shards > 1:
        rows = itertools.chain.from_iterable(documents.shard(num_shards, int(index))
                                             for index in generator.permutation(num_shards))
    else:
        rows = iter(documents)
    buffer: list[dict] = []
    draws = iter(())
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        slot = next(draws, None)
        if slot is None:
            draws = iter(generator.integers(0, buffer_size, _RANDOM_DRAWS_PER_CALL).tolist())
            slot = next(draws)
        yield buffer[slot]
        buffer[slot] = row
    generator.shuffle(buffer)
    yield from buffer
