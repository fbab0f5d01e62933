"""Distillation from a teacher's top-k log-probabilities (spec opd-and-fused-loss §2 "teacher top-k
forward KL", §4.3 TRL `ServerDistillationTrainer`, §11 case 12).

For teachers that ship k (token id, log-prob) pairs per position, such as a teacher behind an
inference server, instead of hidden states. The student's log-probs at those ids are full-vocabulary
`log_softmax` values (gathered logits minus the log-sum-exp over all V), recomputed from the student's
hidden states chunk by chunk under activation checkpointing, so `[N, V]` logits are never held at
once (one chunk's `[R, V]` at a time, forward and backward).

The divergence is taken over the k support ids, plus a (k+1)-th *tail bucket* holding the mass
outside them, `log(1 − Σ_k p)`, written as TRL's `_add_tail_bucket` (log-sum-exp clamped at −1e-7
so the tail stays finite when the k ids carry all the mass). With k = V and no tail this is the
full-vocabulary loss of `distill_kl`. Reverse KL and JSD on a teacher's support see the student's
mass outside it only through the tail bucket.

Shape legend: N tokens, V vocabulary, Ds student hidden width, K teacher ids per token, R chunk rows.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .ref import REDUCTIONS, DistillKLOutput, check_row_inputs, jsd_terms, resolve_kind

TAIL_LOG_MASS_MAX = -1e-7
"""TRL's clamp of the support's log-mass: keeps 1 − Σ_k p > 0, so the tail's log is finite."""


def with_tail_bucket(logp_RK: torch.Tensor) -> torch.Tensor:
    """[R, K] log-probs → [R, K+1], the last column log(1 − Σ_k exp(logp))."""
    support_log_mass = torch.logsumexp(logp_RK, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_MAX)
    return torch.cat([logp_RK, torch.log(-torch.expm1(support_log_mass))], dim=-1)


def support_divergence(kind: str, beta: float, student_logp_RK: torch.Tensor, teacher_logp_RK: torch.Tensor) -> torch.Tensor:
    """Per-row divergence over the given support, kind and beta as `resolve_kind` returns them → [R]."""
    if kind == "reverse":
        return (student_logp_RK.exp() * (student_logp_RK - teacher_logp_RK)).sum(-1)
    if kind == "forward":
        return (teacher_logp_RK.exp() * (teacher_logp_RK - student_logp_RK)).sum(-1)
    student_term, teacher_term = jsd_terms(student_logp_RK, teacher_logp_RK, beta)
    return (beta * teacher_term + (1.0 - beta) * student_term).sum(-1)


def _chunk_loss(hidden_RD, head_VD, teacher_ids_RK, teacher_logp_RK, target_ids_R, kind, beta, add_tail):
    """(per-row divergence with its graph, student entropy, student log p of the target or None)."""
    logits_RV = hidden_RD @ head_VD.T
    lse_R = torch.logsumexp(logits_RV, dim=-1)
    student_logp_RK = logits_RV.gather(1, teacher_ids_RK) - lse_R[:, None]
    if add_tail:
        student_logp_RK, teacher_logp_RK = with_tail_bucket(student_logp_RK), with_tail_bucket(teacher_logp_RK)
    row_loss_R = support_divergence(kind, beta, student_logp_RK, teacher_logp_RK)
    with torch.no_grad():
        entropy_R = lse_R - (torch.softmax(logits_RV, dim=-1) * logits_RV).sum(-1)
        target_logp_R = None if target_ids_R is None else logits_RV.gather(1, target_ids_R[:, None])[:, 0] - lse_R
    return row_loss_R, entropy_R, target_logp_R


