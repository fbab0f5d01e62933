"""Configuration of `python -m distill`: one dataclass per concern (style rules 4-5).

`DistillJobConfig` is the root schema (`configs/distill.yaml`): the training groups of
`train.config` (model, data, optim, parallel, train, logging, run) plus `distill`
(`DistillConfig`: the expert stage, the teacher pool and the OPD stage; spec
opd-and-fused-loss §3, §8). The expert stage fine-tunes with `train` and `optim`; the OPD stage
uses `optim` with its own lr/warmup overrides. Cross-concern checks live in `validate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from model import ModelArgs
from train.config import LoggingConfig, RunConfig, TrainConfig
from train.data import DataConfig
from train.optim import OptimConfig
from train.parallel.config import ParallelConfig

STAGES = ("experts", "opd")
LOSS_KINDS = ("reverse", "forward", "jsd", "sampled")
LOSS_IMPLS = ("auto", "torch", "tilelang")
OFFLOAD_MODES = ("cpu", "disk")
HIDDEN_DTYPES = ("bfloat16", "float32")


@dataclass
class ExpertsConfig:
    """Expert stage: fine-tune teachers from the base checkpoint, one per domain label."""

    domains: Optional[List[str]] = None
    """Domain labels that get a teacher; None = every domain of the data."""
    per_domain: int = 1
    """Teachers per domain label, each a fine-tune with its own data-order seed, named
    '<domain>.<k>' when > 1; a domain's samples are spread over its teachers round-robin (how the
    tiny preset reaches dozens of teachers from three embedded domains)."""
    max_steps: int = 200
    """Optimizer steps of each fine-tune (train.* sets its batch, sequence length and eval)."""
    lr: Optional[float] = None
    """Peak learning rate of the fine-tunes; None = optim.lr."""


@dataclass
class RolloutConfig:
    """Student sampling (spec §4: temperature 1.0 on-policy rollouts)."""

    prompts_per_teacher: int = 4
    """Prompts per teacher per OPD step (every teacher is used every step: no idle teacher)."""
    prompt_tokens: int = 32
    """Longest prompt: a window of a training document of the teacher's domain (<bos> first)."""
    max_new_tokens: int = 16
    """Longest completion the student samples."""
    temperature: float = 1.0
    """Sampling temperature of the student (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = the full distribution, unbiased for on-policy KL)."""
    stop_at_eos: bool = True
    """End a completion at <eos> (it counts as a sampled token)."""
    prompt_docs: int = 512
    """Documents per domain read to cut prompts from (train split for training, eval split for eval)."""


@dataclass
class LossConfig:
    """The distillation loss (spec §2) through kernels.distill_kl."""

    kind: str = "reverse"
    """'reverse' KL(student‖teacher) over the full vocabulary (V4's OPD), 'forward', 'jsd'
    (generalized JSD, `beta`), or 'sampled': the sampled-token estimator (policy gradient with
    advantage −(log p_s(y) − log p_t(y)); the cheap baseline)."""
    beta: float = 0.5
    """JSD mixture weight (TRL/Liger convention: 0 = forward, 1 = reverse KL)."""
    temperature: float = 1.0
    """Both logits are divided by it inside the loss (no τ² factor)."""
    impl: str = "auto"
    """'auto' (TileLang kernel on CUDA, torch reference on CPU), 'torch' or 'tilelang'."""
    log_reverse_kl: bool = True
    """For kind != 'reverse', also compute the full reverse KL (no gradient) for the metrics."""


@dataclass
class TeacherPoolConfig:
    """Where teachers live and how they are brought in (spec §8.2-8.3)."""

    manifest: Optional[str] = None
    """teachers.json listing {name, domain, checkpoint, tokenizer} per teacher, for an OPD stage
    without the expert stage (with it, the stage's own run.dir/experts/teachers.json is used)."""
    offload: str = "cpu"
    """Teacher weights between uses: 'cpu' (state dicts in host memory, pinned on CUDA) or
    'disk' (read from the checkpoint each time). Never in the student's device memory."""
    group_size: int = 8
    """Teachers brought onto the device at once; their heads are stacked for one loss call."""
    hidden_dtype: str = "bfloat16"
    """dtype of the hidden states a teacher ships (the loss upcasts as the kernel does)."""


@dataclass
class OPDConfig:
    """The on-policy distillation loop."""

    steps: int = 100
    """Optimizer steps of the student."""
    lr: Optional[float] = None
    """Peak learning rate of the student; None = optim.lr."""
    warmup_steps: Optional[int] = None
    """Linear warmup steps; None = optim.warmup_steps."""
    eval_every: int = 0
    """Evaluate the per-teacher KL on held-out prompts every N steps (always before and after)."""
    eval_prompts: int = 8
    """Held-out prompts per teacher in an evaluation (sampled with a fixed seed)."""
    checkpoint_every: int = 0
    """Save the student every N steps (0 = only at the end)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Student sampling."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The divergence and its implementation."""


