"""The OPD loop: rollout, teacher stage, loss, backward, step, log — top to bottom (style rule 9).

Spec opd-and-fused-loss §3 (V4's multi-teacher OPD): every step the student samples continuations
of prompts of every teacher's domain (so every teacher is busy every step, §8.3), each sample is
scored by its domain's teacher, and the student minimises the full-vocabulary reverse KL to it
(forward KL, JSD or the sampled-token estimator as options). The per-teacher KL on held-out
prompts is measured before the first and after the last step (and every `eval_every` steps).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from distill.config import DistillJobConfig, LossConfig
from distill.loss import OPDLossOutput, opd_loss, resolve_impl
from distill.rollout import PromptSets, RolloutBatch, rollout
from distill.teachers import StageTimes, TeacherPool
from model import V4Model
from train.checkpoint import load_checkpoint, save_checkpoint
from train.engine import LocalEngine
from train.loop import StopRequest
from train.metrics import MetricsLogger
from train.optim import lr_at

log = logging.getLogger("distill")
EVAL_SEED_OFFSET = 1_000_003


def per_teacher_means(values: torch.Tensor, teacher_of_position: torch.Tensor, names: List[str]) -> Dict[str, float]:
    """Mean of `values` over each teacher's loss positions (teachers without positions are left out)."""
    out = {}
    for index, name in enumerate(names):
        mine = teacher_of_position == index
        if bool(mine.any()):
            out[name] = float(values[mine].mean())
    return out


def masked_mean(values: Optional[torch.Tensor], teacher_of_position: torch.Tensor) -> Optional[float]:
    if values is None:
        return None
    valid = teacher_of_position >= 0
    return float(values[valid].mean()) if bool(valid.any()) else 0.0


def sample_batch(student: V4Model, prompts: List[List[int]], teacher_of_row: List[int], job: DistillJobConfig,
                 tokenizer, generator: torch.Generator) -> RolloutBatch:
    return rollout(student, prompts, teacher_of_row, job.distill.opd.rollout, tokenizer.eos_id, tokenizer.pad_id,
                   generator)


def score(student: V4Model, pool: TeacherPool, batch: RolloutBatch, loss_cfg: LossConfig, impl: str) -> OPDLossOutput:
    """Student forward (hidden states only), then the teachers group by group, then the loss."""
    out = student(batch.inputs, doc_ids=batch.doc_ids, return_hidden=True, compute_logits=False)
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    return opd_loss(hidden, student.head.weight, pool.teacher_groups(batch), batch.targets.reshape(-1),
                    int(batch.loss_mask.sum()), loss_cfg, impl)


@torch.no_grad()
def evaluate_kl(student: V4Model, pool: TeacherPool, prompts: PromptSets, job: DistillJobConfig, tokenizer,
                impl: str, seed: int) -> Dict[str, float]:
    """Per-teacher full-vocabulary reverse KL of the student on its own samples of held-out prompts.

    The sampling seed is fixed, so two evaluations differ only through the student.
    """
    opd = job.distill.opd
    rows, owners = [], []
    for index, spec in enumerate(pool.specs):
        rows += prompts.eval_prompts(spec.domain, opd.eval_prompts)
        owners += [index] * opd.eval_prompts
    generator = torch.Generator(device=student.embed.weight.device).manual_seed(seed + EVAL_SEED_OFFSET)
    batch = sample_batch(student, rows, owners, job, tokenizer, generator)
    was_training = student.training
    student.eval()
    result = score(student, pool, batch, LossConfig(kind="reverse", temperature=opd.loss.temperature), impl)
    student.train(was_training)
    return per_teacher_means(result.reverse_kl, result.teacher_of_position, pool.names)


