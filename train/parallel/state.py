"""Full (unsharded) parameters of a parallelized model, gathered with plain collectives.

megatron's `dist_checkpointing` needs CUDA (issue 5), so this path uses only all_gather over the
groups of `ParallelDims`: tensor-parallel shards are concatenated along their megatron
`partition_dim`, expert shards along the expert dim. The result has the single-device model's
names and shapes (for checkpoints and for parity checks against the single-device oracle).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from .dims import ParallelDims
from .expert_parallel import is_expert_param


def _all_gather_cat(t: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


@torch.no_grad()
def gather_full_parameters(model: nn.Module, dims: ParallelDims) -> Dict[str, torch.Tensor]:
    """name -> full parameter (CPU, fp32) on every rank; collective: call on all ranks."""
    full = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and dims.tp > 1:
            t = _all_gather_cat(t, dims.tp_group, p.partition_dim)
        if is_expert_param(p) and dims.ep > 1:
            t = _all_gather_cat(t, dims.ep_group, 0)
        full[name] = t.float().cpu().clone()   # never an alias of the live parameter
    return full
