"""Our Muon + AdamW (train.optim) as the two optimizers of the parallel engine (spec §3.11).

The engine takes one optimizer for the dense parameters (DeepSpeed ZeRO wraps it: the Muon
partitions the look-ahead over the ZeRO group and gathers tensor-parallel shards) and one for the
expert masters (experts orthogonalised per expert, the Newton–Schulz work shared over the
expert-data-parallel group, whose ranks hold identical reduced gradients).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Tuple

import torch

from train.optim import Muon, OptimConfig, param_groups_for

from .dims import ParallelDims
from .engine import NamedParams


def _named(params: NamedParams) -> SimpleNamespace:
    """The model-like view `param_groups_for` reads (names and shapes only)."""
    return SimpleNamespace(named_parameters=lambda: iter(params), args=None)


def muon_optimizer_fns(cfg: OptimConfig, dims: ParallelDims, o_groups: int
                       ) -> Tuple[Callable[[NamedParams], torch.optim.Optimizer],
                                  Callable[[NamedParams], torch.optim.Optimizer]]:
    """(dense_optimizer_fn, expert_optimizer_fn) for `parallelize`.

    o_groups: the model's `o_groups`; each rank's `wo_a` holds o_groups / tp of its row blocks.
    """
    def dense(named: NamedParams) -> Muon:
        grouping = param_groups_for(_named(named), cfg, o_groups=o_groups // dims.tp)
        return Muon(grouping, cfg, dp_group=dims.dp_group, tp_group=dims.tp_group)

    def experts(named: NamedParams) -> Muon:
        grouping = param_groups_for(_named(named), cfg)
        return Muon(grouping, cfg, expert_dp_group=dims.edp_group)

    return dense, experts
