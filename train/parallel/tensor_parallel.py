"""Tensor-parallel building blocks from megatron-core, with the process group passed in.

Issue 5 (tensor parallel): megatron-core's `ColumnParallelLinear`, `RowParallelLinear`,
`VocabParallelEmbedding`, its region mappings and its vocab-parallel cross-entropy math. Each
builder takes a full single-device module, keeps this rank's slice of its weights (so a parallel
run starts from exactly the single-device weights) and keeps the parameter name `weight`.
megatron's layers run on CPU under gloo with `use_cpu_initialization=True` and
`gradient_accumulation_fusion=False` (megatron-core 0.16.1 and 0.19.2).

Replicated tensors read by head- or vocab-sharded math pass through `grad_sum_over_tp` (the model's
`to_heads` / `to_vocab_shards` seams):
identity forward, all-reduced gradient (what megatron's `copy_to_tensor_model_parallel_region`
does, in comm.py because megatron's version drops the sum for non-contiguous gradients), so
every tensor-parallel rank holds the same full gradient of the replicated weights.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  VocabParallelEmbedding,
                                                  set_tensor_model_parallel_attributes)

from .comm import all_reduce_grad, all_reduce_value


def megatron_layer_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    """megatron's per-layer config for layers whose weights we copy in (no init, CPU allocation)."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=dtype,
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


def _no_init(weight: torch.Tensor) -> None:
    """Weights are copied from the single-device module instead."""


def _row_slice(full: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    parts = full.detach().chunk(dist.get_world_size(group), dim=dim)
    return parts[dist.get_rank(group)]


@torch.no_grad()
def _copy_shard(shard: torch.Tensor, full: torch.Tensor, group: dist.ProcessGroup, dim: int) -> None:
    """Copy this rank's slice and tag it (megatron-core 0.16 tags only the weights it initializes,
    0.19 tags every weight)."""
    shard.copy_(_row_slice(full, group, dim))
    if not getattr(shard, "tensor_model_parallel", False):
        set_tensor_model_parallel_attributes(shard, is_parallel=True, dim=dim, stride=1)


class ColumnParallelProjection(ColumnParallelLinear):
    """megatron's ColumnParallelLinear returning only the output (nn.Linear's call contract)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallelProjection(RowParallelLinear):
    """megatron's RowParallelLinear (input already split) returning only the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def column_parallel(linear: nn.Linear, group: dist.ProcessGroup) -> ColumnParallelProjection:
    """nn.Linear [out, in] -> this rank's out/tp rows; the input gradient is all-reduced."""
    weight = linear.weight
    layer = ColumnParallelProjection(
        linear.in_features, linear.out_features, config=megatron_layer_config(group.size(), weight.dtype),
        init_method=_no_init, bias=False, gather_output=False, tp_group=group)
    _copy_shard(layer.weight, weight, group, 0)
    return layer.to(weight.device)


def row_parallel(linear: nn.Linear, group: dist.ProcessGroup) -> RowParallelProjection:
    """nn.Linear [out, in] -> this rank's in/tp columns; the output is all-reduced."""
    weight = linear.weight
    layer = RowParallelProjection(
        linear.in_features, linear.out_features, config=megatron_layer_config(group.size(), weight.dtype),
        init_method=_no_init, bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=group)
    _copy_shard(layer.weight, weight, group, 1)
    return layer.to(weight.device)


def vocab_parallel_embedding(embedding: nn.Embedding, group: dist.ProcessGroup) -> VocabParallelEmbedding:
    """nn.Embedding [V, d] -> rows [r*V/tp, (r+1)*V/tp); lookups outside them add zero."""
    weight = embedding.weight
    layer = VocabParallelEmbedding(
        embedding.num_embeddings, embedding.embedding_dim, init_method=_no_init,
        config=megatron_layer_config(group.size(), weight.dtype), tp_group=group)
    _copy_shard(layer.weight, weight, group, 0)
    return layer.to(weight.device)


def shard_parameter_rows(module: nn.Module, name: str, group: dist.ProcessGroup) -> None:
    """Replace parameter `name` of `module` by this rank's block of rows (dim 0), tagged as
    tensor-parallel for DeepSpeed's norm and megatron's checkpointing."""
    full = getattr(module, name)
    shard = nn.Parameter(_row_slice(full, group, 0).clone(), requires_grad=full.requires_grad)
    set_tensor_model_parallel_attributes(shard, is_parallel=True, dim=0, stride=1)
    setattr(module, name, shard)


def grad_sum_over_tp(group: dist.ProcessGroup):
    """x -> x; its gradient is summed over the group (a replicated tensor read by every shard)."""
    return partial(all_reduce_grad, group=group)


def sum_over_tp(group: dist.ProcessGroup):
    """x -> sum of x over the group; gradient passes through unchanged (replicated consumers)."""
    return partial(all_reduce_value, group=group)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits; megatron's `VocabParallelCrossEntropy`
    steps with an explicit group (megatron's own autograd function reads its global TP group)."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, group: dist.ProcessGroup):
        # megatron's steps overwrite the logits in place: callers pass a copy.
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits_NV)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        local_vocab = logits.shape[-1]
        start = dist.get_rank(group) * local_vocab
        target_mask, masked_target, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target_N, logits_max, start, start + local_vocab))
        dist.all_reduce(predicted, group=group)
        dist.all_reduce(sum_exp, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
        grad = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target, update, grad_input, grad_loss)
        return grad, None, None


class VocabParallelCrossEntropyLoss:
    """Drop-in for the model's `cross_entropy(logits_BTV, labels_BT)` with vocab-sharded logits:
    mean over labels != -100 (0 when there are none), identical on every tensor-parallel rank."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        logits = logits_BTV.reshape(-1, logits_BTV.shape[-1])
        labels = labels_BT.reshape(-1)
        keep = labels != -100
        if not bool(keep.any()):
            return logits.sum() * 0.0
        # Boolean indexing copies, so the caller's logits survive megatron's in-place steps.
        per_token = _VocabParallelCE.apply(logits[keep].float(), labels[keep], self.group)
        return per_token.mean()
