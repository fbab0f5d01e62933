"""The V4 model: embedding -> n_hc streams -> mHC blocks -> hc_head -> norm -> head, plus MTP.

Spec §3.0 (dataflow), §3.1.3 (mHC placement), §3.9 (MTP). Legend: B batch, T tokens, H streams
(hc_mult), D hidden size, V vocabulary, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import Attention
from .cache import AttentionCache, ModelCache
from .mhc import HyperConnection, hc_head_collapse, init_hc_params, sinkhorn_row_error
from .moe import MoE, balanced_tid2eid
from .norm import RMSNorm


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100 (0 when there are none)."""
    labels = labels_BT.reshape(-1)
    if not bool((labels != -100).any()):
        return logits_BTV.sum() * 0.0
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), labels,
                           ignore_index=-100)


@dataclass
class LayerStats:
    """Per-layer monitoring values of the last forward (detached)."""
    sinkhorn_row_error: List[float] = field(default_factory=list)
    max_comb_logit: List[float] = field(default_factory=list)


@dataclass
class ModelOutput:
    """`logits` [B, T, V] fp32; `loss` total (None without labels); `losses` its parts;
    `routing` expert ids [B, T(-1 for MTP), K] per MoE layer (trunk layers, then MTP); `hidden` the
    final hidden state [B, T, D] (fp32, after hc_head and the final norm: logits = hidden @ head^T)
    when asked for."""
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    routing: List[torch.Tensor] = field(default_factory=list)
    num_tokens: int = 0
    num_mtp_tokens: int = 0
    mtp_logits: Optional[torch.Tensor] = None
    stats: Optional[LayerStats] = None
    hidden: Optional[torch.Tensor] = None


class Block(nn.Module):
    """Two mHC-wrapped sublayers: attention and MoE, each with its own hc_* parameters."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, D = args.hc_mult, args.dim
        mix = (2 + H) * H
        self.attn_norm = RMSNorm(D, args.norm_eps)
        self.ffn_norm = RMSNorm(D, args.norm_eps)
        self.attn = Attention(args, layer)
        self.ffn = MoE(args, hash_layer=layer < args.n_hash_layers)
        self.hc_attn_fn = nn.Parameter(torch.empty(mix, H * D))
        self.hc_attn_base = nn.Parameter(torch.empty(mix))
        self.hc_attn_scale = nn.Parameter(torch.empty(3))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix, H * D))
        self.hc_ffn_base = nn.Parameter(torch.empty(mix))
        self.hc_ffn_scale = nn.Parameter(torch.empty(3))
        self.hc = HyperConnection(H, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps, args.hc_dynamic)

    def forward(self, streams_BTHD: torch.Tensor, token_ids_BT: torch.Tensor, doc_ids_BT: torch.Tensor,
                positions_BT: torch.Tensor, override_BTK: Optional[torch.Tensor], stats: Optional[LayerStats],
                cache: Optional[AttentionCache] = None):
        mix = self.hc.mix(streams_BTHD, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        attn_out, attn_aux = self.attn(self.attn_norm(self.hc.collapse(streams_BTHD, mix.pre_BTH)),
                                       doc_ids_BT, positions_BT, cache)
        streams_BTHD = self.hc.expand(attn_out, streams_BTHD, mix)
        if stats is not None:
            _record(stats, mix)
        mix = self.hc.mix(streams_BTHD, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        ffn_out, moe_aux = self.ffn(self.ffn_norm(self.hc.collapse(streams_BTHD, mix.pre_BTH)),
                                    token_ids_BT, override_BTK)
        streams_BTHD = self.hc.expand(ffn_out, streams_BTHD, mix)
        if stats is not None:
            _record(stats, mix)
        return streams_BTHD, attn_aux, moe_aux


def _record(stats: LayerStats, mix) -> None:
    with torch.no_grad():
        stats.sinkhorn_row_error.append(float(sinkhorn_row_error(mix.comb_BTHH)))
        stats.max_comb_logit.append(float(mix.comb_logits_BTHH.abs().amax()) if mix.comb_logits_BTHH.numel() else 0.0)


class MTPBlock(Block):
    """Depth-1 MTP: a full block plus e_proj/h_proj, enorm/hnorm, its own norm and hc_head."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        H, D = args.hc_mult, args.dim
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, args.norm_eps)
        self.hnorm = RMSNorm(D, args.norm_eps)
        self.norm = RMSNorm(D, args.norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(H, H * D))
        self.hc_head_base = nn.Parameter(torch.empty(H))
        self.hc_head_scale = nn.Parameter(torch.empty(1))


