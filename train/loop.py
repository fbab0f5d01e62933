"""The pretraining loop: forward, loss, backward, step, log — one function, top to bottom (style rule 9).

Components come from named builders (`build_model`, `build_data`, `build_engine`). Every step:
take `accum` micro-batches, weight each micro-batch's loss by its share of the step's target
tokens over all data-parallel ranks (the step's loss is the token mean over the global batch,
whatever the layout and micro-batching), back-propagate, check for a loss spike, then clip + step
(Muon for matrices, AdamW for the rest) or skip / roll back, update the MoE balancing biases, and
append one line to metrics.jsonl. One process runs `LocalEngine`; several run the megatron-core +
DeepSpeed `ParallelEngine` (train/parallel) with the same calls.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from model import ModelArgs, V4Model
from train.anticipatory import AnticipatoryRouting
from train.checkpoint import (checkpoint_meta, latest_known_good, latest_valid_checkpoint, load_checkpoint,
                              prune_checkpoints, resolve_checkpoint, save_checkpoint, tag_known_good,
                              verify_checkpoint)
from train.config import Config, accumulation_steps, validate
from train.context import RunContext, make_context
from train.data import Data, build_data
from train.engine import LocalEngine
from train.metrics import MetricsLogger
from train.optim import lr_at
from train.rundir import default_run_dir, prepare_run_dir, write_run_record
from train.spikes import SpikeDetector
from train.summary import print_summary
from train.universal import UNIVERSAL, UniversalParams, convert, universal_dir

log = logging.getLogger("train")

# Dense bf16 peak of known GPUs (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass
class TrainerState:
    """Progress that a checkpoint carries besides model, optimizer and data position."""
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    spikes_since_save: int = 0


def build_model(args: ModelArgs, device: torch.device, seed: int, stage: str) -> V4Model:
    """The full single-device V4 model (fp32 master weights) on `device`, the same on every rank;
    indexer-only training freezes the rest."""
    torch.manual_seed(seed)
    model = V4Model(args).to(device)
    if stage == "indexer_warmup":
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
    return model.train()


def build_engine(model: V4Model, cfg: Config, ctx: RunContext, accum: int):
    """LocalEngine for one process; otherwise TP -> EP -> DeepSpeed ZeRO (train.parallel.parallelize)."""
    if not ctx.distributed:
        return LocalEngine(model, cfg.optim)
    from train.parallel import parallelize
    from train.parallel.optimizers import muon_optimizer_fns

    dense_fn, expert_fn = muon_optimizer_fns(cfg.optim, ctx.dims, cfg.model.o_groups)
    return parallelize(model, ctx.dims, dense_fn, expert_fn, micro_batch_size=cfg.train.micro_batch,
                       grad_accum_steps=accum, grad_clip=cfg.optim.grad_clip)


def full_model_state(engine, ctx: RunContext) -> Optional[dict]:
    """Unsharded weights under the single-device names (rank 0; collective under a layout)."""
    module = engine.model if not ctx.distributed else engine.module
    if not ctx.distributed:
        return module.state_dict()
    from train.parallel import gather_full_parameters

    full = gather_full_parameters(module, ctx.dims)
    if not ctx.is_main:
        return None
    params = {n for n, _ in module.named_parameters()}
    full.update({k: v.cpu() for k, v in module.state_dict().items()
                 if k not in params and isinstance(v, torch.Tensor)})   # megatron adds _extra_state=None
    return full


def load_model_weights(model: V4Model, state: dict, source: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{source} does not fit this model ({str(exc).splitlines()[1].strip()}); "
                         "use the same model config as the checkpoint") from None
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); use the same model config as the checkpoint")


def init_model_from(model: V4Model, path: Path) -> Path:
    """Load model weights from a checkpoint directory or a run directory (its newest valid one)."""
    path = resolve_checkpoint(Path(path), "run.init_from")
    load_model_weights(model, load_checkpoint(path, parts=["model"], verify=False)["model"], f"run.init_from={path}")
    return path


def resume_target(cfg: Config, ctx: RunContext) -> Optional[Path]:
    """The verified checkpoint this run continues (after `prepare_run`): one written under this
    layout, a universal one, or (run.reshard) the universal form of one written under another."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        path = latest_valid_checkpoint(Path(cfg.run.dir) / "checkpoints")
    else:
        path = resolve_checkpoint(Path(cfg.run.resume), "run.resume")
    if path is None:
        return None
    saved, current = checkpoint_meta(path).get("layout"), layout_of(ctx, cfg)
    if saved in (None, UNIVERSAL) or saved == current:
        return path
    if cfg.run.reshard:
        return resharded(path, ctx)
    raise ValueError(f"checkpoint {path} was written under layout {saved}, this run is {current}; pass "
                     f"run.reshard=true, or convert it once with `python -m train.universal {path}` (v4-reshard) "
                     f"and resume with run.resume={universal_dir(path) / path.name}, or start from its weights "
                     f"only with run.init_from={path}")