def check_topk_inputs(student_hidden, student_head, teacher_topk_ids, teacher_topk_logprobs, mask, target_ids):
    """One-line ValueErrors naming the bad argument and the fix, before any V-wide work."""
    if student_hidden.dim() != 2 or student_head.dim() != 2 or student_head.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"student_hidden must be [N, Ds] and student_head [V, Ds], got {tuple(student_hidden.shape)} and {tuple(student_head.shape)}")
    n_rows, vocab = student_hidden.shape[0], student_head.shape[0]
    if teacher_topk_ids.dim() != 2 or teacher_topk_ids.shape[0] != n_rows or teacher_topk_ids.dtype != torch.int64:
        raise ValueError(f"teacher_topk_ids must be int64 [{n_rows}, K], got {teacher_topk_ids.dtype} {tuple(teacher_topk_ids.shape)}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or not teacher_topk_logprobs.is_floating_point():
        raise ValueError(f"teacher_topk_logprobs must be floating [{n_rows}, {teacher_topk_ids.shape[1]}] like the ids, got {teacher_topk_logprobs.dtype} {tuple(teacher_topk_logprobs.shape)}")
    if not 1 <= teacher_topk_ids.shape[1] <= vocab:
        raise ValueError(f"K = {teacher_topk_ids.shape[1]} teacher ids per token must lie in [1, V = {vocab}]")
    check_row_inputs(n_rows, vocab, mask, target_ids)
    if n_rows == 0:
        return
    if teacher_topk_ids.min().item() < 0 or teacher_topk_ids.max().item() >= vocab:
        raise ValueError(f"teacher_topk_ids span [{teacher_topk_ids.min().item()}, {teacher_topk_ids.max().item()}] outside the vocabulary [0, {vocab})")
    sorted_ids = teacher_topk_ids.sort(dim=1).values
    if (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any():
        raise ValueError("teacher_topk_ids repeat an id within a row: each row must list K distinct tokens (deduplicate, or pad with distinct low-probability ids)")
    if not torch.isfinite(teacher_topk_logprobs).all():
        raise ValueError("teacher_topk_logprobs must be finite: replace -inf by a large negative log-prob (e.g. -1e4)")
    # fp32 rounding of a full-support sum can land a few ulps above 1.
    if torch.logsumexp(teacher_topk_logprobs.double(), dim=1).max().item() > 1e-4:
        raise ValueError("teacher_topk_logprobs sum to more than probability 1 in some row: pass log-probabilities (log_softmax), not logits")


def distill_kl_topk(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str = "forward",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    add_tail: bool = True,
    target_ids: torch.Tensor | None = None,
    chunk_rows: int = 256,
) -> DistillKLOutput:
    """Divergence between the student's distribution and a teacher's top-k log-probs, from hidden states.

    student_hidden [N, Ds] and student_head [V, Ds] (trainable; any float dtype, math in fp32 or fp64);
    teacher_topk_ids int64 [N, K], K distinct token ids per row; teacher_topk_logprobs [N, K], the
    teacher's full-vocabulary log-probs of those ids, used as given (apply any temperature on the
    teacher's side). kind, beta, mask, reduction and target_ids as in `distill_kl`; the default kind is
    forward KL, the one whose support the teacher's top-k covers. add_tail: append the tail bucket.
    Returns a `DistillKLOutput`; the loss is differentiable w.r.t. student_hidden and student_head
    through autograd (each chunk's logits are recomputed in the backward).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}; per-token values are always returned")
    kind, beta = resolve_kind(kind, beta)
    check_topk_inputs(student_hidden, student_head, teacher_topk_ids, teacher_topk_logprobs, mask, target_ids)
    n_rows, device = student_hidden.shape[0], student_hidden.device
    compute_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    head_VD = student_head.to(compute_dtype)
    rows = torch.arange(n_rows, device=device) if mask is None else mask.nonzero().flatten()
    row_weight = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0

    per_token_kl = torch.zeros(n_rows, dtype=torch.float32, device=device)
    entropy = torch.zeros_like(per_token_kl)
    target_logprob = None if target_ids is None else torch.zeros_like(per_token_kl)
    loss = student_hidden.new_zeros((), dtype=compute_dtype)
    # A fully masked batch still runs one empty chunk, so the zero loss has a graph (zero gradients).
    for chunk in rows.split(chunk_rows) or (rows,):
        row_loss, chunk_entropy, chunk_target_logp = checkpoint(
            _chunk_loss,
            student_hidden[chunk].to(compute_dtype),
            head_VD,
            teacher_topk_ids[chunk],
            teacher_topk_logprobs[chunk].to(compute_dtype),
            None if target_ids is None else target_ids[chunk],
            kind,
            beta,
            add_tail,
            use_reentrant=False,
        )
        loss = loss + row_loss.sum()
        per_token_kl[chunk] = row_loss.detach().float()
        entropy[chunk] = chunk_entropy.float()
        if target_logprob is not None:
            target_logprob[chunk] = chunk_target_logp.float()
    return DistillKLOutput(loss * row_weight, per_token_kl, target_logprob, entropy)
