"""Fixture `torchrun`: start a test worker under torchrun (gloo, CPU) and return rank 0's JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(worker: str, nproc: int, out_json: Path, *args: str, timeout: int = 240) -> dict:
    """Run tests/parallel/<worker> on `nproc` CPU ranks; the worker writes `out_json`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(Path(__file__).parent / worker), "--out", str(out_json), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out_json.read_text())


@pytest.fixture(scope="session")
def torchrun():
    """run_torchrun(worker, nproc, out_json, *args) -> dict."""
    return run_torchrun
