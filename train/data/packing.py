"""Packing documents into rows that keep document boundaries (issue: "Packing that keeps document
boundaries (the model needs them), deterministic shuffling").

The token stream. Each document becomes [bos] + tokens + [eos]; an epoch is every training document
once, in an order shuffled from (seed, epoch); epochs follow each other without a gap. Stream position
p is the p-th token of that endless stream.

Rows. Row k holds stream positions [k*T, k*T + T + 1) for seq_len T: consecutive rows overlap by one
token, so every token is an input exactly once and a label exactly once; nothing is dropped at an epoch
end (a row may span two epochs). A document longer than a row continues in the next row.

Batch tensors (`pack_rows`), all int64 [B, T]:
- input_ids = row[:-1];
- labels = row[1:], except -100 where the label token belongs to another document than the input
  token (the eos→bos step between documents) or is padding, so nothing is predicted across documents.
  The same holds for the model's MTP target labels[:, t+1]: both valid ⇒ all three tokens share a document;
- doc_ids: 0 at the row's first input token, +1 at every later token that starts a different document
  (a document cut by the row start is document 0 of the next row);
- domain_ids: domain id of the input token's document (ids index `Data.domains`).
"""

import numpy as np
import torch

IGNORE_INDEX = -100
PADDING_ORDINAL = -1
"""Document ordinal of eval padding tokens: never equal to a real document, and always label -100."""


def pack_rows(tokens: np.ndarray, ordinals: np.ndarray, domains: np.ndarray) -> dict[str, torch.Tensor]:
    """Batch tensors from rows of T+1 stream tokens.

    tokens, ordinals, domains: int [B, T+1]; `ordinals` identifies each token's document occurrence
    (any integer unique among neighbouring documents; PADDING_ORDINAL for padding).
    Returns input_ids, labels, doc_ids, domain_ids, each int64 [B, T].
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    ordinals = np.asarray(ordinals, dtype=np.int64)
    input_ids = tokens[:, :-1]
    labels = tokens[:, 1:].copy()
    same_document = ordinals[:, 1:] == ordinals[:, :-1]
    labels[~same_document | (ordinals[:, 1:] == PADDING_ORDINAL)] = IGNORE_INDEX
    input_ordinals = ordinals[:, :-1]
    starts = input_ordinals[:, 1:] != input_ordinals[:, :-1]
    doc_ids = np.zeros(input_ids.shape, dtype=np.int64)
    np.cumsum(starts, axis=1, out=doc_ids[:, 1:])
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(input_ids)),
        "labels": torch.from_numpy(labels),
        "doc_ids": torch.from_numpy(doc_ids),
        "domain_ids": torch.from_numpy(np.ascontiguousarray(np.asarray(domains, dtype=np.int64)[:, :-1])),
    }


def row_positions(first_position: int, first_row: int, num_rows: int, seq_len: int) -> np.ndarray:
    """Stream positions int64 [num_rows, seq_len+1] of rows first_row.. counted from `first_position`."""
    row_starts = first_position + (first_row + np.arange(num_rows, dtype=np.int64)) * seq_len
    return row_starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]


def epoch_order(num_documents: int, seed: int, epoch: int) -> np.ndarray:
    """Indices 0..num_documents-1 in the shuffled order of `epoch`; a pure function of its arguments."""
    return np.random.default_rng([seed, epoch]).permutation(num_documents)


class DocumentSequence:
    """Random access to the packed tokens of documents laid out in a given order.

    corpus_tokens: int [N] the documents' tokens (no bos/eos) concatenated; offsets: int64 [D+1];
    domain_ids: int64 [D]; order: int64 [K] document indices in stream order.
    """

    def __init__(self, corpus_tokens: np.ndarray, offsets: np.ndarray, domain_ids: np.ndarray, order: np.ndarray,
                 bos_id: int, eos_id: int):
        self.corpus_tokens = corpus_tokens
        self.offsets = offsets
        self.domain_ids = domain_ids
        self.order = order
        self.bos_id = bos_id
        self.eos_id = eos_id
        packed_lengths = np.diff(offsets)[order] + 2
        self.starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(packed_lengths, out=self.starts[1:])
        self.num_tokens = int(self.starts[-1])

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, rank in `order`, domain) at positions in [0, num_tokens), same shape as `positions`."""
        rank = np.searchsorted(self.starts, positions, side="right") - 1
        within = positions - self.starts[rank]
        document = self.order[rank]
        length = self.offsets[document + 1] - self.offsets[document]
        body_index = np.clip(self.offsets[document] + within - 1, 0, max(len(self.corpus_tokens) - 1, 0))
        body = self.corpus_tokens[body_index] if len(self.corpus_tokens) else np.zeros_like(positions)
        tokens = np.where(within == 0, self.bos_id, np.where(within == length + 1, self.eos_id, body))
        return tokens.astype(np.int64), rank, self.domain_ids[document]


