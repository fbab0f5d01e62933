"""Shared fixtures: a small embedded corpus (a few hundred documents) and one cache per test session."""

import pytest

from train.data import DataConfig, build_data

SMALL_CORPUS = dict(embedded_math_problems=200, embedded_code_max_files=4, embedded_code_max_chars=40_000,
                    embedded_prose_max_chars=40_000)


@pytest.fixture(scope="session")
def small_corpus():
    """Embedded-corpus knobs of the small test corpus (~110k characters)."""
    return dict(SMALL_CORPUS)


@pytest.fixture(scope="session")
def run_args():
    """build_data's run arguments used throughout: tiny-model vocabulary, short rows, 4-row global batch."""
    return dict(vocab_size=512, seq_len=32, global_batch=4, seed=1234)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def hf_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="session")
def small_cfg(cache_dir, hf_cache_dir):
    """Factory of DataConfigs of the small embedded corpus sharing the session caches."""

    def make(**overrides) -> DataConfig:
        fields = dict(SMALL_CORPUS, cache_dir=cache_dir, hf_cache_dir=hf_cache_dir)
        fields.update(overrides)
        return DataConfig(**fields)

    return make


@pytest.fixture(scope="session")
def make_data(run_args):
    """build_data with the shared run arguments, any of them overridden by keyword."""

    def make(cfg: DataConfig, **overrides):
        return build_data(cfg, **{**run_args, **overrides})

    return make


@pytest.fixture(scope="session")
def small_data(small_cfg, make_data):
    """Read-only: the small embedded corpus built once (tests that consume batches build their own)."""
    return make_data(small_cfg())
