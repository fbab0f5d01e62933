"""V4 attention: shared-KV MQA over a sliding window plus compressed entries (spec §3.2-§3.6).

Legend: B batch, T tokens, H query heads, D head dim, E compressed entries, N window blocks,
W window, K keys of a window block (2W), C q latent rank, G output groups.

One softmax per query covers its window tokens, its visible compressed entries (all of them in
HCA and dense CSA, the indexer's top-k in sparse CSA) and the per-head sink, which adds to the
denominator only (spec §3.3). Documents packed into a row never see each other: the window and
the compressed entries are masked per document (spec §3.12 item 4).

The local head count is read from the weights, so a tensor-parallel plan can shard wq_b,
attn_sink and the groups of wo_a without touching this math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .args import ModelArgs
from .cache import AttentionCache
from .compressor import Compressor, entry_layout
from .indexer import Indexer, indexer_kl_loss, select_topk
from .norm import RMSNorm, rms_normalize
from .quant import fake_quant_fp8
from .rope import apply_rope, rope_angles, rope_frequencies


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def fp32_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [batch, X, D] · keys [batch, K, D]ᵀ → fp32 [batch, X, K]: attention logits stay fp32 (spec §3).

    Under CUDA autocast the operands run on the tensor cores in the autocast dtype with an fp32 result
    (`out_dtype`), where a plain matmul would round every logit to bf16 (±0.25 at a logit of 100), as flash
    attention never does. Elsewhere (CPU, or no autocast) the product runs in fp32.
    """
    if queries.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return _LowPrecisionScores.apply(queries.to(dtype), keys.to(dtype))
    with torch.autocast(queries.device.type, enabled=False):
        return torch.bmm(queries.float(), keys.float().mT)


