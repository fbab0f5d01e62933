"""Lightning indexer of CSA layers: top-k selection of compressed entries (spec §3.5).

Legend: B batch, T tokens, E compressed entries, H indexer heads, D indexer head dim, C q latent.
The indexer reads detached inputs (x and the attention's q latent), so the LM loss never reaches
it; it learns only from its KL loss against the main attention's distribution (V3.2 form).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .compressor import Compressor, EntryLayout
from .quant import fake_quant_fp4, hadamard
from .rope import apply_rope


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Indexer(nn.Module):
    """q^I = qr W_Iq, RoPE, Hadamard, FP4; keys from its own overlapping compressor; score
    I_ts = sum_h w_th ReLU(q^I_th . K^I_s) in fp32."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int,
                 rope_dim: int, norm_eps: float, fp4: bool, fp4_block: int):
        super().__init__()
        self.n_heads, self.head_dim, self.fp4, self.fp4_block = n_heads, head_dim, fp4, fp4_block
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, rope_dim=rope_dim,
                                     norm_eps=norm_eps, quant="hadamard_fp4" if fp4 else "hadamard",
                                     quant_block=fp4_block)
        # Tensor parallelism shards the heads; its plan sets `reduce_heads` to an all-reduce of the
        # head sum and `to_heads` (on the keys every local head reads) to a gradient all-reduce.
        self.reduce_heads = _identity
        self.to_heads = _identity

    def forward(self, x_BTD: torch.Tensor, q_latent_BTC: torch.Tensor, layout: EntryLayout,
                visible_BTE: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor,
                entry_cos: torch.Tensor, entry_sin: torch.Tensor,
                key_projections: Optional[tuple] = None) -> torch.Tensor:
        """Index scores [B, T, E] (fp32), -inf where an entry is not visible.

        key_projections: the compressor's per-token projections of every token so far (decode),
        when x_BTD holds only the new queries."""
        x, q_latent = x_BTD.detach().float(), q_latent_BTC.detach().float()
        if key_projections is None:
            key_projections = self.compressor.project(x)
        keys_BED = self.to_heads(self.compressor.pool(*key_projections, layout, entry_cos, entry_sin))
        q = (q_latent @ self.wq_b.weight.float().t()).unflatten(-1, (-1, self.head_dim))
        q = hadamard(apply_rope(q, q_cos[:, :, None], q_sin[:, :, None]))
        if self.fp4:
            q = fake_quant_fp4(q, self.fp4_block)
        head_weights = (x @ self.weights_proj.weight.float().t()) * (
            self.head_dim ** -0.5 * self.n_heads ** -0.5)
        per_head = torch.relu(torch.einsum("bthd,bed->bthe", q, keys_BED))
        scores = self.reduce_heads(torch.einsum("bthe,bth->bte", per_head, head_weights))
        return scores.masked_fill(~visible_BTE, float("-inf"))


def select_topk(scores_BTE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [B, T, E] of the top-min(k, E) visible entries per query.

    Ties (ReLU makes exact zeros common) go to the earliest entries: a stable sort makes the
    choice independent of how many invisible entries trail the row (prefill vs decode)."""
    E = scores_BTE.shape[-1]
    k = min(k, E)
    if k == 0:
        return torch.zeros_like(scores_BTE, dtype=torch.bool)
    top_val, top_idx = scores_BTE.sort(dim=-1, descending=True, stable=True)
    top_val, top_idx = top_val[..., :k], top_idx[..., :k]
    chosen = torch.zeros_like(scores_BTE, dtype=torch.bool)
    chosen.scatter_(-1, top_idx, torch.isfinite(top_val))
    return chosen


def indexer_kl_loss(attn_probs_BTE: torch.Tensor, index_scores_BTE: torch.Tensor,
                    candidates_BTE: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) over each query's candidate entries, mean over queries that have any.

    attn_probs_BTE: the main attention's probabilities on the compressed entries, summed over
    heads (detached here); renormalized over the candidates (spec §3.5 [infer]).
    """
    p = attn_probs_BTE.detach().float().masked_fill(~candidates_BTE, 0.0)
    mass = p.sum(-1, keepdim=True)
    rows = (mass.squeeze(-1) > 0) & candidates_BTE.any(-1)
    p = p / mass.clamp_min(torch.finfo(p.dtype).tiny)
    log_q = index_scores_BTE.masked_fill(~candidates_BTE, float("-inf")).log_softmax(-1)
    log_q = log_q.masked_fill(~candidates_BTE, 0.0)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) - log_q),
                        torch.zeros_like(p))
    per_query = terms.sum(-1)
    if not bool(rows.any()):
        return per_query.sum() * 0.0
    return per_query[rows].mean()
