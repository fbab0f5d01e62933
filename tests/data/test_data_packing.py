"""Packing invariants: labels masked exactly at document boundaries, doc_ids restart per row, every
token of an epoch appears exactly once, and the document shuffle is a deterministic function of the seed."""

from collections import Counter

import numpy as np
import torch

from train.data import IGNORE_INDEX, pack_rows
from train.data.packing import PADDING_ORDINAL, epoch_order


def test_pack_rows_hand_example():
    # One row of T+1 = 9 tokens: the end of document 5, document 6 whole, the start of document 7.
    tokens = np.array([[11, 12, 1, 0, 21, 1, 0, 31, 32]])
    ordinals = np.array([[5, 5, 5, 6, 6, 6, 7, 7, 7]])
    domains = np.array([[2, 2, 2, 0, 0, 0, 1, 1, 1]])
    batch = pack_rows(tokens, ordinals, domains)
    assert batch["input_ids"].tolist() == [[11, 12, 1, 0, 21, 1, 0, 31]]
    assert batch["labels"].tolist() == [[12, 1, -100, 21, 1, -100, 31, 32]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
    assert batch["domain_ids"].tolist() == [[2, 2, 2, 0, 0, 0, 1, 1]]
    assert all(tensor.dtype == torch.int64 for tensor in batch.values())


def test_pack_rows_padding_is_never_a_label():
    tokens = np.array([[0, 7, 1, 2, 2]])
    ordinals = np.array([[3, 3, 3, PADDING_ORDINAL, PADDING_ORDINAL]])
    batch = pack_rows(tokens, ordinals, np.zeros_like(tokens))
    assert batch["labels"].tolist() == [[7, 1, -100, -100]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1]]


def _run_past_one_epoch(make_data, cfg, seq_len, global_batch):
    """Data, and its batches from the start to 10 batches into the second epoch, flattened as a stream."""
    data = make_data(cfg, seq_len=seq_len, global_batch=global_batch)
    num_batches = data.train.tokens_per_epoch // (global_batch * seq_len) + 10
    batches = [next(data.train) for _ in range(num_batches)]
    return data, batches, {key: torch.cat([batch[key].reshape(-1) for batch in batches]).numpy() for key in batches[0]}


def _documents(stream, bos):
    starts = np.flatnonzero(stream == bos)
    return [stream[start:end] for start, end in zip(starts, list(starts[1:]) + [len(stream)])]


def test_labels_masked_exactly_at_document_boundaries(small_cfg, make_data):
    data, batches, flat = _run_past_one_epoch(make_data, small_cfg(), seq_len=64, global_batch=8)
    bos = data.tokenizer.bos_id
    # Rows overlap by one token, so the input rows end to end are the stream, and the label at flat
    # position i is stream[i + 1] unless that token starts another document.
    stream, labels = flat["input_ids"], flat["labels"]
    assert np.array_equal(labels[:-1] == IGNORE_INDEX, stream[1:] == bos)
    kept = labels[:-1] != IGNORE_INDEX
    assert np.array_equal(labels[:-1][kept], stream[1:][kept])
    continued_rows = 0
    for batch in batches:
        input_ids, doc_ids = batch["input_ids"], batch["doc_ids"]
        assert (doc_ids[:, 0] == 0).all()
        assert torch.equal(doc_ids[:, 1:] - doc_ids[:, :-1], (input_ids[:, 1:] == bos).long())
        continued_rows += int((input_ids[:, 0] != bos).sum())
    assert continued_rows > 0, "no document was cut by a row boundary"


def test_every_token_of_an_epoch_exactly_once(small_cfg, make_data):
    data, _, flat = _run_past_one_epoch(make_data, small_cfg(), seq_len=64, global_batch=8)
    bos, eos = data.tokenizer.bos_id, data.tokenizer.eos_id
    stream = flat["input_ids"]
    epoch_length = data.train.tokens_per_epoch
    documents = _documents(stream[:epoch_length], bos)
    assert all(document[-1] == eos and eos not in document[1:-1] for document in documents)
    seen = Counter(tuple(document[1:-1].tolist()) for document in documents)
    expected = Counter(tuple(data.tokenizer.encode(text)) for domain in data.domains
                       for text in data.texts(domain, split="train"))
    assert seen == expected
    assert sum(stats.train_documents for stats in data.stats.values()) == len(documents)
    # The second epoch starts right after the first, in another document order.
    assert stream[epoch_length] == bos
    second_epoch = _documents(stream[epoch_length:], bos)[:-1]  # the last one may be cut
    assert len(second_epoch) >= 3
    assert [d.tolist() for d in second_epoch[:3]] != [d.tolist() for d in documents[:3]]


