"""`python -m distill` end to end on the tiny preset: experts → OPD lowers the KL to every teacher;
24 teachers in one OPD run; configs and their errors (issue 8)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import validate
from distill.pipeline import check_matches_checkpoint, run
from distill.teachers import resolve_checkpoint, write_manifest
from model import V4Model
from tests.distill.helpers import CONFIGS, compose_job, make_teachers, save_model
from train.config import Config

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_short_opd_run_lowers_the_students_kl_to_every_teacher(tmp_path, base_run, small_job_overrides):
    run_dir = tmp_path / "distill"
    overrides = [o for o in small_job_overrides if not o.startswith("logging.wandb")]
    cmd = [sys.executable, "-m", "distill", *overrides, f"distill.base={base_run}", f"run.dir={run_dir}",
           # experts: 6 steps at a high LR from the (random-init) base give peaked, domain-specific teachers
           "distill.experts.max_steps=6", "optim.lr=1e-2", "optim.warmup_steps=1", "train.global_batch=4",
           "train.eval_batches=1",
           "distill.opd.steps=8", "distill.opd.rollout.prompts_per_teacher=2", "distill.opd.rollout.max_new_tokens=8",
           "distill.opd.eval_prompts=4", "distill.opd.eval_every=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    teachers = json.loads((run_dir / "experts" / "teachers.json").read_text())
    assert [(t["name"], t["domain"]) for t in teachers] == [("code", "code"), ("math", "math"), ("prose", "prose")]
    for t in teachers:
        assert Path(t["checkpoint"]).parent.parent == run_dir / "experts" / t["name"]
    summary = json.loads((run_dir / "summary.json").read_text())
    first, last = summary["opd"]["eval_kl_first"], summary["opd"]["eval_kl_last"]
    # measured on this setup: 0.69 -> 0.29 (code), 0.47 -> 0.21 (math), 0.62 -> 0.17 (prose)
    for name in ("code", "math", "prose"):
        assert first[name] > 0.1, first
        assert last[name] < 0.75 * first[name], (name, first, last)
    assert "before OPD" in proc.stdout and "after OPD" in proc.stdout  # the per-domain table is printed

    rows = read_jsonl(run_dir / "opd" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "kl", "kl/code", "kl/math", "kl/prose", "entropy", "sampled_logprob", "rollout_s",
                "rollout_tokens_per_s", "teacher_s", "teacher_tokens_per_s", "loss_s", "loss_tokens_per_s", "lr",
                "grad_norm"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    assert 0 < rows[0]["entropy"] <= math.log(512) + 1e-3 and rows[0]["sampled_logprob"] < 0
    evals = read_jsonl(run_dir / "opd" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert list((run_dir / "opd" / "wandb").glob("offline-run-*"))
    assert list((run_dir / "opd" / "checkpoints").glob("step_00000008/manifest.json"))
    for name in ("config.yaml", "env.json", "distill.log", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name


@pytest.mark.slow
def test_opd_with_24_teachers_on_the_tiny_preset(tmp_path, base_run, small_job_overrides, tokenizer_dir):
    specs = make_teachers(tmp_path / "teachers", 24, tokenizer_dir)
    write_manifest(tmp_path / "teachers.json", specs)
    job = compose_job(*small_job_overrides, f"distill.base={base_run}", f"run.dir={tmp_path / 'run'}",
                      "distill.stages=[opd]", f"distill.teachers.manifest={tmp_path / 'teachers.json'}",
                      "distill.teachers.group_size=8", "distill.opd.steps=2", "distill.opd.rollout.prompts_per_teacher=1",
                      "distill.opd.rollout.prompt_tokens=8", "distill.opd.rollout.max_new_tokens=4",
                      "distill.opd.eval_prompts=1")
    summary = run(job)
    rows = read_jsonl(tmp_path / "run" / "opd" / "metrics.jsonl")
    names = [s.name for s in specs]
    for row in rows:
        assert row["teacher_groups"] == 3  # 24 teachers brought in 8 at a time
        assert sorted(k[3:] for k in row if k.startswith("kl/")) == names
        assert all(row[f"kl/{n}"] > 0 for n in names)
    assert sorted(summary["opd"]["eval_kl_last"]) == names


def test_every_distill_option_composes_and_validates(base_run):
    for path in sorted((CONFIGS / "distill").glob("*.yaml")):
        job = compose_job(f"distill={path.stem}", f"distill.base={base_run}", "train.device=cpu")
        validate(job)


@pytest.mark.parametrize("overrides,fields", [
    (["distill.base=null"], ["distill.base"]),
    (["distill.stages=[opd]"], ["distill.teachers.manifest"]),
    (["distill.stages=[opd,experts]"], ["distill.stages"]),
    (["distill.opd.rollout.prompt_tokens=500"], ["distill.opd.rollout.prompt_tokens", "model.max_seq_len"]),
    (["distill.opd.loss.kind=topk"], ["distill.opd.loss.kind"]),
    (["distill.teachers.offload=gpu"], ["distill.teachers.offload"]),
    (["distill.opd.loss.impl=tilelang", "train.device=cpu"], ["distill.opd.loss.impl", "train.device"]),
])
def test_config_errors_name_the_fields(overrides, fields):
    job = compose_job("distill.base=some/run", *overrides)
    with pytest.raises(ValueError) as err:
        validate(job)
    for name in fields:
        assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_distill_key_is_rejected():
    with pytest.raises(Exception, match="no_such_field"):
        compose_job("distill.opd.no_such_field=1")


def test_a_base_trained_with_other_settings_is_refused(tmp_path, base_run, small_job_overrides, small_data,
                                                       tokenizer_dir):
    fingerprint = small_data.tokenizer.fingerprint
    base = resolve_checkpoint(str(base_run))
    with pytest.raises(ValueError, match=r"model\.dim=32 \(checkpoint: 64\)"):
        check_matches_checkpoint(compose_job(*small_job_overrides, "model.dim=32"), base, "base", fingerprint)
    other_data = [o for o in small_job_overrides if "embedded_math_problems" not in o]
    with pytest.raises(ValueError, match=r"data\.embedded_math_problems=3000 \(checkpoint: 400\)"):
        check_matches_checkpoint(compose_job(*other_data), base, "base", fingerprint)
    check_matches_checkpoint(compose_job(*small_job_overrides), base, "base", fingerprint)
    # an expert's checkpoint records a tokenizer directory: checked by fingerprint, not by data fields
    expert = compose_job(*small_job_overrides, "data.domains=[math]", f"data.tokenizer={tokenizer_dir}")
    path = save_model(tmp_path / "expert" / "checkpoints", V4Model(expert.model), Config(model=expert.model,
                                                                                        data=expert.data))
    check_matches_checkpoint(compose_job(*small_job_overrides), path, "student", fingerprint)
    with pytest.raises(ValueError, match="data tokenizer"):
        check_matches_checkpoint(compose_job(*small_job_overrides), path, "student", "0" * 32)


@pytest.mark.slow
def test_interrupted_opd_resumes_and_takes_the_same_steps(tmp_path, base_run, small_job_overrides, tokenizer_dir):
    specs = make_teachers(tmp_path / "teachers", 3, tokenizer_dir)
    write_manifest(tmp_path / "teachers.json", specs)
    run_dir = tmp_path / "run"
    overrides = [*small_job_overrides, f"distill.base={base_run}", f"run.dir={run_dir}", "distill.stages=[opd]",
                 f"distill.teachers.manifest={tmp_path / 'teachers.json'}", "distill.opd.steps=6",
                 "distill.opd.checkpoint_every=3", "distill.opd.rollout.prompts_per_teacher=2",
                 "distill.opd.rollout.prompt_tokens=8", "distill.opd.rollout.max_new_tokens=6",
                 "distill.opd.eval_prompts=2", "optim.lr=1e-2", "optim.warmup_steps=1"]
    straight = run(compose_job(*overrides))
    opd_dir = run_dir / "opd"
    rows = {r["step"]: r for r in read_jsonl(opd_dir / "metrics.jsonl")}

    # a crash after the step-3 checkpoint: the step-6 checkpoint and rows 4-6 never happened
    import shutil
    shutil.rmtree(opd_dir / "checkpoints" / "step_00000006")
    (opd_dir / "metrics.jsonl").write_text("".join(json.dumps(rows[s]) + "\n" for s in (1, 2, 3)))
    (opd_dir / "eval.jsonl").write_text(json.dumps(read_jsonl(opd_dir / "eval.jsonl")[0]) + "\n")
    (opd_dir / "summary.json").unlink()
    resumed = run(compose_job(*overrides, "run.resume=auto"))
    assert not list(run_dir.glob("opd.replaced-*"))          # continued in place, not restarted
    assert [r["step"] for r in read_jsonl(opd_dir / "eval.jsonl")] == [0, 6]     # no second step-0 eval
    again = {r["step"]: r for r in read_jsonl(opd_dir / "metrics.jsonl")}
    assert [r["step"] for r in read_jsonl(opd_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):      # same prompts, samples, teacher scores and updates: bitwise in fp32
        assert (again[step]["loss"], again[step]["kl"], again[step]["grad_norm"]) == \
            (rows[step]["loss"], rows[step]["kl"], rows[step]["grad_norm"]), step
    assert resumed["opd"]["eval_kl_last"] == straight["opd"]["eval_kl_last"]
    assert resumed["opd"]["eval_kl_first"] == straight["opd"]["eval_kl_first"]

    # a finished OPD stage is kept by run.resume=auto
    kept = run(compose_job(*overrides, "run.resume=auto"))
    assert kept["opd"]["eval_kl_last"] == straight["opd"]["eval_kl_last"]
    assert len(read_jsonl(opd_dir / "metrics.jsonl")) == 6


@pytest.mark.slow
def test_preempted_distill_job_continues_its_expert_with_resume_auto(tmp_path, base_run, small_job_overrides):
    import signal
    import time

    run_dir = tmp_path / "job"
    overrides = [o for o in small_job_overrides if not o.startswith("logging.wandb")]
    cmd = [sys.executable, "-m", "distill", *overrides, "logging.wandb=false", f"distill.base={base_run}",
           f"run.dir={run_dir}", "distill.experts.max_steps=30", "train.checkpoint_every=2",
           "train.global_batch=4", "train.eval_batches=1", "distill.opd.steps=2",
           "distill.opd.rollout.prompts_per_teacher=1", "distill.opd.rollout.max_new_tokens=4",
           "distill.opd.eval_prompts=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run_dir / "experts" / "code" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (
            first.exists() and len(first.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)            # pre-emption while the first expert trains
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = len(read_jsonl(first))
    assert stopped_at < 30 and "run.resume=auto" in err
    assert not (run_dir / "experts" / "math").exists() and not (run_dir / "summary.json").exists()

    proc = subprocess.run([*cmd, "run.resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(first)]
    assert steps == list(range(1, 31)), steps     # continued after step stopped_at, nothing redone
    assert json.loads((run_dir / "summary.json").read_text())["opd"]["steps"] == 2
