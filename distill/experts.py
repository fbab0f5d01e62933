"""Expert stage: one teacher per domain label, fine-tuned from the base on the training engine
(spec opd-and-fused-loss §3, step 1; V4 trains its experts with SFT and then RL, here SFT only).

Each expert is a full `train.loop.run` into run_dir/experts/<name>/ with `run.init_from` = the
base, `data.domains=[domain]` and `data.tokenizer` = the student's tokenizer directory: restricting
the corpus must not retrain the BPE on one domain, or the expert would no longer share the
student's vocabulary. The stage writes experts/teachers.json, the manifest the teacher pool reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Callable, List, Sequence

from distill.config import DistillJobConfig
from distill.teachers import TeacherSpec, write_manifest
from train.checkpoint import latest_valid_checkpoint
from train.config import Config, RunConfig

log = logging.getLogger("distill")


class StageStopped(RuntimeError):
    """A stage saved its state and stopped on SIGTERM/SIGINT; the job ends, run.resume=auto continues it."""


def finished_steps(run_dir: Path) -> int:
    """Steps of the run in run_dir that ended normally (its summary.json), 0 if none did."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return 0
    recorded = json.loads(summary.read_text())
    return 0 if recorded.get("stopped_by_signal") else int(recorded.get("steps", 0))


def expert_names(domains: Sequence[str], per_domain: int) -> List[tuple]:
    """(name, domain) of every expert: the domain itself, or '<domain>.<k>' with several per domain."""
    if per_domain == 1:
        return [(d, d) for d in domains]
    return [(f"{d}.{k}", d) for d in domains for k in range(per_domain)]


def expert_config(job: DistillJobConfig, name: str, domain: str, index: int, base: Path, tokenizer_dir: Path,
                  run_dir: Path, resume: str = "never") -> Config:
    """The training config of one expert's fine-tune (`resume`: its run.resume)."""
    experts = job.distill.experts
    optim = dataclasses.replace(job.optim, lr=experts.lr if experts.lr is not None else job.optim.lr,
                                min_lr=min(job.optim.min_lr, experts.lr if experts.lr is not None else math.inf))
    return Config(
        model=job.model,
        data=dataclasses.replace(job.data, domains=[domain], tokenizer=str(tokenizer_dir)),
        optim=optim,
        parallel=job.parallel,
        train=dataclasses.replace(job.train, max_steps=experts.max_steps),
        logging=job.logging,
        # a distinct seed per expert: its own data order (per_domain > 1 gives distinct fine-tunes)
        run=RunConfig(dir=str(run_dir), name=f"{job.run.name}-expert-{name}", seed=job.run.seed + 1 + index,
                      resume=resume, overwrite=False, init_from=str(base)),
    )


def train_experts(job: DistillJobConfig, domains: Sequence[str], base: Path, tokenizer_dir: Path, out_dir: Path,
                  run_training: Callable[[Config], dict], reuse_finished: bool) -> tuple:
    """Fine-tune every expert into out_dir/<name>/; returns (teacher specs, per-expert summaries).

    `run_training` is `train.loop.run`; with `reuse_finished` (run.resume=auto), an expert whose
    directory holds a run that finished its steps is kept, and one that was interrupted continues
    from its newest checkpoint. An expert stopped by SIGTERM/SIGINT raises `StageStopped`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, summaries = [], {}
    steps = job.distill.experts.max_steps
    for index, (name, domain) in enumerate(expert_names(domains, job.distill.experts.per_domain)):
        run_dir = out_dir / name
        if reuse_finished and finished_steps(run_dir) == steps:
            log.info("expert %s: reusing the finished run in %s", name, run_dir)
            summaries[name] = {"run_dir": str(run_dir), "reused": True}
        else:
            resume = "auto" if reuse_finished and run_dir.exists() else "never"
            log.info("expert %s: fine-tuning on domain %r for %d steps%s", name, domain, steps,
                     " (continuing its run)" if resume == "auto" else "")
            summaries[name] = run_training(expert_config(job, name, domain, index, base, tokenizer_dir, run_dir, resume))
            if summaries[name].get("stopped_by_signal"):
                raise StageStopped(f"expert {name} stopped by a signal after saving a checkpoint")
        checkpoint = latest_valid_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise RuntimeError(f"expert {name} finished without a valid checkpoint in {run_dir}/checkpoints")
        specs.append(TeacherSpec(name=name, domain=domain, checkpoint=str(checkpoint), tokenizer=str(tokenizer_dir)))
    write_manifest(out_dir / "teachers.json", specs)
    return specs, summaries
