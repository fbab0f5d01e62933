"""Build the V4 optimizer from a model and an OptimConfig (spec §3.11)."""

import logging

import torch.distributed as dist
from torch import nn

from train.optim.config import OptimConfig
from train.optim.grouping import param_groups_for
from train.optim.muon import Muon

logger = logging.getLogger(__name__)


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    dp_group: dist.ProcessGroup | None = None,
    expert_dp_group: dist.ProcessGroup | None = None,
    tp_group: dist.ProcessGroup | None = None,
    expert_tp_group: dist.ProcessGroup | None = None,
) -> Muon:
    """Group the model's parameters (train.optim.grouping), log the grouping table and return a Muon.

    The process groups are those of the layout the model runs in (None: one process); `optimizer.grouping`
    holds the grouping, `optimizer.grouping.table()` the table written to the run log.
    """
    grouping = param_groups_for(model, cfg)
    logger.info("optimizer parameter groups:\n%s", grouping.table())
    return Muon(
        grouping,
        cfg,
        dp_group=dp_group,
        expert_dp_group=expert_dp_group,
        tp_group=tp_group,
        expert_tp_group=expert_tp_group,
    )