class EpochStream:
    """The endless training stream: `DocumentSequence`s of successive shuffled epochs, end to end."""

    def __init__(self, corpus_tokens: np.ndarray, offsets: np.ndarray, domain_ids: np.ndarray,
                 documents: np.ndarray, seed: int, bos_id: int, eos_id: int):
        self.corpus_tokens = corpus_tokens
        self.offsets = offsets
        self.domain_ids = domain_ids
        self.documents = np.asarray(documents, dtype=np.int64)
        """Corpus indices of the training documents, in corpus order."""
        self.seed = seed
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.tokens_per_epoch = int((np.diff(offsets)[self.documents] + 2).sum())
        self._epochs: dict[int, DocumentSequence] = {}

    def epoch(self, epoch: int) -> DocumentSequence:
        """The documents of `epoch` in their shuffled order (the last two epochs are kept)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            order = self.documents[epoch_order(len(self.documents), self.seed, epoch)]
            self._epochs[epoch] = DocumentSequence(self.corpus_tokens, self.offsets, self.domain_ids, order,
                                                   self.bos_id, self.eos_id)
        return self._epochs[epoch]

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document ordinal, domain) at stream positions; ordinal = epoch * D + rank in the epoch."""
        tokens = np.empty(positions.shape, dtype=np.int64)
        ordinals = np.empty(positions.shape, dtype=np.int64)
        domains = np.empty(positions.shape, dtype=np.int64)
        epochs = positions // self.tokens_per_epoch
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            epoch_tokens, rank, epoch_domains = self.epoch(int(epoch)).gather(
                positions[selected] - int(epoch) * self.tokens_per_epoch)
            tokens[selected] = epoch_tokens
            ordinals[selected] = int(epoch) * len(self.documents) + rank
            domains[selected] = epoch_domains
        return tokens, ordinals, domains


def pack_sequence(sequence: DocumentSequence, seq_len: int, rows_per_batch: int,
                  pad_id: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All rows of one finite sequence (eval sets), grouped into batches of `rows_per_batch` rows.

    The rows after the last token are padding (pad_id, PADDING_ORDINAL, label -100), so every batch is full.
    """
    num_rows = max(1, -(-(sequence.num_tokens - 1) // seq_len))
    num_batches = -(-num_rows // rows_per_batch)
    positions = row_positions(0, 0, num_batches * rows_per_batch, seq_len)
    is_real_row = (np.arange(len(positions)) < num_rows)[:, None]
    inside = (positions < sequence.num_tokens) & is_real_row
    tokens, rank, domains = sequence.gather(np.minimum(positions, sequence.num_tokens - 1))
    tokens = np.where(inside, tokens, pad_id)
    ordinals = np.where(inside, rank, PADDING_ORDINAL)
    # Padding keeps its row's domain so per-domain reductions never meet an invalid id.
    domains = np.where(inside, domains, domains[:, :1])
    return [(tokens[b:b + rows_per_batch], ordinals[b:b + rows_per_batch], domains[b:b + rows_per_batch])
            for b in range(0, len(tokens), rows_per_batch)]
