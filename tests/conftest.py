"""Shared test settings: deterministic, single-threaded-friendly torch on CPU."""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    # OMP_NUM_THREADS when set (make test sets 1: tiny models are dispatch-bound), else 1.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    yield
