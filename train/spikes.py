"""Loss-spike detection (issue: resume & spikes; spec §3.8.4 "dynamic trigger").

Rolling statistics over the last `window` normal steps (OLMo-core: 128 steps, 6 sigma) of the
loss and of the log gradient norm, plus Megatron's rule (loss > `early_max_factor` x the largest
loss of the first `early_steps` steps). A loss beyond `severe_sigma`, a non-finite loss or the
Megatron rule is severe: the trainer rolls back to the last known-good checkpoint and turns
anticipatory routing on. Spikes never enter the statistics. The state is saved in checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

ACTIONS = ("record", "skip", "rollback")


@dataclass
class SpikeConfig:
    """Thresholds and what to do on a spike."""

    enabled: bool = True
    """Watch loss and gradient norm for spikes."""
    window: int = 128
    """Normal steps in the rolling statistics."""
    min_history: int = 16
    """Steps of history before any spike is flagged."""
    sigma: float = 6.0
    """A loss (or log grad norm) more than sigma standard deviations above the rolling mean is a spike."""
    severe_sigma: float = 12.0
    """A loss beyond this many standard deviations is severe (rollback when action=rollback)."""
    early_steps: int = 100
    """Steps whose largest loss anchors the Megatron rule."""
    early_max_factor: float = 10.0
    """A loss above this factor x the early maximum is severe (Megatron's rule)."""
    min_std: float = 0.01
    """Floor on the loss standard deviation (a flat loss does not make every wiggle a spike)."""
    action: str = "rollback"
    """'record' (event only), 'skip' (drop the step's update) or 'rollback' (skip; on a severe spike
    roll back to the last known-good checkpoint and turn anticipatory routing on)."""
    anticipatory_steps: int = 50
    """Steps anticipatory routing stays on after a rollback (0 = never turn it on)."""
    lookahead: int = 2
    """Delta t: routing indices of step t come from the parameters of step t - lookahead."""
    inject_step: int = 0
    """Fault injection for testing the machinery: at this step (0 = never) ..."""
    inject_kind: str = "lr"
    """... 'lr' multiplies the LR by inject_scale for one step; 'batch' replaces the labels by
    random tokens."""
    inject_scale: float = 200.0
    """LR factor of an 'lr' injection."""

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"train.spikes.action={self.action!r} must be one of {ACTIONS}")
        if self.inject_kind not in ("lr", "batch"):
            raise ValueError(f"train.spikes.inject_kind={self.inject_kind!r} must be 'lr' or 'batch'")
        if self.window < 2 or self.min_history < 2:
            raise ValueError("train.spikes.window and train.spikes.min_history must be >= 2")
        if self.lookahead < 1:
            raise ValueError(f"train.spikes.lookahead={self.lookahead} must be >= 1")


@dataclass
class Spike:
    """One detected spike."""
    step: int
    metric: str          # "loss" or "grad_norm"
    value: float
    mean: float
    std: float
    severe: bool

    @property
    def message(self) -> str:
        return (f"{self.metric} {self.value:.4g} vs rolling mean {self.mean:.4g} ± {self.std:.3g}"
                f"{' (severe)' if self.severe else ''}")


class SpikeDetector:
    """Rolling mean/std of the loss and log grad norm over normal steps."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.losses: deque = deque(maxlen=cfg.window)
        self.log_norms: deque = deque(maxlen=cfg.window)
        self.early_max = -math.inf
        self.seen = 0

    @staticmethod
    def _stats(values) -> tuple[float, float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0

    def check(self, step: int, loss: float, grad_norm: Optional[float]) -> Optional[Spike]:
        """Classify this step (before its update is applied); normal steps enter the statistics."""
        cfg = self.cfg
        if not cfg.enabled:
            return None
        if not math.isfinite(loss):
            return Spike(step, "loss", loss, math.nan, math.nan, severe=True)
        spike = None
        if len(self.losses) >= cfg.min_history:
            mean, std = self._stats(self.losses)
            std = max(std, cfg.min_std)
            z = (loss - mean) / std
            megatron = self.seen >= cfg.early_steps and loss > cfg.early_max_factor * self.early_max
            if z > cfg.sigma or megatron:
                spike = Spike(step, "loss", loss, mean, std, severe=z > cfg.severe_sigma or megatron)
            elif grad_norm is not None and grad_norm > 0 and len(self.log_norms) >= cfg.min_history:
                gmean, gstd = self._stats(self.log_norms)
                if (math.log(grad_norm) - gmean) / max(gstd, 1e-3) > cfg.sigma:
                    spike = Spike(step, "grad_norm", grad_norm, math.exp(gmean), gstd, severe=False)
        if spike is None:
            self.losses.append(loss)
            if grad_norm is not None and grad_norm > 0 and math.isfinite(grad_norm):
                self.log_norms.append(math.log(grad_norm))
            if self.seen < cfg.early_steps:
                self.early_max = max(self.early_max, loss)
            self.seen += 1
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "log_norms": list(self.log_norms),
                "early_max": self.early_max, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.log_norms = deque(state["log_norms"], maxlen=self.cfg.window)
        self.early_max, self.seen = state["early_max"], state["seen"]
