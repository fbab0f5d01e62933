"""The Muon benchmark scripts still run (their CPU smoke modes: every code path, small shapes, no
timing claims); their numbers come from the GPU runs recorded in bench/NOTES.md."""

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


def test_muon_ranks_benchmark_smoke_shares_the_work_exactly(tmp_path):
    def torchrun(nproc, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29900 + os.getpid() % 90 + nproc), "bench/muon_ranks.py", "--smoke", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(1, "--out", str(tmp_path / "one.json"))
    torchrun(2, "--out", str(tmp_path / "two.json"), "--reference", str(tmp_path / "one.pt"))
    two = json.loads((tmp_path / "two.json").read_text())
    # on CPU (fp32 NS) each rank's share computes exactly what one rank computes
    assert two["ranks"] == 2 and two["params_max_abs_diff_vs_one_rank"] == 0.0