def test_domain_ids_follow_documents(small_data):
    batch = small_data.train.peek(3)
    for row in range(batch["input_ids"].shape[0]):
        for doc in batch["doc_ids"][row].unique():
            domains = batch["domain_ids"][row][batch["doc_ids"][row] == doc].unique()
            assert len(domains) == 1 and 0 <= int(domains[0]) < len(small_data.domains)


def test_epoch_order_is_deterministic():
    assert np.array_equal(epoch_order(1000, seed=7, epoch=0), epoch_order(1000, seed=7, epoch=0))
    assert not np.array_equal(epoch_order(1000, seed=7, epoch=0), epoch_order(1000, seed=8, epoch=0))
    assert not np.array_equal(epoch_order(1000, seed=7, epoch=0), epoch_order(1000, seed=7, epoch=1))
    assert sorted(epoch_order(1000, seed=7, epoch=3)) == list(range(1000))


def test_same_seed_same_batches_other_seed_differs(small_cfg, make_data):
    first = make_data(small_cfg()).train.peek(0)
    again = make_data(small_cfg()).train.peek(0)
    other = make_data(small_cfg(), seed=99).train.peek(0)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], other["input_ids"])
    pinned = make_data(small_cfg(seed=1234), seed=99).train.peek(0)  # data.seed overrides the run seed
    assert torch.equal(first["input_ids"], pinned["input_ids"])


def test_eval_batches_pack_held_out_documents(small_data):
    bos, pad = small_data.tokenizer.bos_id, small_data.tokenizer.pad_id
    for domain_id, domain in enumerate(small_data.domains):
        batches = small_data.eval_batches(domain)
        texts = small_data.texts(domain, split="eval")
        assert len(texts) >= 1 and batches
        stream = torch.cat([batch["input_ids"].reshape(-1) for batch in batches])
        assert int((stream == bos).sum()) == len(texts)
        assert all((batch["domain_ids"] == domain_id).all() for batch in batches)
        assert all(batch["input_ids"].shape == (4, 32) for batch in batches)
        # Rows of T+1 tokens overlapping by one cover all L eval tokens as labels; the inputs hold the first
        # min(L, rows*T) of them and padding after.
        eval_tokens, seq_len = small_data.stats[domain].eval_tokens, small_data.seq_len
        rows = -(-(eval_tokens - 1) // seq_len)
        assert int((stream != pad).sum()) == min(eval_tokens, rows * seq_len)
        assert int((torch.cat([b["labels"].reshape(-1) for b in batches]) != IGNORE_INDEX).sum()) == \
            eval_tokens - len(texts)
        # Held-out documents never appear in training.
        assert not set(texts) & set(small_data.texts(domain, split="train"))


def test_held_out_counts_per_domain():
    from train.data.corpus import held_out_documents

    sizes = [1, 2, 100, 10_000]
    domain_ids = np.repeat(np.arange(len(sizes)), sizes)
    hashes = np.random.default_rng(0).integers(0, 2**63, len(domain_ids)).astype(np.uint64)
    held_out = held_out_documents(domain_ids, hashes, len(sizes), eval_fraction=0.02, max_docs=50)
    assert [len(indices) for indices in held_out] == [0, 1, 2, 50]
    for domain, indices in enumerate(held_out):
        assert (domain_ids[indices] == domain).all()
        members = np.flatnonzero(domain_ids == domain)
        # The chosen documents are those with the smallest text hashes of their domain.
        assert set(indices) == set(members[np.argsort(hashes[members])[:len(indices)]])
    assert [len(i) for i in held_out_documents(domain_ids, hashes, len(sizes), 0.0, 50)] == [0, 0, 0, 0]


def test_held_out_set_does_not_depend_on_the_seed(small_cfg, make_data, small_data):
    other_seed = make_data(small_cfg(), seed=5)
    for domain in small_data.domains:
        assert other_seed.texts(domain, "eval") == small_data.texts(domain, "eval")
