"""Loader: bit-identical resume, data-parallel slices equal the single-process batch, resume under
another world size, look-ahead, and the same guarantees for a streaming source."""

import io

import pytest
import torch


def assert_batches_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys() == {"input_ids", "labels", "doc_ids", "domain_ids"}
    for key in expected:
        assert expected[key].dtype == actual[key].dtype == torch.int64, key
        assert torch.equal(expected[key], actual[key]), key


def concat_rows(slices: list[dict]) -> dict:
    return {key: torch.cat([piece[key] for piece in slices]) for key in slices[0]}


def checkpoint_roundtrip(state: dict) -> dict:
    """What a training checkpoint does with the state: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(params=[False, True], ids=["map", "streaming"])
def data_cfg(request, small_cfg):
    # A tiny corpus so the streaming run crosses epoch boundaries within the test.
    return small_cfg(streaming=request.param, embedded_math_problems=60, embedded_code_max_files=1,
                     embedded_code_max_chars=6_000, embedded_prose_max_chars=6_000, shuffle_buffer=16)


def test_resume_is_bit_identical(data_cfg, make_data):
    reference = make_data(data_cfg).train
    for _ in range(7):
        next(reference)
    state = checkpoint_roundtrip(reference.state_dict())
    expected = [next(reference) for _ in range(120)]
    assert reference.epoch >= 1  # the continuation crossed at least one epoch boundary

    resumed = make_data(data_cfg).train
    resumed.load_state_dict(state)
    assert resumed.step == 7
    for batch in expected:
        assert_batches_equal(batch, next(resumed))


def test_state_is_the_same_on_every_rank(data_cfg, make_data):
    loaders = [make_data(data_cfg, global_batch=4, dp_rank=rank, dp_size=2).train for rank in range(2)]
    for loader in loaders:
        for _ in range(5):
            next(loader)
    assert loaders[0].state_dict() == loaders[1].state_dict()


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_slices_concatenate_to_single_process_batch(data_cfg, make_data, dp_size):
    single = make_data(data_cfg, global_batch=4).train
    ranks = [make_data(data_cfg, global_batch=4, dp_rank=rank, dp_size=dp_size).train for rank in range(dp_size)]
    for _ in range(6):
        slices = [next(loader) for loader in ranks]
        assert all(piece["input_ids"].shape == (4 // dp_size, 32) for piece in slices)
        assert_batches_equal(next(single), concat_rows(slices))


@pytest.mark.parametrize(("saved_dp", "resumed_dp"), [(1, 2), (2, 4), (4, 1)])
def test_resume_under_another_world_size(data_cfg, make_data, saved_dp, resumed_dp):
    single = make_data(data_cfg, global_batch=4).train
    for _ in range(9):
        next(single)
    expected = [next(single) for _ in range(5)]

    saving = make_data(data_cfg, global_batch=4, dp_rank=0, dp_size=saved_dp).train
    for _ in range(9):
        next(saving)
    state = checkpoint_roundtrip(saving.state_dict())
    ranks = [make_data(data_cfg, global_batch=4, dp_rank=rank, dp_size=resumed_dp).train for rank in range(resumed_dp)]
    for loader in ranks:
        loader.load_state_dict(state)
    for batch in expected:
        assert_batches_equal(batch, concat_rows([next(loader) for loader in ranks]))


def test_peek_returns_future_batches_without_consuming(data_cfg, make_data):
    loader = make_data(data_cfg).train
    next(loader)
    ahead = [loader.peek(k) for k in range(4)]
    assert loader.step == 1
    for batch in ahead:
        assert_batches_equal(batch, next(loader))


def test_resume_with_another_global_batch_continues_at_the_same_token(small_cfg, make_data):
    loader = make_data(small_cfg(), global_batch=4).train
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    continuing = next(loader)
    doubled = make_data(small_cfg(), global_batch=8).train
    doubled.load_state_dict(state)
    assert_batches_equal(continuing, {key: value[:4] for key, value in next(doubled).items()})


def test_state_from_other_data_is_rejected(small_cfg, make_data):
    state = make_data(small_cfg()).train.state_dict()
    with pytest.raises(ValueError, match="loader state was saved for other data"):
        make_data(small_cfg(eval_fraction=0.1)).train.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with data seed 1234, this run uses 7"):
        make_data(small_cfg(), seed=7).train.load_state_dict(state)


def test_per_step_cost_is_array_indexing(small_cfg, make_data):
    # The whole epoch is tokenized up front: a batch is a gather from cached arrays, not tokenization.
    loader = make_data(small_cfg()).train
    assert loader.tokens_per_epoch > 0
    assert loader.source.stream.corpus_tokens.dtype.name == "uint32"


def test_streaming_shuffle_is_a_deterministic_permutation(tmp_path):
    import datasets

    from train.data.streaming import shuffled_rows

    for shard in range(3):
        (tmp_path / f"part-{shard}.jsonl").write_text("".join(
            f'{{"text": "document {shard}-{i}"}}\n' for i in range(40)), encoding="utf-8")
    documents = datasets.load_dataset("json", data_files=sorted(map(str, tmp_path.glob("*.jsonl"))), split="train",
                                      streaming=True, cache_dir=str(tmp_path / "hf"))
    assert documents.num_shards == 3
    order = [row["text"] for row in shuffled_rows(documents, seed=5, epoch=0, buffer_size=16)]
    assert sorted(order) == sorted(f"document {s}-{i}" for s in range(3) for i in range(40))
    assert order == [row["text"] for row in shuffled_rows(documents, seed=5, epoch=0, buffer_size=16)]
    assert order != [row["text"] for row in shuffled_rows(documents, seed=5, epoch=1, buffer_size=16)]
    assert order != [row["text"] for row in shuffled_rows(documents, seed=6, epoch=0, buffer_size=16)]
    assert order != [row["text"] for row in documents]