def run_opd(job: DistillJobConfig, student: V4Model, pool: TeacherPool, prompts: PromptSets, tokenizer,
            device: torch.device, run_dir: Path, resume_from: Optional[Path] = None) -> dict:
    """Distil the pool's teachers into `student` (trained in place); returns the stage summary.

    resume_from: an OPD checkpoint of this run to continue from (optimizer, sampling generator,
    prompt order, evaluations so far; `student` already holds its weights); the continued run takes
    the same steps as an uninterrupted one. SIGTERM/SIGINT save a checkpoint after the current step and stop."""
    opd = job.distill.opd
    optim = dataclasses.replace(job.optim, lr=opd.lr if opd.lr is not None else job.optim.lr,
                                warmup_steps=opd.warmup_steps if opd.warmup_steps is not None else job.optim.warmup_steps)
    optim = dataclasses.replace(optim, min_lr=min(optim.min_lr, optim.lr))
    engine = LocalEngine(student, optim)
    impl = resolve_impl(opd.loss.impl, device)
    seed = job.run.seed
    generator = torch.Generator(device=device).manual_seed(seed)
    metrics = MetricsLogger(run_dir, job.logging, f"{job.run.name}-opd",
                            OmegaConf.to_container(OmegaConf.structured(job)), resume=resume_from is not None)
    log.info("OPD: %d teachers %s, loss %s (impl %s), %d steps, %d prompts per teacher per step", len(pool),
             pool.names, opd.loss.kind, impl, opd.steps, opd.rollout.prompts_per_teacher)

    def evaluate(step: int) -> Dict[str, float]:
        kl = evaluate_kl(student, pool, prompts, job, tokenizer, impl, seed)
        metrics.log_eval(step, {f"kl/{name}": value for name, value in kl.items()})
        log.info("step %d eval KL(student||teacher) %s", step, {k: round(v, 4) for k, v in kl.items()})
        return kl

    totals = {"rollout_s": 0.0, "teacher_s": 0.0, "loss_s": 0.0, "sampled_tokens": 0, "teacher_tokens": 0,
              "loss_tokens": 0}
    progress_state = {"eval_history": {}, "totals": totals, "train_kl_first": None}

    def save(step: int) -> Path:
        # "model" alone is the student's weights (usable as run.init_from or distill.student)
        return save_checkpoint(run_dir / "checkpoints", step, {"model": student.state_dict(), "opd": {
            "optimizer": engine.state_dict(), "generator": generator.get_state(), "prompts": prompts.state_dict(),
            "rng_cpu": torch.get_rng_state(), **progress_state}},
            meta={"config": OmegaConf.to_container(OmegaConf.structured(job))})

    start = 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, parts=["opd"], verify=False)     # the pipeline picked a verified one
        state = ckpt["opd"]
        engine.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        prompts.load_state_dict(state["prompts"])
        torch.set_rng_state(state["rng_cpu"])
        totals.update(state["totals"])
        progress_state.update(eval_history=state["eval_history"], train_kl_first=state["train_kl_first"])
        start = ckpt["_step"]
        log.info("OPD resumed from %s at step %d", resume_from, start)
    eval_history = progress_state["eval_history"]
    progress = None
    if job.logging.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=opd.steps, initial=start, desc="opd", unit="step", dynamic_ncols=True)
    if 0 not in eval_history:
        eval_history[0] = evaluate(0)
    eval_first = eval_history[0]
    rows_log: List[dict] = []
    stop = StopRequest()
    stopped_at = None
    student.train()
    for step in range(start, opd.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, opd.steps, optim)
        engine.set_lr(lr)

        # ---- rollout: every teacher's domain gets prompts_per_teacher samples
        t0 = time.perf_counter()
        prompt_rows, owners = [], []
        for index, spec in enumerate(pool.specs):
            prompt_rows += prompts.take(spec.domain, opd.rollout.prompts_per_teacher)
            owners += [index] * opd.rollout.prompts_per_teacher
        batch = sample_batch(student, prompt_rows, owners, job, tokenizer, generator)  # .sum() syncs
        rollout_s = time.perf_counter() - t0

        # ---- teacher stage (inside the loss, group by group) and loss
        pool.times = StageTimes()
        t0 = time.perf_counter()
        result = score(student, pool, batch, opd.loss, impl)
        engine.backward(result.loss)
        grad_norm = engine.clip_grad_norm()
        teacher_s = pool.times.load_s + pool.times.forward_s
        loss_s = time.perf_counter() - t0 - teacher_s
        t0 = time.perf_counter()
        engine.step()
        student.update_balance_biases(job.train.bias_update_speed)
        if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize(device)
        optimizer_s = time.perf_counter() - t0

        step_s = time.perf_counter() - t_step
        loss_tokens = int(batch.loss_mask.sum())
        totals["rollout_s"] += rollout_s
        totals["teacher_s"] += teacher_s
        totals["loss_s"] += loss_s
        totals["sampled_tokens"] += batch.sampled_tokens
        totals["teacher_tokens"] += pool.times.tokens
        totals["loss_tokens"] += loss_tokens
        kl_by_teacher = (per_teacher_means(result.reverse_kl, result.teacher_of_position, pool.names)
                         if result.reverse_kl is not None else {})
        row = {"step": step + 1, "loss": result.loss.detach().item(), "lr": lr, "grad_norm": grad_norm,
               "kl": masked_mean(result.reverse_kl, result.teacher_of_position),
               "divergence": masked_mean(result.divergence, result.teacher_of_position),
               "entropy": masked_mean(result.entropy, result.teacher_of_position),
               "sampled_logprob": masked_mean(result.sampled_logprob, result.teacher_of_position),
               "sampled_tokens": batch.sampled_tokens, "completion_len": batch.sampled_tokens / len(prompt_rows),
               "rollout_s": rollout_s, "rollout_tokens_per_s": batch.sampled_tokens / max(rollout_s, 1e-9),
               "teacher_s": teacher_s, "teacher_load_s": pool.times.load_s,
               "teacher_tokens_per_s": pool.times.tokens / max(teacher_s, 1e-9),
               "loss_s": loss_s, "loss_tokens_per_s": loss_tokens / max(loss_s, 1e-9),
               "optimizer_s": optimizer_s, "step_s": step_s,
               "teacher_groups": len(pool.plan(batch.teacher_of_row.tolist()))}
        row.update({f"kl/{name}": value for name, value in kl_by_teacher.items()})
        row = {k: v for k, v in row.items() if v is not None}
        metrics.log_step(row)
        rows_log.append(row)
        if progress_state["train_kl_first"] is None:
            progress_state["train_kl_first"] = row.get("kl")
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row.get('kl', 0.0):.3f}")
            progress.update(1)

        done = step + 1 == opd.steps
        if opd.eval_every and (step + 1) % opd.eval_every == 0 and not done:
            eval_history[step + 1] = evaluate(step + 1)
        if opd.checkpoint_every and (step + 1) % opd.checkpoint_every == 0 and not done:
            save(step + 1)
        if stop.signal is not None and not done:
            stopped_at = save(step + 1)
            log.warning("stop signal received: OPD checkpoint %s saved, exiting (run.resume=auto continues)",
                        stopped_at)
            break

    if progress is not None:
        progress.close()
    if stopped_at is not None:
        metrics.close()
        return {"run_dir": str(run_dir), "stopped_by_signal": True, "checkpoint": str(stopped_at)}
    eval_last = evaluate(opd.steps)
    eval_history[opd.steps] = eval_last
    checkpoint = save(opd.steps)
    seconds = {k: totals[k] for k in ("rollout_s", "teacher_s", "loss_s")}
    summary = {
        "run_dir": str(run_dir), "steps": opd.steps, "checkpoint": str(checkpoint),
        "loss_kind": opd.loss.kind, "loss_impl": impl,
        "teachers": [{"name": s.name, "domain": s.domain} for s in pool.specs],
        "eval_kl_first": eval_first, "eval_kl_last": eval_last,
        "eval_kl": {str(k): v for k, v in eval_history.items()},
        "train_kl_first": progress_state["train_kl_first"], "train_kl_last": rows_log[-1].get("kl") if rows_log else None,
        "stage_seconds": seconds,
        "rollout_tokens_per_s": totals["sampled_tokens"] / max(totals["rollout_s"], 1e-9),
        "teacher_tokens_per_s": totals["teacher_tokens"] / max(totals["teacher_s"], 1e-9),
        "loss_tokens_per_s": totals["loss_tokens"] / max(totals["loss_s"], 1e-9),
    }
    metrics.close(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