@dataclass
class DistillConfig:
    """Distillation: experts from a base, then OPD of one student from all experts."""

    base: Optional[str] = None
    """Pretrained checkpoint (or run directory: its newest valid checkpoint) the experts are
    fine-tuned from and the student starts from."""
    student: Optional[str] = None
    """Checkpoint (or run directory) the student starts from; None = base."""
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in order: 'experts', 'opd'."""
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    """The expert stage."""
    teachers: TeacherPoolConfig = field(default_factory=TeacherPoolConfig)
    """The teacher pool."""
    opd: OPDConfig = field(default_factory=OPDConfig)
    """The OPD stage."""


@dataclass
class DistillJobConfig:
    """Root schema of `python -m distill`."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="distill"))
    distill: DistillConfig = field(default_factory=DistillConfig)


def register_configs() -> None:
    """Register the root schema (`distill_job_schema`) and the `distill/schema` group schema.

    The training groups' schemas are registered by `train.config.register_configs`.
    """
    from train.config import register_configs as register_train_configs

    register_train_configs()
    cs = ConfigStore.instance()
    cs.store(name="distill_job_schema", node=DistillJobConfig)
    cs.store(group="distill", name="schema", node=DistillConfig)


def validate(job: DistillJobConfig) -> None:
    """Cross-concern checks; each error names the fields and the fix."""
    def fail(msg: str) -> None:
        raise ValueError(f"config: {msg}")

    d = job.distill
    if not d.stages or any(s not in STAGES for s in d.stages) or len(set(d.stages)) != len(d.stages):
        fail(f"distill.stages={list(d.stages)} must be a non-empty subset of {list(STAGES)} without repeats")
    if [s for s in STAGES if s in d.stages] != list(d.stages):
        fail(f"distill.stages={list(d.stages)} must keep the order {list(STAGES)}")
    if "experts" in d.stages and not d.base:
        fail("distill.stages has 'experts' but distill.base is not set; pass distill.base=<pretrained run or "
             "checkpoint directory>")
    if "opd" in d.stages:
        if not (d.student or d.base):
            fail("the OPD stage needs a student: set distill.base (or distill.student) to a checkpoint")
        if "experts" not in d.stages and not d.teachers.manifest:
            fail("distill.stages=[opd] without the expert stage needs distill.teachers.manifest=<teachers.json>")
    e = d.experts
    if e.per_domain < 1 or e.max_steps < 1:
        fail(f"distill.experts.per_domain={e.per_domain} and distill.experts.max_steps={e.max_steps} must be >= 1")
    if e.domains is not None and not e.domains:
        fail("distill.experts.domains is an empty list; use null for every domain")
    t = d.teachers
    if t.offload not in OFFLOAD_MODES:
        fail(f"distill.teachers.offload={t.offload!r} must be one of {OFFLOAD_MODES}")
    if t.group_size < 1:
        fail(f"distill.teachers.group_size={t.group_size} must be >= 1")
    if t.hidden_dtype not in HIDDEN_DTYPES:
        fail(f"distill.teachers.hidden_dtype={t.hidden_dtype!r} must be one of {HIDDEN_DTYPES}")
    o = d.opd
    for name in ("steps",):
        if getattr(o, name) < 1:
            fail(f"distill.opd.{name}={getattr(o, name)} must be >= 1")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(o, name) < 0:
            fail(f"distill.opd.{name}={getattr(o, name)} must be >= 0")
    if o.eval_prompts < 1:
        fail(f"distill.opd.eval_prompts={o.eval_prompts} must be >= 1")
    r = o.rollout
    if r.prompts_per_teacher < 1 or r.prompt_tokens < 1 or r.max_new_tokens < 1 or r.prompt_docs < 1:
        fail("distill.opd.rollout.{prompts_per_teacher, prompt_tokens, max_new_tokens, prompt_docs} must be >= 1")
    if r.prompt_tokens + r.max_new_tokens > job.model.max_seq_len:
        fail(f"distill.opd.rollout.prompt_tokens={r.prompt_tokens} + max_new_tokens={r.max_new_tokens} exceeds "
             f"model.max_seq_len={job.model.max_seq_len}; shorten the prompts or the rollouts")
    if not 0.0 < r.top_p <= 1.0 or r.temperature < 0:
        fail(f"distill.opd.rollout.top_p={r.top_p} must lie in (0, 1] and temperature={r.temperature} be >= 0")
    loss = o.loss
    if loss.kind not in LOSS_KINDS:
        fail(f"distill.opd.loss.kind={loss.kind!r} must be one of {LOSS_KINDS}")
    if not 0.0 <= loss.beta <= 1.0:
        fail(f"distill.opd.loss.beta={loss.beta} must lie in [0, 1]")
    if not loss.temperature > 0:
        fail(f"distill.opd.loss.temperature={loss.temperature} must be > 0")
    if loss.impl not in LOSS_IMPLS:
        fail(f"distill.opd.loss.impl={loss.impl!r} must be one of {LOSS_IMPLS}")
    if loss.impl == "tilelang" and job.train.device == "cpu":
        fail("distill.opd.loss.impl=tilelang needs CUDA but train.device=cpu; use impl=auto or torch")
    job.optim.validate()
