"""Expert parallelism: a shard of the routed experts per rank, tokens exchanged all-to-all.

Issue 5 (expert parallel): experts are sharded over the EP group, tokens travel with an
all-to-all, no token is dropped, and expert gradients are reduced over the expert-data-parallel
group (`engine.reduce_expert_grads`). The model's `GroupedExperts` keeps its class, its grouped
math (`model.moe.expert_forward`: sort, batched matmuls, SwiGLU clamp, FP4 QAT) and its parameter
names `...ffn.experts.w1/w3/w2`; its stacks are cut to the local shard and two module hooks wrap
its forward (the pattern of TorchTitan's `ExpertParallel`):

- before: with tp > 1 each tensor-parallel rank keeps its 1/tp of the (replicated) tokens; with
  ep > 1 every (token, choice) pair is sent, with its routing weight, to the rank owning its
  expert, and arrives as a one-choice token for a local expert id;
- after: the results travel back, each token's K results are summed in the order the model sums
  them, and the tensor-parallel ranks all-gather their token slices.

Every expert parameter is tagged `expert_parallel = True`: the engine keeps them out of
DeepSpeed and sums their gradients over the expert-data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .comm import all_to_all, exchange_counts, gather_rows, split_rows
from .dims import ParallelDims

EXPERT_WEIGHT_NAMES = ("w1", "w3", "w2")


@dataclass
class _Dispatch:
    """What the combine step needs from the dispatch step of the same call."""
    tokens_before_tp_split: int
    tokens: int
    choices: int
    inverse_order: Optional[torch.Tensor]
    send_counts: Optional[list]
    recv_counts: Optional[list]


class ExpertDispatcher:
    """Forward pre-hook and forward hook that turn a `GroupedExperts` shard into the EP layer."""

    def __init__(self, dims: ParallelDims, n_experts: int):
        self.dims = dims
        self.n_experts = n_experts
        self.local_experts = n_experts // dims.ep
        self._pending: list = []

    def dispatch(self, module: nn.Module, inputs: tuple) -> tuple:
        """(x [N, D], indices [N, K] global ids, weights [N, K]) -> local one-choice tokens."""
        x_ND, indices_NK, weights_NK = inputs
        dims = self.dims
        total = x_ND.shape[0]
        if dims.tp > 1:
            x_ND = split_rows(x_ND, dims.tp_group)
            indices_NK = split_rows(indices_NK, dims.tp_group)
            weights_NK = split_rows(weights_NK, dims.tp_group)
        N, K = indices_NK.shape
        if dims.ep == 1:
            self._pending.append(_Dispatch(total, N, K, None, None, None))
            return x_ND, indices_NK, weights_NK

        flat_expert = indices_NK.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        per_expert = torch.bincount(flat_expert, minlength=self.n_experts)
        send_RL = per_expert.view(dims.ep, self.local_experts)
        recv_RL = exchange_counts(send_RL, dims.ep_group)
        send_counts = send_RL.sum(1).tolist()
        recv_counts = recv_RL.sum(1).tolist()
        routed_x = all_to_all(x_ND[order // K], send_counts, recv_counts, dims.ep_group)
        routed_w = all_to_all(weights_NK.reshape(-1)[order].unsqueeze(1), send_counts,
                              recv_counts, dims.ep_group)
        # Received rows are ordered by (source rank, local expert).
        local_ids = torch.arange(self.local_experts, device=x_ND.device).repeat(dims.ep)
        local_expert = torch.repeat_interleave(local_ids, recv_RL.reshape(-1))
        self._pending.append(_Dispatch(total, N, K, torch.argsort(order), send_counts, recv_counts))
        if routed_x.shape[0] == 0:
            # model.moe.expert_forward cannot reshape zero rows (view(0, K, -1)); one zero-weight
            # row contributes exactly zero output and gradient and is dropped in `combine`. It is
            # appended, so the backward still runs the all-to-all the peers wait for.
            routed_x = torch.cat((routed_x, routed_x.new_zeros(1, routed_x.shape[1])))
            routed_w = torch.cat((routed_w, routed_w.new_zeros(1, 1)))
            local_expert = local_expert.new_zeros(1)
        return routed_x, local_expert.unsqueeze(1), routed_w

    def combine(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Local results -> y [N, D] of this rank's tokens (all tokens again with tp > 1)."""
        state = self._pending.pop()
        dims = self.dims
        y = output
        if dims.ep > 1:
            back = all_to_all(output[: sum(state.recv_counts)], state.recv_counts, state.send_counts,
                              dims.ep_group)
            y = back.index_select(0, state.inverse_order)
            y = y.view(state.tokens, state.choices, output.shape[-1]).sum(1)
        if dims.tp > 1:
            y = gather_rows(y, state.tokens_before_tp_split, dims.tp_group)
        return y


def shard_experts(experts: nn.Module, dims: ParallelDims) -> Optional[ExpertDispatcher]:
    """Cut a `GroupedExperts` (stacked w1/w3/w2 [E, ...]) to this rank's experts and wrap it.

    Rank `dims.ep_rank` keeps experts [ep_rank*E/ep, (ep_rank+1)*E/ep). Returns the dispatcher
    (None when tp = ep = 1: nothing to exchange). Parameters are tagged `expert_parallel`.
    """
    n_experts = experts.w1.shape[0]
    if n_experts % dims.ep:
        raise ValueError(f"parallel.ep={dims.ep} must divide the {n_experts} routed experts")
    local = n_experts // dims.ep
    start = dims.ep_rank * local
    for name in EXPERT_WEIGHT_NAMES:
        full = getattr(experts, name)
        shard = nn.Parameter(full.detach()[start: start + local].clone(), requires_grad=full.requires_grad)
        shard.expert_parallel = True
        setattr(experts, name, shard)
    if dims.tp == 1 and dims.ep == 1:
        return None
    dispatcher = ExpertDispatcher(dims, n_experts)
    experts.register_forward_pre_hook(dispatcher.dispatch)
    experts.register_forward_hook(dispatcher.combine)
    return dispatcher


def is_expert_param(param: torch.Tensor) -> bool:
    """True for the routed-expert stacks handled outside DeepSpeed."""
    return bool(getattr(param, "expert_parallel", False))