class _LowPrecisionScores(torch.autograd.Function):
    """bmm with an fp32 result from low-precision operands; torch 2.11 has no derivative for bmm's out_dtype form.
    The backward products take the logit gradient in the operands' dtype, as flash attention's backward does."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(queries, keys)
        return torch.bmm(queries, keys.mT, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        queries, keys = ctx.saved_tensors
        grad = grad_scores.to(queries.dtype)
        return torch.bmm(grad, keys), torch.bmm(grad.mT, queries)


@dataclass
class AttentionAux:
    """Side outputs of one attention layer."""
    indexer_loss: Optional[torch.Tensor] = None


def window_blocks(kv_BTD: torch.Tensor, doc_ids_BT: torch.Tensor, window: int):
    """Keys of each query block of W tokens: its own block and the previous one.

    Returns keys [B, N, 2W, D] and the mask [B, N, W, 2W] of keys in the query's window
    (positions t-W+1..t of the same document).
    """
    B, T, D = kv_BTD.shape
    n_blocks = -(-T // window)
    pad = n_blocks * window - T
    kv = nn.functional.pad(kv_BTD, (0, 0, 0, pad)).view(B, n_blocks, window, D)
    keys = torch.cat((torch.zeros_like(kv[:, :1]), kv[:, :-1]), 1)
    keys = torch.cat((keys, kv), 2)
    docs = nn.functional.pad(doc_ids_BT, (0, pad), value=-1).view(B, n_blocks, window)
    key_docs = torch.cat((torch.full_like(docs[:, :1], -2), docs[:, :-1]), 1)
    key_docs = torch.cat((key_docs, docs), 2)
    q_off = torch.arange(window, device=kv.device)[:, None]
    k_off = torch.arange(2 * window, device=kv.device)[None, :] - window
    in_window = (k_off <= q_off) & (k_off > q_off - window)
    mask = in_window & (key_docs[:, :, None, :] == docs[:, :, :, None])
    return keys, mask


class Attention(nn.Module):
    """One V4 attention layer of kind 'sliding', 'csa' or 'hca' (from `compress_ratios`)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.kind = args.layer_kind(layer)
        self.ratio = args.compress_ratios[layer]
        self.head_dim, self.rope_dim = args.head_dim, args.rope_head_dim
        self.window, self.o_lora_rank, self.norm_eps = args.window_size, args.o_lora_rank, args.norm_eps
        self.qat_fp8_kv, self.fp8_block = args.qat_fp8_kv, args.fp8_block
        self.indexer_mode, self.index_topk = args.indexer_mode, args.index_topk
        self.indexer_loss_on = args.indexer_loss_weight > 0 and args.indexer_mode != "dense"
        H, D = args.n_heads, args.head_dim
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(args.dim, D, bias=False)
        self.kv_norm = RMSNorm(D, args.norm_eps)
        self.wo_a = nn.Linear(H * D // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))

        compressed = self.kind != "sliding"
        theta = args.compress_rope_theta if compressed else args.rope_theta
        factor = args.rope_factor if compressed else 1.0
        orig = args.original_seq_len if compressed else 0
        self.register_buffer("rope_freqs", rope_frequencies(
            self.rope_dim, theta, factor, orig, args.beta_fast, args.beta_slow), persistent=False)
        self.compressor = None
        self.indexer = None
        if compressed:
            self.compressor = Compressor(args.dim, D, self.ratio, overlap=self.kind == "csa",
                                         rope_dim=self.rope_dim, norm_eps=args.norm_eps,
                                         quant="fp8" if args.qat_fp8_kv else "none",
                                         quant_block=args.fp8_block)
        if self.kind == "csa" and args.indexer_mode != "dense":
            self.indexer = Indexer(args.dim, args.q_lora_rank, args.index_n_heads,
                                   args.index_head_dim, self.ratio, self.rope_dim, args.norm_eps,
                                   args.qat_fp4_indexer, args.fp4_block)
        # Tensor parallelism shards the heads; its plan sets `reduce_heads` to an all-reduce of the
        # value and `to_heads` (on tensors every local head reads: KV, compressed entries) to an
        # all-reduce of the gradient, which the local heads only partly produce.
        self.reduce_heads = _identity
        self.to_heads = _identity

    def forward(self, x_BTD: torch.Tensor, doc_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
                cache: Optional[AttentionCache] = None) -> tuple[torch.Tensor, AttentionAux]:
        """x_BTD: layer input. With a non-empty `cache`, x holds only new tokens (decode) that
        attend to the cached history; an empty cache is filled by this (prefill) call."""
        B, T, _ = x_BTD.shape
        D, r = self.head_dim, self.rope_dim
        cos, sin = rope_angles(positions_BT, self.rope_freqs)

        q_latent = self.q_norm(self.wq_a(x_BTD))
        q = self.wq_b(q_latent).unflatten(-1, (-1, D))
        q = rms_normalize(q, self.norm_eps)                       # per-head, unweighted
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(x_BTD)), cos, sin)
        if self.qat_fp8_kv:
            kv = torch.cat((fake_quant_fp8(kv[..., :D - r], self.fp8_block), kv[..., D - r:]), -1)
        kv = self.to_heads(kv)
        q32, kv32 = q.float(), kv.float()

        decoding = cache is not None and cache.length > 0
        comp_proj = self.compressor.project(x_BTD) if self.compressor is not None else None
        index_proj = self.indexer.compressor.project(x_BTD.detach()) if self.indexer is not None else None
        if cache is not None:
            cache.append(kv32, doc_ids_BT, positions_BT, comp_proj, index_proj)
            if decoding:
                comp_proj, index_proj = cache.comp, cache.index_comp
        all_docs = cache.doc_ids if decoding else doc_ids_BT
        all_positions = cache.positions if decoding else positions_BT

        scale = D ** -0.5
        logits = []
        if self.window > 0:
            if decoding:
                win_logits, win_values = self._window_over_history(q32, cache, doc_ids_BT, positions_BT)
            else:
                win_logits, win_values = self._window_blocked(q32, kv32, doc_ids_BT)
            logits.append(win_logits * scale)

        aux = AttentionAux()
        if self.compressor is not None:
            layout = entry_layout(all_docs, all_positions, self.ratio)
            entry_cos, entry_sin = rope_angles(layout.first_pos_BE, self.rope_freqs)
            entries = self.to_heads(self.compressor.pool(*comp_proj, layout, entry_cos, entry_sin))  # [B, E, D]
            visible = layout.visible_BTE(doc_ids_BT, positions_BT)
            comp_mask = visible
            index_scores = None
            if self.indexer is not None:
                index_scores = self.indexer(x_BTD, q_latent, layout, visible, cos, sin,
                                            entry_cos, entry_sin, key_projections=index_proj)
                if self.indexer_mode == "sparse":
                    comp_mask = select_topk(index_scores, self.index_topk) & visible
            comp = fp32_scores(q32.flatten(1, 2), entries).unflatten(1, (T, -1)).transpose(1, 2) * scale
            logits.append(comp.masked_fill(~comp_mask[:, None], float("-inf")))

        H = q.shape[2]
        sink = self.attn_sink.float()[None, :, None, None].expand(B, H, T, 1)
        probs = torch.cat(logits + [sink], -1).softmax(-1)
        out = torch.zeros_like(q32)
        start = 0
        if self.window > 0:
            width = logits[0].shape[-1]
            p_win = probs[..., :width]
            if decoding:
                out = out + torch.einsum("bhtk,bkd->bthd", p_win, win_values)
            else:
                n_blocks = win_values.shape[1]
                p_win = nn.functional.pad(p_win, (0, 0, 0, n_blocks * self.window - T))
                p_win = p_win.view(B, H, n_blocks, self.window, width)
                out = out + torch.einsum("bhnwk,bnkd->bnwhd", p_win, win_values).flatten(1, 2)[:, :T]
            start = width
        if self.compressor is not None:
            p_comp = probs[..., start:-1]
            out = out + torch.einsum("bhte,bed->bthd", p_comp, entries)
            if self.indexer is not None and self.indexer_loss_on:
                head_sum = self.reduce_heads(p_comp.detach().sum(1))
                aux.indexer_loss = indexer_kl_loss(head_sum, index_scores, comp_mask)

        out = apply_rope(out, cos[:, :, None], sin[:, :, None], inverse=True).to(x_BTD.dtype)
        return self._grouped_output(out), aux

    def _window_blocked(self, q32, kv32, doc_ids_BT):
        """Window scores [B, H, T, 2W] (unscaled) by query blocks of W; values [B, N, 2W, D]."""
        B, T = q32.shape[:2]
        keys, win_mask = window_blocks(kv32, doc_ids_BT, self.window)
        n_blocks = keys.shape[1]
        q_blocks = nn.functional.pad(q32, (0, 0, 0, 0, 0, n_blocks * self.window - T))
        q_blocks = q_blocks.view(B, n_blocks, self.window, -1, q32.shape[-1])
        win = fp32_scores(q_blocks.flatten(0, 1).flatten(1, 2), keys.flatten(0, 1))  # [B·N, W·H, 2W]
        win = win.view(B, n_blocks, self.window, -1, win.shape[-1]).permute(0, 3, 1, 2, 4)
        win = win.masked_fill(~win_mask[:, None], float("-inf"))
        return win.flatten(2, 3)[:, :, :T], keys

    def _window_over_history(self, q32, cache: AttentionCache, doc_ids_BT, positions_BT):
        """Decode: window scores [B, H, T, K] over the last K cached keys; values [B, K, D]."""
        T = q32.shape[1]
        span = min(cache.length, self.window + T - 1)
        keys = cache.kv[:, -span:]
        key_docs, key_pos = cache.doc_ids[:, -span:], cache.positions[:, -span:]
        q_pos = positions_BT[:, :, None]
        mask = ((key_docs[:, None, :] == doc_ids_BT[:, :, None]) & (key_pos[:, None, :] <= q_pos)
                & (key_pos[:, None, :] > q_pos - self.window))
        win = fp32_scores(q32.flatten(1, 2), keys).unflatten(1, (T, -1)).transpose(1, 2)
        return win.masked_fill(~mask[:, None], float("-inf")), keys

    def _grouped_output(self, o_BTHD: torch.Tensor) -> torch.Tensor:
        """Group g of heads goes through its own wo_a block, then wo_b mixes all (spec §3.2)."""
        B, T = o_BTHD.shape[:2]
        wo_a = self.wo_a.weight
        groups = wo_a.shape[0] // self.o_lora_rank
        o_groups = o_BTHD.reshape(B, T, groups, -1)
        latent = torch.einsum("btgi,goi->btgo", o_groups, wo_a.view(groups, self.o_lora_rank, -1))
        return self.wo_b(latent.flatten(2))
