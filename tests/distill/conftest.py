"""Session fixtures of the distillation tests: one data cache, the small corpus, its tokenizer, a base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model import V4Model
from tests.distill.helpers import SMALL_DATA, compose_job, save_model
from train.config import Config


@pytest.fixture(autouse=True)
def _threads_from_environment():
    """OMP_NUM_THREADS threads (1 unset), overriding tests/conftest.py's 2: the tiny models are
    dispatch-bound, and on a shared 2-core machine a second thread only adds barrier waits
    (measured: a 1x12-token tiny forward 0.10 s with 1 thread, 2.9 s with 2 under load)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    yield


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache (tokenizer, tokenized corpus) for every test of the session."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def small_job_overrides(data_cache):
    return ["model=tiny", "logging.progress=false", "logging.wandb=false", f"data.cache_dir={data_cache}",
            *SMALL_DATA]


@pytest.fixture(scope="session")
def small_data(small_job_overrides):
    """The embedded corpus with the small knobs (its BPE tokenizer, its prompts)."""
    from train.data import build_data

    job = compose_job(*small_job_overrides)
    return build_data(job.data, vocab_size=job.model.vocab_size, seq_len=64, global_batch=2, seed=0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_data) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    small_data.tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, small_job_overrides) -> Path:
    """A 'pretrained' base: the tiny preset at its seed-0 init, saved as a run directory whose
    checkpoint records the small-data config (so the distill job's tokenizer check passes)."""
    root = tmp_path_factory.mktemp("base")
    job = compose_job(*small_job_overrides)
    torch.manual_seed(0)
    save_model(root / "checkpoints", V4Model(job.model), Config(model=job.model, data=job.data))
    return root
