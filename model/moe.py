"""DeepSeekMoE as modified in V4 (spec §3.8).

Legend: N tokens (flattened B*T), D hidden, E routed experts, K experts per token, I expert
hidden size, C slots per expert (the largest expert load of the batch; no token is dropped).

Gate: sqrt(softplus) scores in fp32; score layers pick top-K of (score + bias), hash layers read
the frozen `tid2eid`; a routing override (anticipatory routing, §3.8.4) replaces the indices on
score layers only, and the weights always come from the current scores, normalized to sum to
`route_scale`. Experts are computed grouped: tokens are sorted by expert into a [E, C, D]
buffer and multiplied with batched matmuls (no Python loop over experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .quant import fake_quant_fp4


def balanced_tid2eid(vocab_size: int, n_experts: int, k: int, seed: int,
                     token_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Frozen hash routing table [vocab, k] of k distinct experts per token id (spec §3.8.3).

    Without counts: a seeded permutation of token ids takes k consecutive experts (mod E) of a
    seeded expert permutation, so every expert gets vocab*k/E slots (±1). With unigram counts:
    greedy bin-packing, the most frequent token first onto the k least-loaded experts.
    """
    gen = torch.Generator().manual_seed(seed)
    if token_counts is None:
        token_rank = torch.randperm(vocab_size, generator=gen)
        expert_perm = torch.randperm(n_experts, generator=gen)
        slots = (token_rank[:, None] * k + torch.arange(k)[None, :]) % n_experts
        return expert_perm[slots]
    counts = token_counts.double().cpu()
    load = torch.zeros(n_experts, dtype=torch.float64)
    table = torch.empty(vocab_size, k, dtype=torch.long)
    tie_break = torch.rand(n_experts, generator=gen, dtype=torch.float64) * 1e-9
    for token in torch.argsort(counts, descending=True, stable=True).tolist():
        chosen = torch.topk(-(load + tie_break), k).indices
        table[token] = chosen
        load[chosen] += counts[token]
    return table


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(gate, limit)) * clamp(up, -limit, limit) (spec §3.8.2); limit 0 = no clamp."""
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    return F.silu(gate) * up


@dataclass
class Routing:
    """Router decision for N tokens."""
    indices_NK: torch.Tensor
    weights_NK: torch.Tensor
    scores_NE: torch.Tensor


class Gate(nn.Module):
    """Router: `weight` [E, D] (trained), buffer `bias` [E] (score layers) or `tid2eid` (hash)."""

    def __init__(self, args: ModelArgs, hash_layer: bool):
        super().__init__()
        self.hash_layer, self.k, self.route_scale = hash_layer, args.n_activated_experts, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(args.n_routed_experts))

    def forward(self, x_ND: torch.Tensor, token_ids_N: torch.Tensor,
                override_NK: Optional[torch.Tensor] = None) -> Routing:
        scores = torch.sqrt(F.softplus(x_ND.float() @ self.weight.float().t()))
        if self.hash_layer:
            indices = self.tid2eid[token_ids_N]
        elif override_NK is not None:
            indices = override_NK
        else:
            indices = (scores + self.bias.float()).topk(self.k, dim=-1).indices
        picked = scores.gather(-1, indices)
        weights = picked / picked.sum(-1, keepdim=True) * self.route_scale
        return Routing(indices, weights, scores)


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights; `forward(x, indices, weights)` -> weighted sum.

    An expert-parallel plan replaces this module with one holding a shard of the experts that
    exchanges tokens all-to-all around `expert_forward`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, I, D = args.n_routed_experts, args.moe_inter_dim, args.dim
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w3 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.swiglu_limit, self.fp4, self.fp4_block = args.swiglu_limit, args.qat_fp4_experts, args.fp4_block

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3, w2, fake-quantized to MXFP4 along the input dim when QAT is on."""
        if not self.fp4:
            return self.w1, self.w3, self.w2
        return tuple(fake_quant_fp4(w, self.fp4_block) for w in (self.w1, self.w3, self.w2))

    def forward(self, x_ND: torch.Tensor, indices_NK: torch.Tensor,
                weights_NK: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.expert_weights()
        return expert_forward(x_ND, indices_NK, weights_NK, w1, w3, w2, self.swiglu_limit)


def expert_forward(x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                   w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                   swiglu_limit: float) -> torch.Tensor:
    """y_n = sum_k W2_e (w_nk * SwiGLU(W1_e x_n, W3_e x_n)), e = indices[n, k]; grouped.

    Expert ids index the given weight stacks (0..E_local-1).
    """
    N, K = indices_NK.shape
    E = w1_EID.shape[0]
    flat_expert = indices_NK.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    counts = torch.bincount(flat_expert, minlength=E)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(N * K, device=x_ND.device) - starts[sorted_expert]
    capacity = int(counts.max()) if N * K else 0
    token = order // K
    buf = x_ND.new_zeros(E, capacity, x_ND.shape[-1])
    buf[sorted_expert, slot] = x_ND[token]
    hidden = swiglu(torch.bmm(buf, w1_EID.transpose(1, 2)), torch.bmm(buf, w3_EID.transpose(1, 2)),
                    swiglu_limit)
    slot_weight = x_ND.new_zeros(E, capacity)
    slot_weight[sorted_expert, slot] = weights_NK.reshape(-1)[order].to(x_ND.dtype)
    out = torch.bmm(hidden * slot_weight[..., None], w2_EDI.transpose(1, 2))
    per_choice = out.new_zeros(N * K, x_ND.shape[-1])      # out is bf16 under autocast
    per_choice[order] = out[sorted_expert, slot]
    return per_choice.view(N, K, x_ND.shape[-1]).sum(1)


class SharedExpert(nn.Module):
    """The one shared expert (w1, w3: D -> I; w2: I -> D), clamped like the routed ones."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.moe_inter_dim, bias=False)
        self.w2 = nn.Linear(args.moe_inter_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.moe_inter_dim, bias=False)
        self.swiglu_limit = args.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_limit))


@dataclass
class MoEAux:
    """Side outputs of one MoE layer."""
    indices_BTK: torch.Tensor
    balance_loss: Optional[torch.Tensor]


class MoE(nn.Module):
    """Gate + grouped routed experts + one shared expert; tracks expert load for bias balancing."""

    def __init__(self, args: ModelArgs, hash_layer: bool):
        super().__init__()
        self.hash_layer = hash_layer
        self.n_experts, self.k = args.n_routed_experts, args.n_activated_experts
        self.balance_alpha = 0.0 if hash_layer else args.balance_loss_alpha
        self.gate = Gate(args, hash_layer)
        self.experts = GroupedExperts(args)
        self.shared_experts = SharedExpert(args) if args.n_shared_experts else None
        # Tokens routed to each expert since the last bias update (no gradient, not saved).
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts), persistent=False)

    def forward(self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor,
                override_BTK: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEAux]:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        override = None if override_BTK is None else override_BTK.reshape(-1, self.k)
        routing = self.gate(x, token_ids_BT.reshape(-1), override)
        y = self.experts(x, routing.indices_NK, routing.weights_NK)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(routing.indices_NK.reshape(-1),
                                                   minlength=self.n_experts).to(self.expert_load.dtype)
        balance = None
        if self.balance_alpha > 0:
            balance = self._sequence_balance_loss(routing, B, T)
        return y.view(B, T, D), MoEAux(routing.indices_NK.view(B, T, self.k), balance)

    def _sequence_balance_loss(self, routing: Routing, B: int, T: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over the batch (spec §3.8.3, V3 form)."""
        E, K = self.n_experts, self.k
        chosen = torch.zeros(B * T, E, device=routing.scores_NE.device)
        chosen.scatter_(1, routing.indices_NK, 1.0)
        f = chosen.view(B, T, E).sum(1) * (E / (K * T))
        probs = routing.scores_NE / routing.scores_NE.sum(-1, keepdim=True)
        P = probs.view(B, T, E).mean(1)
        return self.balance_alpha * (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing step b_i += gamma * sign(mean_load - load_i), then reset load.

        `load` lets a distributed trainer pass the load summed over ranks; hash layers only reset.
        """
        load = self.expert_load if load is None else load
        if not self.hash_layer:
            self.gate.bias += gamma * torch.sign(load.mean() - load).to(self.gate.bias.dtype)
        self.expert_load.zero_()
