"""Readable chunked torch reference of the fused distillation loss (spec opd-and-fused-loss §2, §6).

This is `impl="torch"` of `kernels.distill_kl`: it runs anywhere (CI uses it) and is the algorithm
the TileLang kernel implements, written for reading rather than speed:

* tokens are processed in chunks and each chunk's logits in vocabulary tiles, so `[N, V]` logits
  are never held at once (only one chunk's `[rows, V]`);
* each vocabulary tile yields *partials* (tile max, sum of exponentials, weighted sums), merged
  across tiles with the flash-decoding log-sum-exp combine (`merge_vocab_partials`); the same
  merge combines vocabulary shards computed elsewhere (spec §11 case 13);
* gradients are formed in the forward pass ("gradient-in-forward", spec §6): the loss is terminal,
  so the backward only rescales them by `grad_output`.

Math runs in fp32 (fp64 when the inputs are fp64, for gradcheck). Logits are divided by the
temperature before every softmax; the loss is the divergence of the tempered distributions,
without a τ² factor (TRL/Liger convention).

Shape legend: N tokens, V vocabulary, Ds / Dt student / teacher hidden width, G teachers,
P vocabulary tiles, R rows of one chunk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Channels of the per-tile partials, in this order (the TileLang kernel writes the same layout).
PARTIAL_CHANNELS = (
    "student_max",  # m_s: max of z_s/τ over the tile
    "student_sumexp",  # S_s = Σ exp(z_s − m_s)
    "student_centered",  # E_s = Σ exp(z_s − m_s)(z_s − m_s), gives the entropy
    "reverse_cross",  # A = Σ exp(z_s − m_s)(z_s − z_t), gives KL(p‖q)
    "teacher_max",  # m_t
    "teacher_sumexp",  # S_t = Σ exp(z_t − m_t)
    "forward_cross",  # B = Σ exp(z_t − m_t)(z_t − z_s), gives KL(q‖p)
)
N_PARTIALS = len(PARTIAL_CHANNELS)

KINDS = ("reverse", "forward", "jsd")
REDUCTIONS = ("mean", "sum")


class RowStats(NamedTuple):
    """Per-row results of merging all vocabulary tiles (fp32, shape [R])."""

    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    reverse_kl: torch.Tensor  # KL(p_s ‖ p_t)
    forward_kl: torch.Tensor  # KL(p_t ‖ p_s)
    student_entropy: torch.Tensor


class DistillKLOutput(NamedTuple):
    """Result of `distill_kl` and `distill_kl_topk`; per-token tensors are fp32 [N] and 0 at masked positions."""

    loss: torch.Tensor
    """scalar; differentiable w.r.t. student_hidden and student_head"""
    per_token_kl: torch.Tensor
    """the per-token divergence (KL or JSD) of the tempered distributions"""
    target_logprob: torch.Tensor | None
    """log p_s(target_ids) of the tempered student, for PG-style OPD and IS ratios; None without target_ids"""
    entropy: torch.Tensor
    """entropy of the tempered student distribution"""


class DistillKLResult(NamedTuple):
    """What a backend returns; gradients are None when not requested."""

    loss: torch.Tensor  # scalar, fp32
    per_token_kl: torch.Tensor  # [N] fp32, 0 at masked positions
    target_logprob: torch.Tensor | None  # [N] fp32 log p_s(y_t) of the tempered student; None without target_ids
    entropy: torch.Tensor  # [N] fp32 entropy of the tempered student distribution
    grad_student_hidden: torch.Tensor | None  # [N, Ds], d loss / d student_hidden
    grad_student_head: torch.Tensor | None  # [V, Ds], d loss / d student_head


def resolve_kind(kind: str, beta: float) -> tuple[str, float]:
    """TRL/Liger convention: JSD with beta=0 is forward KL, beta=1 is reverse KL (spec §2)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta} must lie in [0, 1] for kind='jsd'")
        if beta == 0.0:
            return "forward", beta
        if beta == 1.0:
            return "reverse", beta
    return kind, beta


def vocab_tile_partials(student_logits_RP: torch.Tensor, teacher_logits_RP: torch.Tensor) -> torch.Tensor:
    """Partials of one vocabulary tile of already tempered logits → [N_PARTIALS, R]."""
    zs, zt = student_logits_RP, teacher_logits_RP
    ms = zs.amax(dim=1)
    mt = zt.amax(dim=1)
    es = torch.exp(zs - ms[:, None])
    et = torch.exp(zt - mt[:, None])
    return torch.stack(
        [
            ms,
            es.sum(1),
            (es * (zs - ms[:, None])).sum(1),
            (es * (zs - zt)).sum(1),
            mt,
            et.sum(1),
            (et * (zt - zs)).sum(1),
        ]
    )


