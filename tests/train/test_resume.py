"""Exact resume, pre-emption, crash-safe and verified checkpoints, spikes with rollback and
anticipatory routing (issue: resume & spikes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checkpoint import latest_valid_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model=tiny", "logging.progress=false", "data.embedded_math_problems=400",
         "data.embedded_code_max_files=8", "data.embedded_code_max_chars=120000",
         "data.embedded_prose_max_chars=120000", "train.seq_len=64", "train.global_batch=2",
         "train.micro_batch=2", "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=2"]


def _cmd(tmp_path, *overrides):
    return [sys.executable, "-m", "train", *SMALL, f"data.cache_dir={tmp_path / 'cache'}", *overrides]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")


def _run(tmp_path, *overrides):
    proc = subprocess.run(_cmd(tmp_path, *overrides), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _rows(run_dir)}


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_straight_run_bitwise(tmp_path):
    straight = tmp_path / "straight"
    _run(tmp_path, "train.max_steps=20", f"run.dir={straight}", "logging.wandb=false")

    broken = tmp_path / "broken"
    proc = subprocess.Popen(_cmd(tmp_path, "train.max_steps=20", f"run.dir={broken}", "logging.wandb=false",
                                 "train.checkpoint_every=100"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        metrics = broken / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)                   # pre-emption: finish the step, save, exit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = list_checkpoints(broken / "checkpoints")
    stopped_at = len(_rows(broken))
    assert stopped_at < 20 and saved and saved[-1].name == f"step_{stopped_at:08d}"   # no finished step lost

    _run(tmp_path, "train.max_steps=20", f"run.dir={broken}", "logging.wandb=false", "run.resume=auto")
    resumed = _losses(broken)
    expect = _losses(straight)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == expect, [(s, resumed[s], expect[s]) for s in expect if resumed[s] != expect[s]][:3]


def test_crash_mid_save_and_corruption_fall_back_to_an_earlier_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"model": {"w": [1.0]}})
    save_checkpoint(root, 2, {"model": {"w": [2.0]}})
    # kill -9 in the middle of saving step 3: the process dies after writing part of a file
    script = (
        "import os, torch, sys\n"
        "from pathlib import Path\n"
        "from train.checkpoint import save_checkpoint\n"
        "real = torch.save\n"
        "def dying_save(obj, path):\n"
        "    real(obj, path)\n"
        "    os.kill(os.getpid(), 9)\n"
        "torch.save = dying_save\n"
        "save_checkpoint(Path(sys.argv[1]), 3, {'model': {'w': [3.0]}, 'optimizer': {}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(root)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000002"]
    assert latest_valid_checkpoint(root).name == "step_00000002"
    # a corrupted file (same size, flipped bytes) fails its checksum and is skipped
    model_file = root / "step_00000002" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-20] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(root / "step_00000002")
    assert latest_valid_checkpoint(root).name == "step_00000001"
    # a truncated file is caught by its size
    (root / "step_00000001" / "model.pt").write_bytes(b"x")
    assert "truncated" in verify_checkpoint(root / "step_00000001")
    assert latest_valid_checkpoint(root) is None


@pytest.mark.slow
def test_resume_auto_skips_a_corrupted_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _run(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", f"run.dir={run_dir}", "logging.wandb=false")
    newest = run_dir / "checkpoints" / "step_00000004" / "rank00000.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    proc = _run(tmp_path, "train.max_steps=6", f"run.dir={run_dir}", "logging.wandb=false", "run.resume=auto")
    assert "skipping checkpoint" in proc.stderr and "step_00000004" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr


@pytest.mark.slow
def test_injected_spike_is_detected_rolled_back_and_recovered_with_anticipatory_routing(tmp_path):
    run_dir = tmp_path / "run"
    _run(tmp_path, "train.max_steps=40", "train.checkpoint_every=10", f"run.dir={run_dir}",
         "optim.lr=3e-3", "train.spikes.min_history=8", "train.spikes.inject_step=25",
         "train.spikes.inject_kind=lr", "train.spikes.inject_scale=300", "train.spikes.anticipatory_steps=8",
         "train.spikes.lookahead=2")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert "loss_spike" in kinds and "rollback" in kinds and "anticipatory_routing_on" in kinds, kinds
    assert "anticipatory_routing_off" in kinds
    spike = events[kinds.index("loss_spike")]
    rollback = events[kinds.index("rollback")]
    assert spike["step"] == 26 and spike["severe"] and rollback["to_step"] == 20
    rows = _rows(run_dir)
    ar_rows = [r for r in rows if r["anticipatory_routing"]]
    assert len(ar_rows) == 8 and all(r["anticipatory_routing_s"] > 0 for r in ar_rows)
    final = [r for r in rows if r["step"] == 40][-1]
    before = [r for r in rows if r["step"] == 25][0]
    assert final["lm_loss"] < before["lm_loss"] + 0.05           # recovered
    wandb_files = list((run_dir / "wandb").rglob("*.wandb"))
    assert wandb_files and any(b"loss_spike" in f.read_bytes() for f in wandb_files)
    assert any(b"moe/expert_load_heatmap" in f.read_bytes() for f in wandb_files)
    assert any(b"mhc/sinkhorn_row_error/0" in f.read_bytes() for f in wandb_files)
    report = subprocess.run([sys.executable, "-m", "train.report", str(run_dir)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    html = (run_dir / "report" / "report.html").read_text()
    assert "loss_spike" in html and "rollback" in html and (run_dir / "report" / "report.png").stat().st_size > 10_000
