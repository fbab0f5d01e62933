"""Who this process is in the run: single process, or one rank of a parallel layout.

`RunContext` hides the difference from the loop: ranks, the data-parallel slice, barriers and
the reductions the loop needs (sums over data-parallel ranks, a run-wide "stop" vote).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from train.parallel import ParallelConfig, ParallelDims, init_parallel, validate_layout


@dataclass
class RunContext:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    dims: Optional[ParallelDims] = None

    @property
    def distributed(self) -> bool:
        return self.dims is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_over_dp(self, values: list) -> list:
        """Element-wise sum over the data-parallel ranks (tensor-parallel peers hold the same rows)."""
        if not self.distributed or self.dp_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dims.dp_group)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (signals arrive at different times)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_error(self, message: Optional[str]) -> Optional[str]:
        """Rank 0's error message (or None) on every rank, so all ranks fail together."""
        if not self.distributed:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (cuda when available) for one process."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_context(cfg: ParallelConfig, model_args, device_name: str) -> RunContext:
    """Single process when WORLD_SIZE is 1, else start torch.distributed and megatron's groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        validate_layout(cfg, 1, model_args)
        return RunContext(0, 1, 0, 1, pick_device(device_name))
    dims = init_parallel(cfg, model_args)
    return RunContext(dims.rank, dims.world_size, dims.dp_rank, dims.dp, dims.device, dims)
