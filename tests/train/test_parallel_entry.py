"""`torchrun -m train parallel=...` drives the megatron-core + DeepSpeed engine through the same
loop: parity with one process, and exact resume after a pre-emption under DP2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model=tiny", "logging.progress=false", "logging.wandb=false", "data.embedded_math_problems=400",
         "data.embedded_code_max_files=8", "data.embedded_code_max_chars=120000",
         "data.embedded_prose_max_chars=120000", "train.seq_len=64", "train.global_batch=4",
         "train.micro_batch=2", "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=2"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _cmd(tmp_path, nproc, *overrides):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "train", *SMALL, f"data.cache_dir={tmp_path / 'cache'}", *overrides]


def _run(tmp_path, nproc, *overrides):
    proc = subprocess.run(_cmd(tmp_path, nproc, *overrides), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dp2_matches_one_process_and_resumes_exactly_after_preemption(tmp_path):
    single, straight, broken = tmp_path / "single", tmp_path / "dp2", tmp_path / "dp2_broken"
    # QAT off for the parity half: FP4/FP8 rounding turns the 1-ulp differences of a reordered
    # all-reduce into 1e-5 loss differences after ~8 steps (measured 3.5e-6 relative at step 8).
    exact = ["model.qat_fp8_kv=false", "model.qat_fp4_experts=false", "model.qat_fp4_indexer=false"]
    _run(tmp_path, 1, "train.max_steps=12", f"run.dir={single}", *exact)
    _run(tmp_path, 2, "parallel=dp2", "train.max_steps=12", f"run.dir={straight}", *exact)
    one, two = _rows(single), _rows(straight)
    errors = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two)]
    print("DP2 vs one process, relative loss error per step:", errors)
    assert len(two) == 12 and max(errors) <= 1e-5, errors
    assert all(abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"] for a, b in zip(one, two))
    straight = tmp_path / "dp2_qat"
    _run(tmp_path, 2, "parallel=dp2", "train.max_steps=12", f"run.dir={straight}")
    two = _rows(straight)

    # pre-emption: SIGTERM to every process of the job (what SLURM does), then resume=auto
    proc = subprocess.Popen(_cmd(tmp_path, 2, "parallel=dp2", "train.max_steps=12", f"run.dir={broken}",
                                 "train.checkpoint_every=100"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        m = broken / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    stopped = len(_rows(broken))
    assert stopped < 12 and (broken / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").exists()
    _run(tmp_path, 2, "parallel=dp2", "train.max_steps=12", f"run.dir={broken}", "run.resume=auto")
    resumed = {r["step"]: r["loss"] for r in _rows(broken)}
    assert resumed == {r["step"]: r["loss"] for r in two}     # bitwise, step by step


@pytest.mark.slow
def test_tp2_ep2_checkpoint_loads_into_the_single_device_model(tmp_path):
    import torch
    from model import ModelArgs, V4Model

    run_dir = tmp_path / "tp2ep2"
    _run(tmp_path, 4, "parallel=tp2_ep2", "train.max_steps=2", f"run.dir={run_dir}")
    weights = torch.load(run_dir / "checkpoints" / "step_00000002" / "model.pt")
    model = V4Model(ModelArgs.preset("tiny"))
    model.load_state_dict(weights, strict=True)          # unsharded, single-device names
    rows = _rows(run_dir)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
