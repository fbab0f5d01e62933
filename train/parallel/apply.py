"""`parallelize`: the one function that applies parallelism to a single-device model.

Fixed order (style rule 2): tensor parallel -> expert parallel -> activation checkpointing ->
compile -> ZeRO / data parallel. Every rank builds the same single-device model (same seed), and
each step keeps that rank's slice of it, so a parallel run starts from exactly the single-device
weights.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .dims import ParallelDims
from .engine import NamedParams, ParallelEngine, split_params
from .v4_plan import apply_expert_parallel, apply_tensor_parallel


def shard_model(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Tensor then expert parallelism, in place; the model moves to `dims.device`."""
    apply_tensor_parallel(model, dims)
    apply_expert_parallel(model, dims)
    return model.to(dims.device)


def parallelize(model: nn.Module, dims: ParallelDims,
                dense_optimizer_fn: Callable[[NamedParams], torch.optim.Optimizer],
                expert_optimizer_fn: Callable[[NamedParams], torch.optim.Optimizer],
                micro_batch_size: int, grad_accum_steps: int = 1, grad_clip: float = 1.0,
                activation_checkpointing: Optional[Callable[[nn.Module], None]] = None,
                compile_model: Optional[Callable[[nn.Module], None]] = None) -> ParallelEngine:
    """TP -> EP -> activation checkpointing -> compile -> DeepSpeed engine.

    dense_optimizer_fn(named dense params) builds the optimizer DeepSpeed wraps (ZeRO-1/2);
    expert_optimizer_fn(named expert params) builds the experts' optimizer (fp32 masters).
    activation_checkpointing / compile_model act on the sharded model in place (the loop's own
    functions; None skips them). Returns the engine to train with.
    """
    shard_model(model, dims)
    if activation_checkpointing is not None:
        activation_checkpointing(model)
    if compile_model is not None:
        compile_model(model)
    dense, _ = split_params(model)
    return ParallelEngine(model, dims, dense_optimizer_fn(dense), expert_optimizer_fn,
                          micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                          grad_clip=grad_clip)
