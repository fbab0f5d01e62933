"""Learning-rate schedule: linear warmup → constant → cosine decay to min_lr (spec §2.2)."""

import math

from train.optim.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Warmup ramps linearly to cfg.lr over cfg.warmup_steps (step 0 gets lr/warmup_steps, not 0, so the
    first step moves the weights); the LR then stays at cfg.lr until decay_start_fraction·total_steps
    and follows a half cosine down to cfg.min_lr at the last step.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps}: must be positive")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = max(cfg.warmup_steps, int(cfg.decay_start_fraction * total_steps))
    if step < decay_start:
        return cfg.lr
    decay_steps = max(1, total_steps - 1 - decay_start)
    progress = min(1.0, (step - decay_start) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