def merge_vocab_partials(partials_PCR: torch.Tensor) -> RowStats:
    """Flash-decoding combine of per-tile partials [P, N_PARTIALS, R] into per-row statistics.

    Every sum is rescaled from its tile max to the row max before adding, as in the LSE combine of
    tile-ai/tilelang examples/flash_decoding; tiles may come from one kernel or from vocabulary
    shards on different devices.
    """
    ms, ss, es, a, mt, st, b = partials_PCR.unbind(1)
    row_ms = ms.amax(0)
    row_mt = mt.amax(0)
    ws = torch.exp(ms - row_ms)
    wt = torch.exp(mt - row_mt)
    sum_s = (ws * ss).sum(0)
    sum_t = (wt * st).sum(0)
    centered = (ws * (es + (ms - row_ms) * ss)).sum(0)
    reverse_cross = (ws * a).sum(0)
    forward_cross = (wt * b).sum(0)
    lse_s = row_ms + torch.log(sum_s)
    lse_t = row_mt + torch.log(sum_t)
    return RowStats(
        student_lse=lse_s,
        teacher_lse=lse_t,
        reverse_kl=reverse_cross / sum_s - lse_s + lse_t,
        forward_kl=forward_cross / sum_t - lse_t + lse_s,
        student_entropy=torch.log(sum_s) - centered / sum_s,
    )


def log_mixture(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """log m with m = (1−β)p + βq, elementwise (GKD, spec §2); 0 < β < 1."""
    return torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))


