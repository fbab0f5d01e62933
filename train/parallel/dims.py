"""`ParallelDims`: the process groups of one layout, built by megatron-core's `parallel_state`.

Issue 5: process groups come from megatron-core (TP, DP, EP and expert-data-parallel) and are
handed down explicitly; nothing below `init_parallel` reads megatron's module globals. The
groups are those of `ParallelConfig`'s docstring (tensor-parallel ranks adjacent; experts on
megatron's separate expert grid with expert-tensor-parallel size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ParallelConfig, validate_layout


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, ranks and process groups of one layout (pass this object down, never globals)."""

    world_size: int
    """Number of processes."""
    rank: int
    """Global rank of this process."""
    tp: int
    """Tensor-parallel size."""
    ep: int
    """Expert-parallel size."""
    dp: int
    """Data-parallel size of the dense weights (world_size / tp)."""
    tp_rank: int
    """Rank inside the tensor-parallel group."""
    dp_rank: int
    """Rank inside the dense data-parallel group: this process reads global-batch slice dp_rank."""
    ep_rank: int
    """Rank inside the expert-parallel group: it holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)."""
    tp_group: dist.ProcessGroup
    """Ranks that split attention heads, the shared expert and the vocabulary (same tokens)."""
    dp_group: dist.ProcessGroup
    """Ranks holding the same dense shard; DeepSpeed averages dense gradients over it."""
    ep_group: dist.ProcessGroup
    """Ranks exchanging tokens all-to-all, each holding a different expert shard."""
    edp_group: dist.ProcessGroup
    """Ranks holding the same expert shard; expert gradients are summed over it."""
    device: torch.device
    """Device of this rank (cuda:LOCAL_RANK with NCCL, cpu with gloo)."""
    precision: str
    """Resolved engine precision: "fp32" or "bf16"."""
    zero_stage: int
    """DeepSpeed ZeRO stage of the dense weights."""

    @property
    def edp(self) -> int:
        """Size of the expert-data-parallel group (world_size / ep)."""
        return self.world_size // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_backend(cfg: ParallelConfig) -> str:
    """nccl when CUDA is present and backend is "auto", else gloo (or the explicit choice)."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(cfg: ParallelConfig, model_args, timeout_minutes: int = 30) -> ParallelDims:
    """Validate the layout, start torch.distributed (torchrun env) and build megatron's groups.

    model_args: the model's `ModelArgs`, used only for validation. Call once per process, before
    building the model's parallel form; `destroy_parallel` undoes it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg, world_size, model_args)
    backend = resolve_backend(cfg)
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend='nccl' needs CUDA; use backend=gloo on CPU")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:   # a single process started without torchrun
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                              RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if backend == "nccl" else None)
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but torch.distributed has {dist.get_world_size()} ranks")

    from megatron.core import parallel_state as ps   # imported late: megatron's import is slow

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # Gloo twins of the NCCL groups are only used by megatron's own distributed optimizer.
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return ParallelDims(
        world_size=world_size,
        rank=dist.get_rank(),
        tp=cfg.tp,
        ep=cfg.ep,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
        device=device,
        precision=precision,
        zero_stage=cfg.zero_stage,
    )


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and (unless `keep_process_group`) the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
