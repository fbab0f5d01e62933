"""`distill.pipeline.run`: the whole distillation job — experts, then OPD — into one run directory.

Layout: config.yaml, env.json, distill.log, tokenizer/ (the student's tokenizer, shared by every
expert), experts/<name>/ (one training run per expert) and experts/teachers.json, opd/
(metrics.jsonl, eval.jsonl, checkpoints/, wandb/, summary.json), summary.json.

The job's model and data configs must describe the base checkpoint (the fields that decide the
tokenizer included), or the student's tokenizer would differ from the one the base learned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import List, Optional

from distill.config import DistillJobConfig, validate
from distill.experts import StageStopped, train_experts
from distill.opd import run_opd
from distill.rollout import PromptSets
from distill.summary import print_summary
from distill.teachers import TeacherPool, checkpoint_config, read_manifest, resolve_checkpoint
from model import V4Model
from train.checkpoint import checkpoint_step, latest_valid_checkpoint, load_checkpoint
from train.data import build_data
from train.data.config import BPE_TOKENIZER
from train.data.tokenizer import load_tokenizer_dir
from train.rundir import default_run_dir, prepare_run_dir, write_run_record

log = logging.getLogger("distill")

# DataConfig fields that decide which tokenizer `build_data` builds.
TOKENIZER_FIELDS = ("source", "subset", "split", "text_field", "domain_field", "domains", "text_unit", "tokenizer",
                    "tokenizer_vocab_size", "tokenizer_min_frequency", "tokenizer_train_max_chars", "embedded_seed",
                    "embedded_math_problems", "embedded_code_max_files", "embedded_code_max_chars",
                    "embedded_code_max_file_chars", "embedded_prose_max_chars", "streaming", "stream_probe_docs")


def setup_logging(run_dir: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(run_dir / "distill.log"), logging.StreamHandler()], force=True)


def config_mismatches(ours: dict, theirs: dict, fields, prefix: str) -> List[str]:
    return [f"{prefix}.{name}={ours.get(name)!r} (checkpoint: {theirs.get(name)!r})" for name in fields
            if name in theirs and ours.get(name) != theirs.get(name)]


def check_matches_checkpoint(job: DistillJobConfig, path: Path, role: str, tokenizer_fingerprint: str) -> None:
    """The job's model config equals the checkpoint run's, and so does its tokenizer: by fingerprint
    when that run read a tokenizer directory (an expert), else by the data fields that decide it."""
    recorded = checkpoint_config(path)
    if not recorded:
        log.warning("%s checkpoint %s records no config; cannot check model and tokenizer settings", role, path)
        return
    model = dataclasses.asdict(job.model)
    diffs = config_mismatches(model, recorded.get("model", {}), list(model), "model")
    recorded_data = recorded.get("data", {})
    tokenizer = recorded_data.get("tokenizer")
    if tokenizer not in (None, BPE_TOKENIZER):
        directory = Path(tokenizer).expanduser()
        if not (directory / "tokenizer.json").is_file():
            log.warning("%s checkpoint %s was trained with tokenizer %s, which no longer exists; cannot check it",
                        role, path, directory)
        elif load_tokenizer_dir(directory).fingerprint != tokenizer_fingerprint:
            diffs.append(f"data tokenizer {tokenizer_fingerprint[:12]} (checkpoint: {directory})")
    else:
        diffs += config_mismatches(dataclasses.asdict(job.data), recorded_data, TOKENIZER_FIELDS, "data")
    if diffs:
        raise ValueError(f"distill.{role}={path} was trained with other settings: {'; '.join(diffs[:4])}; pass the "
                         f"same model and data settings as its run")


def build_student(job: DistillJobConfig, checkpoint: Path, device) -> V4Model:
    """The student on `device` with the weights of the verified checkpoint `checkpoint`, in training mode."""
    from train.loop import load_model_weights

    student = V4Model(job.model).to(device)
    load_model_weights(student, load_checkpoint(checkpoint, parts=["model"], verify=False)["model"],
                       f"student checkpoint {checkpoint}")
    return student.train()


def run(job: DistillJobConfig) -> dict:
    """Run the configured stages; returns the job summary (also written to summary.json)."""
    from train.context import pick_device
    from train.loop import run as run_training

    validate(job)
    d = job.distill
    device = pick_device(job.train.device)
    # bad paths and settings fail before the run directory is written
    base: Optional[Path] = resolve_checkpoint(d.base) if d.base else None
    student_checkpoint = resolve_checkpoint(d.student or d.base) if "opd" in d.stages else None
    if "experts" not in d.stages and not Path(d.teachers.manifest).expanduser().is_file():
        raise ValueError(f"distill.teachers.manifest={d.teachers.manifest} does not exist; run the expert stage or "
                         "point it at a teachers.json")
    data = build_data(job.data, vocab_size=job.model.vocab_size, seq_len=job.train.seq_len,
                      global_batch=job.train.micro_batch, seed=job.run.seed)
    for role, path in (("base", base), ("student", student_checkpoint if d.student else None)):
        if path is not None:
            check_matches_checkpoint(job, path, role, data.tokenizer.fingerprint)

    run_dir = Path(job.run.dir) if job.run.dir else default_run_dir(job.run.name)
    job.run.dir = str(run_dir)
    run_dir = prepare_run_dir(run_dir, job.run.resume, job.run.overwrite)
    setup_logging(run_dir)
    write_run_record(run_dir, job)
    log.info("distillation run directory %s, stages %s", run_dir, list(d.stages))
    log.info("%s", data.summary())
    tokenizer_dir = run_dir / "tokenizer"
    data.tokenizer.save(tokenizer_dir)
    summary: dict = {"run_dir": str(run_dir), "stages": list(d.stages)}

    manifest = Path(d.teachers.manifest).expanduser() if d.teachers.manifest else run_dir / "experts" / "teachers.json"
    if "experts" in d.stages:
        domains = list(d.experts.domains) if d.experts.domains is not None else list(data.domains)
        unknown = [x for x in domains if x not in data.domains]
        if unknown:
            raise ValueError(f"distill.experts.domains has {unknown}, which the data does not have; domains: "
                             f"{data.domains}")
        try:
            _, summary["experts"] = train_experts(job, domains, base, tokenizer_dir, run_dir / "experts",
                                                  run_training, reuse_finished=job.run.resume == "auto")
        except StageStopped as stop:
            log.warning("%s; the job stops here, run.resume=auto on run.dir=%s continues it", stop, run_dir)
            return dict(summary, stopped_by_signal=True)
        setup_logging(run_dir)  # each fine-tune pointed the log handlers at its own run directory
        manifest = run_dir / "experts" / "teachers.json"

    if "opd" in d.stages:
        opd_dir = run_dir / "opd"
        resume_from = latest_valid_checkpoint(opd_dir / "checkpoints") if job.run.resume == "auto" else None
        finished = resume_from is not None and checkpoint_step(resume_from) >= d.opd.steps
        if finished and (opd_dir / "summary.json").is_file():
            log.info("OPD finished already (%s); run.resume=auto keeps it", resume_from)
            summary["opd"] = json.loads((opd_dir / "summary.json").read_text())
        else:
            student = build_student(job, resume_from or student_checkpoint, device)
            pool = TeacherPool(read_manifest(manifest), d.teachers, job.model, data.tokenizer.fingerprint, device)
            prompts = PromptSets.from_data(data, pool.domains, d.opd.rollout, job.run.seed)
            # continue this run's OPD, or start afresh (an old OPD directory is moved aside, not deleted)
            opd_dir = prepare_run_dir(opd_dir, "auto" if resume_from else "never", overwrite=resume_from is None)
            summary["opd"] = run_opd(job, student, pool, prompts, data.tokenizer, device, opd_dir, resume_from)
            if summary["opd"].get("stopped_by_signal"):
                log.warning("OPD stopped by a signal at %s; run.resume=auto on run.dir=%s continues it",
                            summary["opd"]["checkpoint"], run_dir)
                return dict(summary, stopped_by_signal=True)
    print_summary(summary, run_dir)
    return summary
