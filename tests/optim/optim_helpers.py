"""Shared pieces of the optimizer tests: a small module tree with V4 parameter names, a reference Muon
written straight from spec §3.11 (one matrix at a time), and gradient generators."""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from train.optim.grouping import ParamGrouping
from train.optim.newton_schulz import plain_newton_schulz


class MiniBlock(nn.Module):
    def __init__(self, dim: int, q_rank: int, heads_dim: int, o_groups: int, o_rank: int, experts: int, inter: int):
        super().__init__()
        self.o_groups = o_groups
        self.attn_norm = nn.Module()
        self.attn_norm.weight = nn.Parameter(torch.ones(dim))
        self.ffn_norm = nn.Module()
        self.ffn_norm.weight = nn.Parameter(torch.ones(dim))
        self.hc_attn_fn = nn.Parameter(torch.randn(24, 4 * dim) * 0.02)
        self.hc_attn_base = nn.Parameter(torch.zeros(24))
        self.hc_attn_scale = nn.Parameter(torch.full((3,), 0.01))
        self.attn = nn.Module()
        self.attn.wq_a = nn.Linear(dim, q_rank, bias=False)
        self.attn.wq_b = nn.Linear(q_rank, heads_dim, bias=False)
        self.attn.wo_a = nn.Linear(heads_dim // o_groups, o_groups * o_rank, bias=False)
        self.attn.wo_b = nn.Linear(o_groups * o_rank, dim, bias=False)
        self.attn.attn_sink = nn.Parameter(torch.zeros(4))
        self.attn.compressor = nn.Module()
        self.attn.compressor.ape = nn.Parameter(torch.randn(4, dim) * 0.02)
        self.ffn = nn.Module()
        self.ffn.gate = nn.Module()
        self.ffn.gate.weight = nn.Parameter(torch.randn(experts, dim) / math.sqrt(dim))
        self.ffn.gate.register_buffer("bias", torch.zeros(experts))  # balancing bias: a buffer, as in V4
        self.ffn.experts = nn.Module()
        self.ffn.experts.w1 = nn.Parameter(torch.randn(experts, inter, dim) / math.sqrt(dim))
        self.ffn.experts.w3 = nn.Parameter(torch.randn(experts, inter, dim) / math.sqrt(dim))
        self.ffn.experts.w2 = nn.Parameter(torch.randn(experts, dim, inter) / math.sqrt(inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.cat([x] * 4, dim=-1) @ self.hc_attn_fn.T
        x = x + (mix[..., :1] * self.hc_attn_scale[0] + self.hc_attn_base[0]) + self.attn.compressor.ape.mean(0)
        h = x * self.attn_norm.weight
        q = self.attn.wq_b(self.attn.wq_a(h))
        q = q.unflatten(-1, (self.o_groups, -1))
        wo_a = self.attn.wo_a.weight.unflatten(0, (self.o_groups, -1))
        o = torch.einsum("btgc,grc->btgr", q, wo_a).flatten(-2)
        x = x + self.attn.wo_b(o) * torch.sigmoid(self.attn.attn_sink).mean()
        h = x * self.ffn_norm.weight
        # V4's sqrt(softplus) scores (§3.8.1). A softmax would make every gate gradient row-sum to zero, leaving
        # a null direction that Newton–Schulz amplifies from rounding noise (3.4^8 ≈ 1.8e4).
        scores = torch.sqrt(F.softplus(h @ self.ffn.gate.weight.T + self.ffn.gate.bias))
        a = torch.einsum("btd,eid->btei", h, self.ffn.experts.w1)
        u = torch.einsum("btd,eid->btei", h, self.ffn.experts.w3)
        y = torch.einsum("btei,edi->bted", F.silu(a) * u, self.ffn.experts.w2)
        return x + (scores.unsqueeze(-1) * y).sum(-2)


class MiniV4(nn.Module):
    """A small module tree whose parameter names and layouts follow the V4 checkpoint (common.md)."""

    def __init__(self, vocab=64, dim=32, q_rank=16, heads_dim=48, o_groups=2, o_rank=8, experts=4, inter=12, layers=2):
        super().__init__()
        self.args = SimpleNamespace(o_groups=o_groups)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            MiniBlock(dim, q_rank, heads_dim, o_groups, o_rank, experts, inter) for _ in range(layers)
        )
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x * self.norm.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def make_batch(seed: int, batch: int = 4, seq: int = 8, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def reference_muon_step(grouping: ParamGrouping, momenta: dict, lr: float, weight_decay: float,
                        momentum: float = 0.95, update_rms: float = 0.18) -> None:
    """Spec §3.11 written out one matrix at a time, textbook NS in fp32 (no batching, no distribution)."""
    with torch.no_grad():
        for m in grouping.muon:
            p = m.param
            if p.grad is None:
                continue
            buf = momenta.setdefault(m.name, torch.zeros_like(p))
            buf.mul_(momentum).add_(p.grad)
            lookahead = p.grad + momentum * buf
            blocks = m.as_blocks(lookahead)
            update = torch.stack([plain_newton_schulz(b, dtype=torch.float32) for b in blocks]).reshape(p.shape)
            scale = math.sqrt(max(blocks.shape[-2], blocks.shape[-1])) * update_rms
            p.mul_(1 - lr * weight_decay).sub_(update, alpha=lr * scale)