def jsd_terms(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise p(log p − log m) and q(log q − log m) with m = (1−β)p + βq (GKD, spec §2)."""
    log_m = log_mixture(student_logp, teacher_logp, beta)
    return (
        student_logp.exp() * (student_logp - log_m),
        teacher_logp.exp() * (teacher_logp - log_m),
    )


def logit_grad(
    kind: str,
    beta: float,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    row_loss_term: torch.Tensor,
) -> torch.Tensor:
    """d(per-row loss)/d(tempered student logits), elementwise over a [R, P] tile.

    reverse: p(log p − log q − KL(p‖q)); forward: p − q;
    jsd: (1−β) p (log p − log m − KL(p‖m)), derived from ∂JSD/∂p = (1−β)(log p − log m).
    `row_loss_term` is KL(p‖q) for reverse and KL(p‖m) for jsd (unused for forward).
    """
    p = student_logp.exp()
    if kind == "reverse":
        return p * (student_logp - teacher_logp - row_loss_term[:, None])
    if kind == "forward":
        return p - teacher_logp.exp()
    log_m = log_mixture(student_logp, teacher_logp, beta)
    return (1.0 - beta) * p * (student_logp - log_m - row_loss_term[:, None])


def check_row_inputs(n_rows: int, vocab: int, mask: torch.Tensor | None, target_ids: torch.Tensor | None) -> None:
    """One-line ValueErrors for the per-row mask (bool [N]) and sampled-token ids (int64 [N] in [0, V))."""
    if mask is not None and (mask.shape != (n_rows,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{n_rows}] (True = token counts), got {mask.dtype} {tuple(mask.shape)}")
    if target_ids is None:
        return
    if target_ids.shape != (n_rows,) or target_ids.dtype != torch.int64:
        raise ValueError(f"target_ids must be int64 [{n_rows}], got {target_ids.dtype} {tuple(target_ids.shape)}")
    if target_ids.numel():
        low, high = target_ids.min().item(), target_ids.max().item()
        if low < 0 or high >= vocab:
            raise ValueError(f"target_ids span [{low}, {high}] outside the vocabulary [0, {vocab})")


def teacher_row_groups(teacher_ids: torch.Tensor | None, mask: torch.Tensor | None, n_rows: int, device) -> list[tuple[int, torch.Tensor | None]]:
    """(teacher index, row indices) per teacher that has valid rows; rows keep their order.

    Row indices None mean every row (one teacher, no mask): the common case needs no host sync.
    """
    if teacher_ids is None and mask is None:
        return [(0, None)] if n_rows else []
    valid = torch.ones(n_rows, dtype=torch.bool, device=device) if mask is None else mask
    if teacher_ids is None:
        rows = valid.nonzero().flatten()
        return [(0, rows)] if rows.numel() else []
    groups = []
    for teacher in torch.unique(teacher_ids[valid]).tolist():
        rows = (valid & (teacher_ids == teacher)).nonzero().flatten()
        groups.append((int(teacher), rows))
    return groups


def distill_kl_reference(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_heads: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
    reduction: str,
    grad_hidden: bool,
    grad_head: bool,
    chunk_rows: int = 256,
    vocab_tile: int = 4096,
) -> DistillKLResult:
    """Chunked loss, per-token outputs and gradients; arguments as in `kernels.distill_kl.distill_kl`.

    student_hidden [N, Ds], student_head [V, Ds], teacher_hidden [N, Dt], teacher_heads [G, V, Dt],
    teacher_ids [N] int64 or None, target_ids [N] int64 or None, mask [N] bool or None.
    """
    kind, beta = resolve_kind(kind, beta)
    n_rows, vocab = student_hidden.shape[0], student_head.shape[0]
    device = student_hidden.device
    compute_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    inv_tau = 1.0 / temperature
    per_token_kl = torch.zeros(n_rows, dtype=compute_dtype, device=device)
    entropy = torch.zeros_like(per_token_kl)
    target_logprob = None if target_ids is None else torch.zeros_like(per_token_kl)
    d_hidden = torch.zeros(student_hidden.shape, dtype=compute_dtype, device=device) if grad_hidden else None
    d_head = torch.zeros(student_head.shape, dtype=compute_dtype, device=device) if grad_head else None

    groups = teacher_row_groups(teacher_ids, mask, n_rows, device)
    groups = [(teacher, torch.arange(n_rows, device=device) if rows is None else rows) for teacher, rows in groups]
    n_valid = sum(rows.numel() for _, rows in groups)
    row_weight = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    head_s = student_head.to(compute_dtype)

    for teacher, group_rows in groups:
        head_t = teacher_heads[teacher].to(compute_dtype)
        for rows in group_rows.split(chunk_rows):
            hs = student_hidden[rows].to(compute_dtype)
            ht = teacher_hidden[rows].to(compute_dtype)
            tiles = []  # (student logits, teacher logits) per vocabulary tile, tempered
            partials = []
            for v0 in range(0, vocab, vocab_tile):
                zs = hs @ head_s[v0 : v0 + vocab_tile].T * inv_tau
                zt = ht @ head_t[v0 : v0 + vocab_tile].T * inv_tau
                tiles.append((zs, zt))
                partials.append(vocab_tile_partials(zs, zt))
            stats = merge_vocab_partials(torch.stack(partials))
            entropy[rows] = stats.student_entropy
            if target_ids is not None:
                target_logits = (hs * head_s[target_ids[rows]]).sum(-1) * inv_tau
                target_logprob[rows] = target_logits - stats.student_lse

            if kind == "reverse":
                row_loss, grad_term = stats.reverse_kl, stats.reverse_kl
            elif kind == "forward":
                row_loss, grad_term = stats.forward_kl, stats.forward_kl
            else:  # jsd needs normalised p and q: a second pass over the tiles (spec §6)
                kl_p_m = torch.zeros_like(stats.student_lse)
                kl_q_m = torch.zeros_like(stats.student_lse)
                for zs, zt in tiles:
                    p_term, q_term = jsd_terms(zs - stats.student_lse[:, None], zt - stats.teacher_lse[:, None], beta)
                    kl_p_m += p_term.sum(1)
                    kl_q_m += q_term.sum(1)
                row_loss, grad_term = beta * kl_q_m + (1.0 - beta) * kl_p_m, kl_p_m
            per_token_kl[rows] = row_loss

            if not (grad_hidden or grad_head):
                continue
            d_hidden_chunk = torch.zeros_like(hs)
            for tile_index, (zs, zt) in enumerate(tiles):
                v0 = tile_index * vocab_tile
                g = logit_grad(kind, beta, zs - stats.student_lse[:, None], zt - stats.teacher_lse[:, None], grad_term)
                g = g * (row_weight * inv_tau)  # d loss / d raw logits
                d_hidden_chunk += g @ head_s[v0 : v0 + vocab_tile]
                if grad_head:
                    d_head[v0 : v0 + vocab_tile] += g.T @ hs
            if grad_hidden:
                d_hidden[rows] = d_hidden_chunk

    loss = per_token_kl.sum() * row_weight
    return DistillKLResult(
        loss=loss,
        per_token_kl=per_token_kl.float(),
        target_logprob=None if target_logprob is None else target_logprob.float(),
        entropy=entropy.float(),
        grad_student_hidden=None if d_hidden is None else d_hidden.to(student_hidden.dtype),
        grad_student_head=None if d_head is None else d_head.to(student_head.dtype),
    )