def resharded(path: Path, ctx: RunContext) -> Path:
    """The universal form of the verified checkpoint `path`, written by rank 0 unless a valid one exists."""
    target = universal_dir(path) / path.name
    error = None
    if ctx.is_main and verify_checkpoint(target) is not None:
        log.info("checkpoint %s was written under another layout: converting it to %s", path, target)
        try:
            convert(path)
        except ValueError as exc:
            error = str(exc)
    error = ctx.broadcast_error(error)
    if error:
        raise ValueError(f"run.reshard: {error}")
    return target


def layout_of(ctx: RunContext, cfg: Config) -> dict:
    if not ctx.distributed:
        return {"world_size": 1, "tp": 1, "ep": 1, "dp": 1}
    return {"world_size": ctx.world_size, "tp": ctx.dims.tp, "ep": ctx.dims.ep, "dp": ctx.dims.dp}


def mtp_weight(cfg: Config, step: int) -> float:
    """lambda = model.mtp_loss_weight until the LR decay starts, then train.mtp_weight_after_decay."""
    decay_start = max(cfg.optim.warmup_steps, int(cfg.optim.decay_start_fraction * cfg.train.max_steps))
    return cfg.model.mtp_loss_weight if step < decay_start else cfg.train.mtp_weight_after_decay


def flops_per_token(model: V4Model, seq_len: int) -> float:
    """6 x active parameters + attention scores over the window and compressed entries (x12 d_head)."""
    args = model.args
    attn = 0.0
    for layer in range(args.n_layers):
        keys = min(args.window_size, seq_len)
        ratio = args.compress_ratios[layer]
        if ratio:
            entries = seq_len / ratio / 2
            keys += min(entries, args.index_topk) if args.layer_kind(layer) == "csa" else entries
        attn += 12 * args.n_heads * args.head_dim * keys
    return 6 * model.num_parameters(active=True) + attn


