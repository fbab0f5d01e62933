"""Autograd-aware collectives with uneven splits that also run under gloo on CPU.

megatron-core's own `all_to_all` and first-dim gathers allocate on `torch.cuda.current_device()`
(megatron-core 0.16.1, tensor_parallel/mappings.py), so the expert-parallel path uses these
small functions instead; they allocate on the input's device. torch's
`torch.distributed.nn.functional.all_to_all_single` is deprecated in torch 2.13.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send[:j]), sum(send[:j+1])) go to group rank j; the reverse exchange in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = list(send_counts), list(recv_counts), group
        return _all_to_all(x, ctx.send_counts, ctx.recv_counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send_counts: list, recv_counts: list,
                group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out


def all_to_all(x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange row blocks of x [rows, ...] with every rank of `group` (variable block sizes).

    send_counts[j]: rows this rank sends to group rank j (they must sum to x.shape[0]);
    recv_counts[j]: rows it receives from rank j. Returns [sum(recv_counts), ...].
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, send_counts, recv_counts, group)


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """send_counts [world, ...] int64: block j goes to rank j. Returns the blocks received."""
    if dist.get_world_size(group) == 1:
        return send_counts
    received = torch.empty_like(send_counts)
    dist.all_to_all_single(received, send_counts.contiguous(), group=group)
    return received


def _row_ranges(rows: int, world: int) -> list:
    """Row counts of a near-even split: the first rows % world ranks get one row more."""
    base, extra = divmod(rows, world)
    return [base + (1 if j < extra else 0) for j in range(world)]


class _SplitRows(torch.autograd.Function):
    """Keep this rank's rows of a tensor that is identical on every rank of the group; the
    backward all-gathers the row gradients so every rank holds the full gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.counts = _row_ranges(x.shape[0], dist.get_world_size(group))
        start = sum(ctx.counts[: dist.get_rank(group)])
        return x[start: start + ctx.counts[dist.get_rank(group)]].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_rows(grad, ctx.counts, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (rank order); the backward keeps this rank's rows, since the
    consumers after the gather are replicated and produce the same full gradient everywhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.counts = group, list(counts)
        return _gather_rows(x, ctx.counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.counts[: dist.get_rank(ctx.group)])
        return grad[start: start + ctx.counts[dist.get_rank(ctx.group)]].contiguous(), None, None


def _gather_rows(x: torch.Tensor, counts: list, group: dist.ProcessGroup) -> torch.Tensor:
    # gloo's all_gather needs equal sizes: pad every share to the largest one, then trim.
    rows = max(counts)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], 0)


def split_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's near-even share of the rows of a replicated tensor (autograd: all-gather)."""
    if dist.get_world_size(group) == 1:
        return x
    return _SplitRows.apply(x, group)


def gather_rows(x: torch.Tensor, total_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `split_rows`: all ranks' rows in rank order, `total_rows` in all."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherRows.apply(x, _row_ranges(total_rows, dist.get_world_size(group)), group)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; gradient summed over the group (megatron's copy-to-TP-region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _AllReduceValue(torch.autograd.Function):
    """Sum over the group forward; gradient passed through (megatron's reduce-from-TP-region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # A fresh contiguous buffer: megatron-core 0.16.1's `_reduce` all-reduces `input_.contiguous()`
    # but returns `input_`, losing the sum for non-contiguous tensors (0.19 returns the copy).
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_reduce_grad(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x unchanged; its gradient is summed over the group (replicated input, sharded consumers)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceGrad.apply(x, group)


def all_reduce_value(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of x over the group; the gradient passes through (replicated consumers)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceValue.apply(x, group)
