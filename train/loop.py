"""The pretraining loop: forward, loss, backward, step, log — one function, top to bottom (style rule 9).

Components come from named builders (`build_model`, `build_data`, `build_engine`). Every step:
take `accum` micro-batches, weight each micro-batch's loss by its share of the step's target
tokens (so the step's loss is the token mean over the global batch, whatever the micro-batching),
back-propagate, clip + step (Muon for matrices, AdamW for the rest), update the MoE balancing
biases, and append one line to metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from model import ModelArgs, V4Model
from train.checkpoint import latest_valid_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from train.config import Config, accumulation_steps, validate
from train.data import Data, build_data
from train.engine import LocalEngine
from train.metrics import MetricsLogger
from train.optim import lr_at
from train.rundir import default_run_dir, prepare_run_dir, write_run_record
from train.summary import print_summary

log = logging.getLogger("train")


@dataclass
class TrainerState:
    """Progress that a checkpoint carries besides model, optimizer and data position."""
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_model(args: ModelArgs, device: torch.device, seed: int, stage: str) -> V4Model:
    """The V4 model on `device` (fp32 master weights); indexer-only training freezes the rest."""
    torch.manual_seed(seed)
    model = V4Model(args).to(device)
    if stage == "indexer_warmup":
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
    return model.train()


def mtp_weight(cfg: Config, step: int) -> float:
    """lambda = model.mtp_loss_weight until the LR decay starts, then train.mtp_weight_after_decay."""
    decay_start = max(cfg.optim.warmup_steps, int(cfg.optim.decay_start_fraction * cfg.train.max_steps))
    return cfg.model.mtp_loss_weight if step < decay_start else cfg.train.mtp_weight_after_decay


def setup_logging(run_dir: Path, rank: int) -> None:
    handlers: List[logging.Handler] = [logging.FileHandler(run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:         # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum


@torch.no_grad()
def evaluate(model: V4Model, data: Data, device: torch.device, max_batches: int) -> Dict[str, float]:
    """Held-out LM loss per domain (token mean)."""
    model.eval()
    losses = {}
    for domain in data.domains:
        total, count = 0.0, 0
        for batch in data.eval_batches(domain)[:max_batches]:
            labels = batch["labels"].to(device)
            n = int((labels != -100).sum())
            if n == 0:
                continue
            out = model(batch["input_ids"].to(device), labels=labels, doc_ids=batch["doc_ids"].to(device))
            total += out.losses["lm"].item() * n
            count += n
        if count:
            losses[f"{domain}_loss"] = total / count
    model.train()
    return losses


def run(cfg: Config) -> dict:
    """Train according to `cfg`; returns the run summary (also written to summary.json)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    validate(cfg, world_size)
    if world_size > 1:
        raise ValueError("multi-process training goes through the parallel engine; launch it with "
                         "`python -m launch` (this entry runs one process)")
    device = pick_device(cfg.train.device)

    # ---- run directory and record
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg.run.name)
    cfg.run.dir = str(run_dir)
    run_dir = prepare_run_dir(run_dir, cfg.run.resume, cfg.run.overwrite)
    setup_logging(run_dir, rank)
    write_run_record(run_dir, cfg)
    log.info("run directory %s", run_dir)

    # ---- components
    data = build_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                      global_batch=cfg.train.micro_batch, seed=cfg.run.seed)
    log.info("%s", data.summary())
    model = build_model(cfg.model, device, cfg.run.seed, cfg.train.stage)
    log.info("model: %.3fM parameters (%.3fM active per token, MTP excluded)",
             model.num_parameters() / 1e6, model.num_parameters(active=True) / 1e6)
    engine = LocalEngine(model, cfg.optim)
    accum = accumulation_steps(cfg, 1)
    state = TrainerState()

    # ---- resume
    resumed_from = None
    if cfg.run.resume != "never":
        ckpt_path = latest_valid_checkpoint(run_dir / "checkpoints") if cfg.run.resume == "auto" else Path(cfg.run.resume)
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            model.load_state_dict(ckpt["model"])
            engine.load_state_dict(ckpt["optimizer"])
            data.train.load_state_dict(ckpt["trainer"]["loader"])
            state = TrainerState(**ckpt["trainer"]["state"])
            torch.set_rng_state(ckpt["trainer"]["rng_cpu"])
            resumed_from = str(ckpt_path)
            log.info("resumed from %s at step %d", ckpt_path, state.step)

    metrics = MetricsLogger(run_dir, cfg.logging, cfg.run.name, OmegaConf.to_container(OmegaConf.structured(cfg)),
                            enabled=rank == 0, resume=resumed_from is not None)
    stop = StopRequest()
    overfit: List[dict] = [next(data.train) for _ in range(cfg.train.overfit_batches * accum)]

    def save(step: int) -> None:
        path = save_checkpoint(run_dir / "checkpoints", step, {
            "model": model.state_dict(),
            "optimizer": engine.state_dict(),
            "trainer": {"state": vars(state).copy(), "loader": data.train.state_dict(),
                        "rng_cpu": torch.get_rng_state()},
        }, meta={"config": OmegaConf.to_container(OmegaConf.structured(cfg))})
        prune_checkpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
        log.info("checkpoint %s", path)

    progress = None
    if cfg.logging.progress and rank == 0:
        from tqdm.auto import tqdm
        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", unit="step",
                        dynamic_ncols=True)
    first_loss: Optional[float] = None
    last_row: dict = {}
    last_eval: Dict[str, float] = {}

    # ---- the loop
    for step in range(state.step, cfg.train.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.train.max_steps, cfg.optim)
        engine.set_lr(lr)
        lam = mtp_weight(cfg, step)
        collect = cfg.train.stats_every > 0 and step % cfg.train.stats_every == 0

        if overfit:
            batches = overfit[(step % cfg.train.overfit_batches) * accum:][:accum]
        else:
            batches = [next(data.train) for _ in range(accum)]
        step_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "balance": 0.0, "indexer": 0.0}
        stats = None
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out = model(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"], collect_stats=collect)
            loss = model.total_loss(out.losses, mtp_weight=lam)
            share = out.num_tokens / max(step_tokens, 1)
            engine.backward(loss * share)
            sums["loss"] += loss.item() * share
            for k in ("lm", "mtp", "balance", "indexer"):
                sums[k] += out.losses[k].item() * share
            stats = out.stats or stats
        grad_norm = engine.step()
        loads = [moe.expert_load.clone() for moe in model.moe_layers()]
        model.update_balance_biases(cfg.train.bias_update_speed)

        dt = time.perf_counter() - t0
        tokens = sum(b["input_ids"].numel() for b in batches)
        state.step, state.tokens, state.elapsed_s = step + 1, state.tokens + tokens, state.elapsed_s + dt
        row = {"step": step + 1, "loss": sums["loss"], "lm_loss": sums["lm"], "mtp_loss": sums["mtp"],
               "balance_loss": sums["balance"], "indexer_loss": sums["indexer"], "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "tokens": state.tokens,
               "step_time_s": dt, "mtp_weight": lam}
        row.update(load_metrics(loads, model))
        if stats is not None:
            row["sinkhorn_row_error_max"] = max(stats.sinkhorn_row_error)
            row["comb_logit_max"] = max(stats.max_comb_logit)
            row["sinkhorn_row_error"] = stats.sinkhorn_row_error
        metrics.log_step(row)
        first_loss = sums["lm"] if first_loss is None else first_loss
        last_row = row
        if not math.isfinite(sums["loss"]):
            log.error("loss is %s at step %d; stopping (see metrics.jsonl)", sums["loss"], step + 1)
            save(step + 1)
            break
        if progress is not None:
            progress.set_postfix(loss=f"{sums['lm']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
            progress.update(1)

        done = step + 1 == cfg.train.max_steps
        if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or done:
            last_eval = evaluate(model, data, device, cfg.train.eval_batches)
            metrics.log_eval(step + 1, last_eval)
            log.info("step %d eval %s", step + 1, {k: round(v, 4) for k, v in last_eval.items()})
        if (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0) or done or stop.signal:
            save(step + 1)
        if stop.signal:
            log.warning("signal %d received: checkpoint saved at step %d, exiting", stop.signal, step + 1)
            break

    if progress is not None:
        progress.close()
    summary = {
        "run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens,
        "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s else 0.0,
        "first_loss": first_loss, "final_loss": last_row.get("lm_loss"),
        "ln_vocab": math.log(cfg.model.vocab_size), "eval": last_eval, "resumed_from": resumed_from,
        "stopped_by_signal": stop.signal,
    }
    metrics.close(summary)
    if rank == 0:
        print_summary(summary, run_dir)
    return summary


def load_metrics(loads: List[torch.Tensor], model: V4Model) -> dict:
    """Per-layer expert load (fractions) and its max/mean imbalance."""
    out: dict = {"expert_load": [], "load_imbalance": []}
    for load in loads:
        total = float(load.sum())
        if total == 0:
            continue
        frac = (load / total).tolist()
        out["expert_load"].append([round(f, 5) for f in frac])
        out["load_imbalance"].append(float(load.max() / load.mean()))
    out["load_imbalance_max"] = max(out["load_imbalance"]) if out["load_imbalance"] else 0.0
    return out