def setup_logging(run_dir: Path, rank: int) -> None:
    handlers: List[logging.Handler] = [logging.FileHandler(run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and exits.

    SLURM signals every process of a job step and torchrun forwards the same signal again, so a
    repeat of the same signal within `REPEAT_S` is one request; a later one means "stop now"."""

    REPEAT_S = 10.0

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._at = 0.0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.signal is not None:
            if signum == self.signal and now - self._at < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.signal, self._at = signum, now


class StepBatches:
    """This rank's micro-batches of each optimizer step, now or `ahead` steps in the future."""

    def __init__(self, data: Data, accum: int, overfit_batches: int):
        self.data, self.accum = data, accum
        self.fixed = [next(data.train) for _ in range(overfit_batches * accum)]

    def take(self, step: int) -> List[dict]:
        if self.fixed:
            first = (step % (len(self.fixed) // self.accum)) * self.accum
            return self.fixed[first:first + self.accum]
        return [next(self.data.train) for _ in range(self.accum)]

    def peek(self, step: int, ahead: int, micro: int) -> dict:
        """Micro-batch `micro` of step `step + ahead`, without consuming (call before `take(step)`)."""
        if self.fixed:
            first = ((step + ahead) % (len(self.fixed) // self.accum)) * self.accum
            return self.fixed[first + micro]
        return self.data.train.peek(ahead * self.accum + micro)


@torch.no_grad()
def evaluate(model, data: Data, ctx: RunContext, max_batches: int) -> Dict[str, float]:
    """Held-out LM loss per domain (token mean over all data-parallel ranks)."""
    model.eval()
    losses = {}
    for domain in data.domains:
        total, count = 0.0, 0
        for batch in data.eval_batches(domain)[:max_batches]:
            labels = batch["labels"].to(ctx.device)
            n = int((labels != -100).sum())
            out = model(batch["input_ids"].to(ctx.device), labels=labels, doc_ids=batch["doc_ids"].to(ctx.device))
            total += out.losses["lm"].item() * n
            count += n
        total, count = ctx.sum_over_dp([total, count])
        if count:
            losses[f"{domain}_loss"] = total / count
    model.train()
    return losses


def inject_fault(batches: List[dict], vocab: int, kind: str, seed: int) -> List[dict]:
    """Fault injection 'batch': labels replaced by random tokens (a corrupted batch)."""
    if kind != "batch":
        return batches
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        b = dict(b)
        noise = torch.randint(0, vocab, b["labels"].shape, generator=gen)
        b["labels"] = torch.where(b["labels"] == -100, b["labels"], noise)
        out.append(b)
    return out


def prepare_run(cfg: Config, ctx: RunContext) -> Path:
    """Rank 0 creates (or refuses) the run directory; every rank gets the same answer."""
    if ctx.distributed and not cfg.run.dir:
        raise ValueError("run.dir must be set when several processes train (python -m launch sets it)")
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg.run.name)
    cfg.run.dir = str(run_dir)
    error = None
    if ctx.is_main:
        try:
            prepare_run_dir(run_dir, cfg.run.resume, cfg.run.overwrite)
        except ValueError as exc:
            error = str(exc)
    error = ctx.broadcast_error(error)
    if error:
        raise ValueError(error)
    setup_logging(run_dir, ctx.rank)
    return run_dir


def run(cfg: Config) -> dict:
    """Train according to `cfg`; returns the run summary (also written to summary.json)."""
    ctx = make_context(cfg.parallel, cfg.model, cfg.train.device)
    validate(cfg, ctx.world_size)
    spikes_cfg = cfg.train.spikes
    run_dir = prepare_run(cfg, ctx)
    resume_path = resume_target(cfg, ctx)       # refused before the run record is rewritten
    if ctx.is_main:
        write_run_record(run_dir, cfg)
    log.info("run directory %s; %d process(es), layout %s", run_dir, ctx.world_size, layout_of(ctx, cfg))
    ckpt_root = run_dir / "checkpoints"

    # ---- components
    accum = accumulation_steps(cfg, ctx.dp_size)
    data = build_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                      global_batch=cfg.train.micro_batch * ctx.dp_size, dp_rank=ctx.dp_rank,
                      dp_size=ctx.dp_size, seed=cfg.run.seed)
    log.info("%s", data.summary())
    if ctx.is_main:     # the run's tokenizer travels with its checkpoints (a trained BPE exists nowhere else)
        data.tokenizer.save(run_dir / "tokenizer")
    model = build_model(cfg.model, ctx.device, cfg.run.seed, cfg.train.stage)
    log.info("model: %.3fM parameters (%.3fM active per token, MTP excluded)",
             model.num_parameters() / 1e6, model.num_parameters(active=True) / 1e6)
    flops_token = flops_per_token(model, cfg.train.seq_len)
    if resume_path is None and cfg.run.init_from:
        log.info("model weights initialized from %s", init_model_from(model, Path(cfg.run.init_from)))
    if resume_path is not None:          # full weights go in before sharding
        load_model_weights(model, load_checkpoint(resume_path, parts=["model"], verify=False)["model"],
                           f"checkpoint {resume_path}")
    engine = build_engine(model, cfg, ctx, accum)
    module = engine.model if not ctx.distributed else engine.module
    state = TrainerState()
    detector = SpikeDetector(spikes_cfg)
    routing = AnticipatoryRouting(spikes_cfg.lookahead)
    batches_of = StepBatches(data, accum, cfg.train.overfit_batches)
    peak = cfg.train.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if ctx.device.type == "cuda"
                                          and k in torch.cuda.get_device_name(ctx.device)), 0.0)

    def save(step: int) -> Path:
        weights = full_model_state(engine, ctx)
        parts = {f"rank{ctx.rank:05d}": {"optimizer": engine.state_dict(), "shards": engine.shard_record(),
                                         "routing": routing.state_dict(), "rng_cpu": torch.get_rng_state()}}
        if ctx.is_main:
            parts["model"] = weights
            parts["trainer"] = {"state": vars(state).copy(), "loader": data.train.state_dict(),
                                "spikes": detector.state_dict()}
        path = save_checkpoint(ckpt_root, step, parts, rank=ctx.rank, barrier=ctx.barrier, meta={
            "layout": layout_of(ctx, cfg), "config": OmegaConf.to_container(OmegaConf.structured(cfg))})
        if ctx.is_main:
            if state.spikes_since_save == 0:
                tag_known_good(path)
            prune_checkpoints(ckpt_root, cfg.train.keep_checkpoints)
            log.info("checkpoint %s", path)
        state.spikes_since_save = 0
        ctx.barrier()
        return path

    def restore(path: Path, weights_loaded: bool) -> None:
        """Optimizer, data position, trainer state (and the weights unless already loaded)."""
        nonlocal state
        universal = checkpoint_meta(path).get("layout") == UNIVERSAL
        own_part = UNIVERSAL if universal else f"rank{ctx.rank:05d}"
        parts = ["trainer", own_part] + ([] if weights_loaded else ["model"])
        ckpt = load_checkpoint(path, parts=parts, verify=not weights_loaded)
        if not weights_loaded:
            if ctx.distributed:      # rollback: the optimizer's fp32 masters carry the weights back
                params = {name for name, _ in module.named_parameters()}
                module.load_state_dict({k: v for k, v in ckpt["model"].items() if k not in params},
                                       strict=False)
            else:
                module.load_state_dict(ckpt["model"])
        own = ckpt[own_part]
        if universal:
            engine.load_universal(UniversalParams(path, own["files"]))
        else:
            engine.load_state_dict(own["optimizer"])
        routing.load_state_dict(own["routing"])
        torch.set_rng_state(own["rng_cpu"])
        if universal and routing.active(ckpt["trainer"]["state"]["step"]):
            log.warning("anticipatory routing is on until step %d: its cached routing of future batches "
                        "belongs to the old layout and is recomputed from the current parameters",
                        routing.active_until)
        data.train.load_state_dict(ckpt["trainer"]["loader"])
        state = TrainerState(**ckpt["trainer"]["state"])
        detector.load_state_dict(ckpt["trainer"]["spikes"])
        for moe in module.moe_layers():
            moe.expert_load.zero_()

    # ---- resume
    resumed_from = None
    if resume_path is not None:
        restore(resume_path, weights_loaded=True)
        resumed_from = str(resume_path)
        log.info("resumed from %s at step %d", resume_path, state.step)

    metrics = MetricsLogger(run_dir, cfg.logging, cfg.run.name, OmegaConf.to_container(OmegaConf.structured(cfg)),
                            enabled=ctx.is_main, resume=resumed_from is not None)
    stop = StopRequest()
    progress = None
    if cfg.logging.progress and ctx.is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", unit="step",
                        dynamic_ncols=True)
    first_loss: Optional[float] = None
    last_row: dict = {}
    last_eval: Dict[str, float] = {}
    injected = False
    stopping = False

    # ---- the loop
    while state.step < cfg.train.max_steps:
        step = state.step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.train.max_steps, cfg.optim)
        inject_now = spikes_cfg.inject_step == step + 1 and not injected
        if inject_now and spikes_cfg.inject_kind == "lr":
            lr *= spikes_cfg.inject_scale
        engine.set_lr(lr)
        lam = mtp_weight(cfg, step)
        collect = cfg.train.stats_every > 0 and step % cfg.train.stats_every == 0

        # anticipatory routing: route the batch of step + lookahead with today's parameters
        ar_s = optimizer_s = 0.0
        if routing.active(step):
            ta = time.perf_counter()
            routing.precompute(module, step, accum, lambda ahead, micro: batches_of.peek(step, ahead, micro),
                               ctx.device)
            ar_s = time.perf_counter() - ta
        batches = batches_of.take(step)
        if inject_now:
            batches = inject_fault(batches, cfg.model.vocab_size, spikes_cfg.inject_kind, step)
            injected = True

        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        (step_tokens,) = ctx.sum_over_dp([local_tokens])
        sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "balance": 0.0, "indexer": 0.0}
        stats = None
        for micro, b in enumerate(batches):
            b = {k: v.to(ctx.device) for k, v in b.items()}
            override = routing.take(step, micro, ctx.device) if routing.active(step) else None
            out = engine(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"], routing_override=override,
                         collect_stats=collect)
            loss = module.total_loss(out.losses, mtp_weight=lam)
            share = out.num_tokens / max(step_tokens, 1)
            engine.backward(loss * (share * ctx.dp_size))
            sums["loss"] += loss.item() * share
            for k in ("lm", "mtp", "balance", "indexer"):
                sums[k] += out.losses[k].item() * share
            stats = out.stats or stats
        sums = dict(zip(sums, ctx.sum_over_dp(list(sums.values()))))
        grad_norm = engine.clip_grad_norm()

        # spike check before the update is applied (loss and norm are global: every rank agrees)
        spike = detector.check(step + 1, sums["lm"], grad_norm)
        if spike is not None:
            state.spikes_since_save += 1
            metrics.log_event(step + 1, f"{spike.metric}_spike", spike.message, value=spike.value,
                              severe=spike.severe)
            log.warning("step %d: %s spike: %s", step + 1, spike.metric, spike.message)
        action = spikes_cfg.action if spike is not None else None
        target = latest_known_good(ckpt_root, layout_of(ctx, cfg)) if action == "rollback" and spike.severe else None
        if target is not None:
            engine.skip_step()
            restore(target, weights_loaded=False)
            metrics.log_event(step + 1, "rollback", f"rolled back to {target.name} (step {state.step})",
                              to_step=state.step)
            if spikes_cfg.anticipatory_steps:
                routing.activate(state.step, spikes_cfg.anticipatory_steps)
                metrics.log_event(state.step, "anticipatory_routing_on",
                                  f"anticipatory routing for {spikes_cfg.anticipatory_steps} steps "
                                  f"(lookahead {spikes_cfg.lookahead})", until=routing.active_until)
            log.warning("rolled back to %s; resuming at step %d", target, state.step)
            if progress is not None:
                progress.n = state.step
                progress.refresh()
            continue
        if action in ("skip", "rollback"):
            engine.skip_step()
            for moe in module.moe_layers():
                moe.expert_load.zero_()
        else:
            t_opt = time.perf_counter()
            engine.step()
            if ctx.device.type == "cuda":       # the step's kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(ctx.device)
            optimizer_s = time.perf_counter() - t_opt
        loads = [moe.expert_load.clone() for moe in module.moe_layers()]
        if ctx.distributed:
            from train.parallel import reduce_expert_load
            loads = reduce_expert_load(loads, ctx.dims)
        module.update_balance_biases(cfg.train.bias_update_speed, loads=loads)
        if routing.active_until and step + 1 == routing.active_until:
            metrics.log_event(step + 1, "anticipatory_routing_off", "anticipatory routing switched off")

        dt = time.perf_counter() - t0
        tokens = sum(b["input_ids"].numel() for b in batches) * ctx.dp_size
        state.step, state.tokens, state.elapsed_s = step + 1, state.tokens + tokens, state.elapsed_s + dt
        row = {"step": step + 1, "loss": sums["loss"], "lm_loss": sums["lm"], "mtp_loss": sums["mtp"],
               "balance_loss": sums["balance"], "indexer_loss": sums["indexer"], "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "tokens": state.tokens,
               "step_time_s": dt, "mtp_weight": lam, "anticipatory_routing": routing.active(step),
               "anticipatory_routing_s": ar_s, "optimizer_s": optimizer_s, "skipped": action in ("skip", "rollback")}
        if peak:
            row["mfu"] = tokens / dt / ctx.world_size * flops_token / (peak * 1e12)
        row.update(load_metrics(loads, full=collect))
        if stats is not None:
            row["sinkhorn_row_error_max"] = max(stats.sinkhorn_row_error)
            row["comb_logit_max"] = max(stats.max_comb_logit)
            row["sinkhorn_row_error"] = stats.sinkhorn_row_error
            row["max_comb_logit"] = stats.max_comb_logit
        metrics.log_step(row)
        first_loss = sums["lm"] if first_loss is None else first_loss
        last_row = row
        if not math.isfinite(sums["loss"]) and action is None:
            log.error("loss is %s at step %d; stopping (see metrics.jsonl)", sums["loss"], step + 1)
            break
        if progress is not None:
            progress.set_postfix(loss=f"{sums['lm']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
            progress.update(1)

        done = state.step == cfg.train.max_steps
        stopping = ctx.any_rank(stop.signal is not None)
        if (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or done:
            last_eval = evaluate(module, data, ctx, cfg.train.eval_batches)
            metrics.log_eval(state.step, last_eval)
            log.info("step %d eval %s", state.step, {k: round(v, 4) for k, v in last_eval.items()})
        if (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0) or done or stopping:
            save(state.step)
        if stopping:
            log.warning("stop signal received: checkpoint saved at step %d, exiting", state.step)
            break

    if progress is not None:
        progress.close()
    summary = {
        "run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens,
        "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s else 0.0,
        "first_loss": first_loss, "final_loss": last_row.get("lm_loss"),
        "ln_vocab": math.log(cfg.model.vocab_size), "eval": last_eval, "resumed_from": resumed_from,
        "stopped_by_signal": stopping, "layout": layout_of(ctx, cfg),
        "tokenizer": str(run_dir / "tokenizer"), "tokenizer_fingerprint": data.tokenizer.fingerprint,
    }
    metrics.close(summary)
    if ctx.is_main:
        print_summary(summary, run_dir)
    if ctx.distributed:
        from train.parallel import destroy_parallel
        ctx.barrier()
        destroy_parallel()
    return summary


def load_metrics(loads: List[torch.Tensor], full: bool) -> dict:
    """Per-layer max/mean load imbalance; with `full`, the per-expert load fractions too (kept to
    stats steps: at Flash size they are ~23k numbers)."""
    out: dict = {"load_imbalance": []}
    if full:
        out["expert_load"] = []
    for load in loads:
        total = float(load.sum())
        if total == 0:
            continue
        if full:
            out["expert_load"].append([round(f, 5) for f in (load / total).tolist()])
        out["load_imbalance"].append(float(load.max() / load.mean()))
    out["load_imbalance_max"] = max(out["load_imbalance"]) if out["load_imbalance"] else 0.0
    return out
