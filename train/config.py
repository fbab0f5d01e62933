"""Configuration of a pretraining run: one dataclass per concern, composed by Hydra (style rules 4-5).

`Config` is the root schema registered in Hydra's ConfigStore; `configs/` holds one group per
field (model, data, optim, parallel, train, logging) and `configs/experiment/` holds deltas.
Cross-concern checks live in `validate()`, whose errors name the exact fields and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from model import ModelArgs
from train.data import DataConfig
from train.optim import OptimConfig
from train.parallel.config import ParallelConfig
from train.spikes import SpikeConfig

RESUME_MODES = ("never", "auto")
DEVICES = ("auto", "cpu", "cuda")
STAGES = ("pretrain", "indexer_warmup")


@dataclass
class RunConfig:
    """Where a run writes and whether it continues an earlier one."""

    dir: Optional[str] = None
    """Run directory; None = runs/<name>-<UTC time>, chosen once by the launching process."""
    name: str = "v4"
    """Run name (default directory name, wandb run name)."""
    seed: int = 0
    """Seed of the model init and the data order."""
    resume: str = "never"
    """'never' (refuse a directory that already holds a run), 'auto' (newest valid checkpoint in
    run.dir, or a fresh start if there is none) or a path to a checkpoint directory."""
    overwrite: bool = False
    """Start afresh in a directory that holds a run; the old run is moved aside, never deleted."""
    reshard: bool = False
    """Resume a checkpoint written under another parallel layout (e.g. after losing a node) by converting
    it to its universal form first (rank 0, once, into <run>/universal/); False refuses and prints the
    conversion command."""
    init_from: Optional[str] = None
    """Checkpoint directory (or a run directory: its newest valid checkpoint) whose model weights
    start this run, e.g. a domain expert fine-tuned from a base model; optimizer and data start fresh."""


@dataclass
class TrainConfig:
    """The optimization loop."""

    max_steps: int = 300
    """Optimizer steps of the run."""
    seq_len: int = 128
    """Tokens per packed row."""
    global_batch: int = 8
    """Rows per optimizer step over all data-parallel ranks and accumulation steps."""
    micro_batch: int = 4
    """Rows per forward pass on one rank; global_batch / (micro_batch * dp) accumulation steps."""
    mtp_weight_after_decay: float = 0.1
    """MTP loss weight once the LR decay starts (model.mtp_loss_weight before; spec §2.2: 0.3 -> 0.1)."""
    bias_update_speed: Optional[float] = None
    """Aux-loss-free bias step gamma per optimizer step; None = model.bias_update_speed."""
    stage: str = "pretrain"
    """'pretrain' trains everything; 'indexer_warmup' trains only the lightning indexers (spec §3.12
    stage B; needs model.indexer_mode=warmup)."""
    eval_every: int = 100
    """Evaluate the held-out loss per domain every N steps (0 = only at the end)."""
    eval_batches: int = 4
    """At most this many held-out batches per domain in one evaluation."""
    checkpoint_every: int = 100
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints (plus any tagged known-good)."""
    overfit_batches: int = 0
    """Debug: cycle over the first N global batches instead of streaming the corpus (0 = off)."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""
    stats_every: int = 10
    """Collect per-layer mHC statistics (Sinkhorn row error, max comb logit) every N steps."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for the MFU metric (0 = look it up for known GPUs;
    no MFU on CPU)."""
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike detection, rollback and anticipatory routing."""


@dataclass
class LoggingConfig:
    """Metrics sinks: metrics.jsonl always, wandb (offline unless configured), the progress bar."""

    wandb: bool = True
    """Log to Weights & Biases."""
    wandb_mode: str = "offline"
    """'offline' (files under run_dir/wandb, sync later), 'online' or 'disabled'."""
    wandb_project: str = "v4forge"
    """wandb project name."""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user); None = the default of the logged-in user."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class Config:
    """Root schema of `python -m train`."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the root schema (`config_schema`) and one schema per group (`<group>/schema`)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in (("model", ModelArgs), ("data", DataConfig), ("optim", OptimConfig),
                        ("parallel", ParallelConfig), ("train", TrainConfig),
                        ("logging", LoggingConfig), ("run", RunConfig)):
        cs.store(group=group, name="schema", node=node)


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """global_batch / (micro_batch * dp), validated by `validate`."""
    return cfg.train.global_batch // (cfg.train.micro_batch * dp_size)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-concern checks; each error names the fields and the fix."""
    def fail(msg: str) -> None:
        raise ValueError(f"config: {msg}")

    t = cfg.train
    for name in ("max_steps", "seq_len", "global_batch", "micro_batch"):
        if getattr(t, name) <= 0:
            fail(f"train.{name}={getattr(t, name)} must be positive")
    if t.seq_len > cfg.model.max_seq_len:
        fail(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
             "lower train.seq_len or raise model.max_seq_len")
    dp = cfg.parallel.dp_size(world_size) if world_size > 1 else 1
    if dp < 1:
        fail(f"parallel.tp={cfg.parallel.tp} with {world_size} processes leaves no data-parallel rank; "
             "launch a multiple of parallel.tp processes")
    if t.global_batch % (t.micro_batch * dp):
        fail(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
             f"{t.micro_batch} x data-parallel size {dp}; pick global_batch = k * {t.micro_batch * dp}")
    if t.stage not in STAGES:
        fail(f"train.stage={t.stage!r} must be one of {STAGES}")
    if t.stage == "indexer_warmup" and cfg.model.indexer_mode != "warmup":
        fail("train.stage=indexer_warmup needs model.indexer_mode=warmup (dense attention, "
             "indexer KL over every visible entry)")
    if t.device not in DEVICES:
        fail(f"train.device={t.device!r} must be one of {DEVICES}")
    if cfg.run.resume not in RESUME_MODES and not cfg.run.resume.strip():
        fail("run.resume is empty; use 'never', 'auto' or a checkpoint path")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        fail(f"logging.wandb_mode={cfg.logging.wandb_mode!r} must be offline, online or disabled")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "overfit_batches", "stats_every"):
        if getattr(t, name) < 0:
            fail(f"train.{name}={getattr(t, name)} must be >= 0")
    t.spikes.validate()
    cfg.optim.validate()


def initial_loss(cfg: Config) -> float:
    """ln(vocab): what the LM loss should start near."""
    return math.log(cfg.model.vocab_size)
