"""Resharding (issue 6): a checkpoint written under one layout resumes under another through its
universal form (`python -m train.universal`), and continues the run it came from; a different
layout without conversion is refused with the command to convert."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_checkpoint, save_checkpoint
from train.universal import FP32, UNIVERSAL

ROOT = Path(__file__).resolve().parents[2]
# fp32 on CPU; QAT off and Adam eps 1e-6 as in tests/parallel (FP4/FP8 rounding and Adam's
# normalisation of ~1e-9 mHC gradients turn reduction-order ulps into visible differences).
SMALL = ["model=tiny", "logging.progress=false", "logging.wandb=false", "data.embedded_math_problems=400",
         "data.embedded_code_max_files=8", "data.embedded_code_max_chars=120000",
         "data.embedded_prose_max_chars=120000", "train.seq_len=64", "train.global_batch=4",
         "train.micro_batch=1", "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=2",
         "optim.adam_eps=1e-6", "model.qat_fp8_kv=false", "model.qat_fp4_experts=false",
         "model.qat_fp4_indexer=false", "train.max_steps=8"]
HALF = "step_00000004"


def _run(tmp_path, nproc, *overrides, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29700 + os.getpid() % 200)] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "train", *SMALL, f"data.cache_dir={tmp_path / 'cache'}", *overrides],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _convert(ckpt: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "train.universal", str(ckpt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt.parent.parent / UNIVERSAL / ckpt.name


def _rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _worst_relative(straight: dict, resumed: dict, key: str) -> float:
    assert sorted(resumed) == [5, 6, 7, 8]
    return max(abs(resumed[s][key] - straight[s][key]) / abs(straight[s][key]) for s in resumed)


@pytest.mark.slow
def test_dp2_ep2_checkpoint_resumes_in_one_process_and_under_tp2(tmp_path):
    source = tmp_path / "dp2ep2"                      # 2 ranks: dense ZeRO-1 over 2, experts split in 2
    _run(tmp_path, 2, "parallel=ep2", "train.checkpoint_every=4", f"run.dir={source}")
    straight = _rows(source)

    refused = _run(tmp_path, 1, f"run.dir={source}", "run.resume=auto", check=False)
    assert refused.returncode != 0
    assert f"python -m train.universal {source / 'checkpoints' / 'step_00000008'}" in refused.stderr

    # run.reshard=true converts on the fly (rank 0, into <run>/universal/) and resumes
    automatic = tmp_path / "one_automatic"
    _run(tmp_path, 1, f"run.dir={automatic}", f"run.resume={source / 'checkpoints' / HALF}", "run.reshard=true")
    assert (source / UNIVERSAL / HALF / "manifest.json").is_file()

    universal = _convert(source / "checkpoints" / HALF)     # the same conversion through the command
    assert load_checkpoint(universal, parts=["trainer"])["_meta"]["layout"] == UNIVERSAL
    same = tmp_path / "same_layout"                   # the conversion itself is exact
    _run(tmp_path, 2, "parallel=ep2", f"run.dir={same}", f"run.resume={universal}")
    assert {s: r["loss"] for s, r in _rows(same).items()} == {s: r["loss"] for s, r in straight.items() if s > 4}

    one, tp2 = tmp_path / "one", tmp_path / "tp2"
    _run(tmp_path, 1, f"run.dir={one}", f"run.resume={universal}")
    _run(tmp_path, 2, "parallel=tp2", f"run.dir={tp2}", f"run.resume={universal}")
    errors = {name: (_worst_relative(straight, _rows(d), "loss"), _worst_relative(straight, _rows(d), "grad_norm"))
              for name, d in (("one", one), ("tp2", tp2))}
    print("resumed vs straight DP2xEP2, steps 5-8 (loss, grad norm; relative):", errors)
    # measured 1.1e-6 / 6.4e-7: another layout reduces in another order, and Muon's normalisation
    # of the ~zero-initialised mHC projections' small gradients amplifies those ulps
    for loss, grad_norm in errors.values():
        assert loss <= 1e-5 and grad_norm <= 1e-5
    assert {s: r["loss"] for s, r in _rows(automatic).items()} == {s: r["loss"] for s, r in _rows(one).items()}

    # the same resume without the optimizer state (momentum and Adam moments zeroed) is far off:
    # the comparison above sees the state
    ckpt = load_checkpoint(universal)
    for part in ckpt[UNIVERSAL]["files"].values():
        for key, value in ckpt[part].items():
            if key != FP32 and torch.is_tensor(value):
                value.zero_()
    wiped = save_checkpoint(tmp_path / "wiped", 4, {k: v for k, v in ckpt.items() if not k.startswith("_")},
                            meta=ckpt["_meta"])
    fresh = tmp_path / "fresh_state"
    _run(tmp_path, 1, f"run.dir={fresh}", f"run.resume={wiped}")
    wiped_error = _worst_relative(straight, _rows(fresh), "loss")
    print("the same resume with the optimizer state zeroed, loss error:", wiped_error)
    assert wiped_error > 100 * max(e[0] for e in errors.values())


@pytest.mark.slow
def test_tp2_ep2_checkpoint_resumes_under_dp2(tmp_path):
    source = tmp_path / "tp2ep2"                      # 4 ranks: tensor parallel 2 x data parallel 2, experts split in 2
    _run(tmp_path, 4, "parallel=tp2_ep2", "train.checkpoint_every=4", f"run.dir={source}")
    dp2 = tmp_path / "dp2"                            # two ranks; rank 0 converts (run.reshard)
    _run(tmp_path, 2, "parallel=dp2", f"run.dir={dp2}", f"run.resume={source / 'checkpoints' / HALF}",
         "run.reshard=true")
    loss, grad_norm = _worst_relative(_rows(source), _rows(dp2), "loss"), _worst_relative(_rows(source), _rows(dp2), "grad_norm")
    print(f"DP2 resumed from TP2xEP2 step 4, steps 5-8: loss {loss:.2e}, grad norm {grad_norm:.2e} (relative)")
    assert loss <= 1e-5 and grad_norm <= 1e-5


def test_one_process_checkpoint_round_trips_through_universal_bitwise(tmp_path):
    straight = tmp_path / "straight"
    _run(tmp_path, 1, "train.checkpoint_every=4", f"run.dir={straight}")
    universal = _convert(straight / "checkpoints" / HALF)
    resumed = tmp_path / "resumed"
    _run(tmp_path, 1, f"run.dir={resumed}", f"run.resume={universal}")
    expect = {s: r["loss"] for s, r in _rows(straight).items() if s > 4}
    assert {s: r["loss"] for s, r in _rows(resumed).items()} == expect