class V4Model(nn.Module):
    """DeepSeek-V4 causal LM (single device, fp32 reference; spec §3).

    forward(input_ids [B, T] int64, labels [B, T] int64 (-100 = ignore; labels[:, t] is the
    target of position t), doc_ids [B, T] int64 non-decreasing per row (packed documents),
    routing_override: per MoE layer (trunk then MTP) None or expert ids [B, T, K] ([B, T-1, K]
    for MTP); hash layers ignore it) -> ModelOutput.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, D = args.hc_mult, args.dim
        self.embed = nn.Embedding(args.vocab_size, D)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.mtp = nn.ModuleList(MTPBlock(args, args.n_layers + i) for i in range(args.n_mtp_layers))
        self.norm = RMSNorm(D, args.norm_eps)
        self.head = nn.Linear(D, args.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.empty(H, H * D))
        self.hc_head_base = nn.Parameter(torch.empty(H))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        # Tensor parallelism swaps in a vocab-parallel cross-entropy here, and sets `to_vocab_shards`
        # (on the head's input, read by every vocabulary shard) to a gradient all-reduce.
        self.cross_entropy = masked_cross_entropy
        self.to_vocab_shards = _identity
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) weights, unit norms, zero sinks/ape/biases, mHC per spec §3.1.4,
        balanced hash tables."""
        args = self.args
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=args.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for block in list(self.layers) + list(self.mtp):
            init_hc_params(block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale,
                           args.hc_fn_init_std, args.hc_init_scale)
            init_hc_params(block.hc_ffn_fn, block.hc_ffn_base, block.hc_ffn_scale,
                           args.hc_fn_init_std, args.hc_init_scale)
            block.attn.attn_sink.zero_()
            for comp in (block.attn.compressor, getattr(block.attn.indexer, "compressor", None)):
                if comp is not None:
                    comp.ape.zero_()
            gate = block.ffn.gate
            nn.init.normal_(gate.weight, std=args.init_std)
            experts = block.ffn.experts
            for w in (experts.w1, experts.w2, experts.w3):
                nn.init.normal_(w, std=args.init_std)
            if gate.hash_layer and gate.tid2eid.device.type != "meta":
                gate.tid2eid.copy_(balanced_tid2eid(args.vocab_size, args.n_routed_experts,
                                                    args.n_activated_experts,
                                                    args.hash_seed + len(self._hash_layers_before(block))))
            elif not gate.hash_layer:
                gate.bias.zero_()
        for block in self.mtp:
            init_hc_params(block.hc_head_fn, block.hc_head_base, block.hc_head_scale,
                           args.hc_fn_init_std, args.hc_init_scale)
        init_hc_params(self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                       args.hc_fn_init_std, args.hc_init_scale)

    def _hash_layers_before(self, block: nn.Module) -> list:
        out = []
        for b in self.layers:
            if b is block:
                break
            if b.ffn.hash_layer:
                out.append(b)
        return out

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, input_ids, labels, doc_ids, routing_override) -> None:
        args = self.args
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor [batch, seq] of token ids")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids has dtype {input_ids.dtype}; pass integer token ids "
                             "(torch.long)")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has an empty sequence dimension")
        if T > args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={args.max_seq_len}; "
                             "shorten the sequence or raise ModelArgs.max_seq_len")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= args.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={args.vocab_size}); got range "
                             f"[{lo}, {hi}] — check the tokenizer's vocabulary against the model's")
        for name, t in (("labels", labels), ("doc_ids", doc_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, T)} like input_ids")
        if labels is not None:
            bad = (labels != -100) & ((labels < 0) | (labels >= args.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"labels must be -100 or in [0, vocab_size={args.vocab_size})")
        if doc_ids is not None:
            if doc_ids.is_floating_point() or int(doc_ids.min()) < 0:
                raise ValueError("doc_ids must be non-negative integers")
            if T > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
                raise ValueError("doc_ids must be non-decreasing along each row (documents are "
                                 "contiguous runs in a packed row)")
        n_moe = args.n_layers + args.n_mtp_layers
        if routing_override is not None and len(routing_override) != n_moe:
            raise ValueError(f"routing_override has {len(routing_override)} entries; expected one per "
                             f"MoE layer (n_layers + n_mtp_layers = {n_moe}), None where unused")

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None,
                routing_override: Optional[Sequence[Optional[torch.Tensor]]] = None,
                start_pos: int = 0, collect_stats: bool = False, return_hidden: bool = False,
                compute_logits: bool = True, cache: Optional[ModelCache] = None) -> ModelOutput:
        """`start_pos` offsets every position id (RoPE shift tests); `collect_stats` fills
        per-layer Sinkhorn row error and max |comb logit| (dashboards); `return_hidden` returns
        the final hidden state; `compute_logits=False` skips the head and MTP (a teacher that
        ships hidden states only; no labels then). `cache` (ModelCache.empty(n_layers)): an
        empty cache is filled (prefill); a filled one makes input_ids the next tokens (decode),
        positioned after the cached ones, continuing their last document. MTP is skipped."""
        self._check_inputs(input_ids, labels, doc_ids, routing_override)
        if not compute_logits and labels is not None:
            raise ValueError("compute_logits=False cannot compute a loss; pass labels=None")
        args = self.args
        B, T = input_ids.shape
        if cache is not None and cache.length:
            start_pos = int(cache.layers[0].positions[0, -1]) + 1
            if doc_ids is None:
                doc_ids = cache.layers[0].doc_ids[:, -1:].expand(B, T)
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device).expand(B, T) + start_pos
        override = list(routing_override) if routing_override is not None else [None] * (args.n_layers + args.n_mtp_layers)
        stats = LayerStats() if collect_stats else None

        streams = self.embed(input_ids)[:, :, None, :].expand(B, T, args.hc_mult, args.dim)
        routing, indexer_losses, balance_losses = [], [], []
        for i, block in enumerate(self.layers):
            streams, attn_aux, moe_aux = block(streams, input_ids, doc_ids, positions, override[i], stats,
                                               None if cache is None else cache.layers[i])
            routing.append(moe_aux.indices_BTK)
            if attn_aux.indexer_loss is not None:
                indexer_losses.append(attn_aux.indexer_loss)
            if moe_aux.balance_loss is not None:
                balance_losses.append(moe_aux.balance_loss)
        hidden = self._final_hidden(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.norm)
        logits = hidden @ self.head.weight.float().t() if compute_logits else None

        out = ModelOutput(logits=logits, routing=routing, stats=stats,
                          hidden=hidden if return_hidden else None)
        mtp_logits, mtp_labels = None, None
        if self.mtp and T > 1 and compute_logits and cache is None:
            mtp_logits, mtp_labels, mtp_routing, mtp_balance = self._mtp_forward(
                streams, input_ids, labels, doc_ids, positions, override[args.n_layers], stats)
            routing.append(mtp_routing)
            balance_losses.extend(mtp_balance)
            out.mtp_logits = mtp_logits
        if labels is None:
            return out

        losses = {"lm": self.cross_entropy(logits, labels)}
        zero = logits.new_zeros(())
        losses["mtp"] = self.cross_entropy(mtp_logits, mtp_labels) if mtp_logits is not None else zero
        losses["balance"] = torch.stack(balance_losses).sum() if balance_losses else zero
        losses["indexer"] = torch.stack(indexer_losses).mean() if indexer_losses else zero
        out.losses = losses
        out.loss = self.total_loss(losses)
        out.num_tokens = int((labels != -100).sum())
        out.num_mtp_tokens = int((mtp_labels != -100).sum()) if mtp_labels is not None else 0
        return out

    def total_loss(self, losses: Dict[str, torch.Tensor], mtp_weight: Optional[float] = None) -> torch.Tensor:
        """lm + lambda * mtp + balance + indexer_loss_weight * indexer."""
        lam = self.args.mtp_loss_weight if mtp_weight is None else mtp_weight
        return (losses["lm"] + lam * losses["mtp"] + losses["balance"]
                + self.args.indexer_loss_weight * losses["indexer"])

    def _final_hidden(self, streams_BTHD, fn, base, scale, norm: RMSNorm) -> torch.Tensor:
        """hc_head collapse -> RMSNorm, in fp32 (the head's input)."""
        h = hc_head_collapse(streams_BTHD, fn, base, scale, self.args.hc_eps, self.args.norm_eps,
                             self.args.hc_dynamic)
        return self.to_vocab_shards(norm(h).float())

    def _mtp_forward(self, streams_BTHD, input_ids, labels, doc_ids, positions, override_BTK, stats):
        """Position i (0..T-2) predicts token i+2 from the final streams at i and Emb(t_{i+1})."""
        mtp = self.mtp[0]
        next_ids = input_ids[:, 1:]
        main = mtp.h_proj(mtp.hnorm(streams_BTHD[:, :-1]))
        emb = mtp.e_proj(mtp.enorm(self.embed(next_ids)))
        x = main + emb[:, :, None, :]
        x, _, moe_aux = mtp(x, next_ids, doc_ids[:, :-1], positions[:, :-1], override_BTK, stats)
        logits = self._final_hidden(x, mtp.hc_head_fn, mtp.hc_head_base, mtp.hc_head_scale, mtp.norm) @ self.head.weight.float().t()
        mtp_labels = None
        if labels is not None:
            # The step i -> i+1 must stay inside one document for i+2 to be a fair target.
            mtp_labels = torch.where(labels[:, :-1] == -100, torch.full_like(labels[:, 1:], -100), labels[:, 1:])
            mtp_labels = torch.where(doc_ids[:, 1:] == doc_ids[:, :-1], mtp_labels, torch.full_like(mtp_labels, -100))
        balance = [moe_aux.balance_loss] if moe_aux.balance_loss is not None else []
        return logits, mtp_labels, moe_aux.indices_BTK, balance

    # ------------------------------------------------------------------ utilities
    def moe_layers(self) -> List[MoE]:
        """Every MoE module, trunk layers then MTP."""
        return [b.ffn for b in list(self.layers) + list(self.mtp)]

    @torch.no_grad()
    def update_balance_biases(self, gamma: Optional[float] = None, loads: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Aux-loss-free bias update of every score-routed MoE layer (called by the trainer
        after the optimizer step, outside autograd); `loads` = per-layer loads summed over ranks."""
        gamma = self.args.bias_update_speed if gamma is None else gamma
        for i, moe in enumerate(self.moe_layers()):
            moe.update_bias(gamma, None if loads is None else loads[i])

    def set_hash_tables(self, token_counts: torch.Tensor) -> None:
        """Rebuild every hash layer's tid2eid by frequency bin-packing (spec §3.8.3 [rec])."""
        args = self.args
        for j, block in enumerate(b for b in self.layers if b.ffn.hash_layer):
            table = balanced_tid2eid(args.vocab_size, args.n_routed_experts, args.n_activated_experts,
                                     args.hash_seed + j, token_counts)
            block.ffn.gate.tid2eid.copy_(table)

    def num_parameters(self, active: bool = False, include_mtp: bool = False) -> int:
        """Parameter count. `active`: parameters used per token, without the embedding (spec
        §2.1): routed experts count K/E of their size. Buffers are never counted."""
        args = self.args
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not include_mtp:
                continue
            n = p.numel()
            if active:
                if name == "embed.weight":
                    continue
                if ".ffn.experts." in name:
                    n = n * args.n_activated_experts // args.n_routed_experts
            total += n
        return total
