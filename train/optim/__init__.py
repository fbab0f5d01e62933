"""Optimizers of v4forge: Muon with hybrid Newton–Schulz plus AdamW, and the LR schedule (spec §3.11, §2.2)."""

from train.optim.build import build_optimizer
from train.optim.config import OptimConfig
from train.optim.grouping import ParamGrouping, param_groups_for
from train.optim.muon import Muon
from train.optim.newton_schulz import hybrid_newton_schulz
from train.optim.orthogonalize import orthogonalize_blocks
from train.optim.schedule import lr_at
from train.optim.zero import check_no_deepspeed_muon_tags, zero_config_for_muon

__all__ = [
    "Muon",
    "OptimConfig",
    "ParamGrouping",
    "build_optimizer",
    "check_no_deepspeed_muon_tags",
    "hybrid_newton_schulz",
    "lr_at",
    "orthogonalize_blocks",
    "param_groups_for",
    "zero_config_for_muon",
]
