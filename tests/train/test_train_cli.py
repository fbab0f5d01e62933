"""`python -m train` end to end on the tiny preset (issue: pretraining from a fresh clone)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL_DATA = ["data.embedded_math_problems=400", "data.embedded_code_max_files=8",
              "data.embedded_code_max_chars=120000", "data.embedded_prose_max_chars=120000"]


def run_train(tmp_path, *overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "train", "model=tiny", "logging.progress=false",
           f"data.cache_dir={tmp_path / 'cache'}", *SMALL_DATA, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_five_steps_write_the_run_directory_and_learn_a_fixed_batch(tmp_path):
    run_dir = tmp_path / "run"
    run_train(tmp_path, "train.max_steps=5", f"run.dir={run_dir}", "train.overfit_batches=1",
              "train.global_batch=4", "train.micro_batch=2", "train.eval_batches=1", "optim.lr=1e-2",
              "optim.warmup_steps=1")
    for name in ("config.yaml", "env.json", "metrics.jsonl", "eval.jsonl", "train.log", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step_00000005/manifest.json"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
            assert key in r and math.isfinite(r[key]), key
    losses = [r["lm_loss"] for r in rows]
    assert abs(losses[0] - math.log(512)) < 0.1
    assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and "git_commit" in env
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and set(summary["eval"]) == {"code_loss", "math_loss", "prose_loss"}

    # the run's tokenizer travels with it: the BPE it trained, loadable without the data
    from train.data.tokenizer import load_tokenizer_dir
    saved = load_tokenizer_dir(run_dir / "tokenizer")
    text = "def f(x):\n    return 2 * x + 1"
    assert saved.decode(saved.encode(text)) == text
    assert saved.fingerprint == summary["tokenizer_fingerprint"]


@pytest.mark.slow
def test_bad_input_gives_one_line_errors_and_keeps_earlier_runs(tmp_path):
    run_dir = tmp_path / "run"
    run_train(tmp_path, "train.max_steps=1", f"run.dir={run_dir}", "train.global_batch=2",
              "train.micro_batch=2", "train.eval_batches=1")
    before = (run_dir / "metrics.jsonl").read_text()

    again = run_train(tmp_path, "train.max_steps=1", f"run.dir={run_dir}", check=False)
    assert again.returncode != 0
    assert "already holds a run" in again.stderr and "run.resume=auto" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before

    missing = run_train(tmp_path, "train.max_steps=1", f"run.dir={tmp_path / 'r2'}",
                        f"data.source={tmp_path / 'nope.jsonl'}", check=False)
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr
    assert len([l for l in missing.stderr.splitlines() if l.startswith("error:")]) == 1

    unknown = run_train(tmp_path, "train.no_such_key=1", check=False)
    assert unknown.returncode != 0 and "no_such_key" in unknown.stderr

    batch = run_train(tmp_path, f"run.dir={tmp_path / 'r3'}", "train.global_batch=3", "train.micro_batch=2",
                      check=False)
    assert batch.returncode != 0 and "train.global_batch" in batch.stderr
    assert not (tmp_path / "r3" / "metrics.jsonl").exists()
