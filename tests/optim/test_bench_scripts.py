"""The Muon benchmark script still runs (its CPU smoke mode: every code path, small shapes, no timing
claims); its numbers come from the GPU runs recorded in bench/NOTES.md. (bench/muon_ranks.py's
sharing is what tests/optim/test_distributed.py checks on gloo ranks.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def test_muon_benchmark_smoke(tmp_path):
    out = tmp_path / "muon.json"
    proc = subprocess.run([sys.executable, "bench/muon.py", "--smoke", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())
