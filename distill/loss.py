"""The OPD loss over teacher groups, through kernels.distill_kl (spec opd-and-fused-loss §2, §6, §8.3).

For every group the teacher pool brings in, the teacher logits are recomputed from the shipped
hidden states and the group's stacked heads inside `distill_kl` (one call per group, each head used
once), together with the student logits; neither `[N, V]` tensor is materialised. Each group's
sum is divided by the batch's total count of loss positions, so the loss is the token mean over
the whole batch however the teachers are grouped (spec §11 case 5: global normalisation).

kind="sampled" is the cheap baseline of spec §2 (Tinker, slime): a policy gradient whose
advantage is the negative sampled-token reverse-KL estimate, −(log p_s(y) − log p_t(y)), so the
gradient is an unbiased estimate of the reverse KL's; only one teacher log-prob per token is used.

Dtypes: impl="tilelang" takes bf16 everywhere (student hidden/head are cast with autograd, the
kernel accumulates in fp32); impl="torch" computes in the student hidden state's dtype (fp32, or
fp64 in tests) and upcasts the teacher payload to it.
Legend: N loss positions, V vocabulary, D width, G teachers of a group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from distill.config import LossConfig
from distill.teachers import TeacherGroup
from kernels.distill_kl import distill_kl

LOGPROB_CHUNK_ROWS = 1024


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' → TileLang on CUDA, the torch reference elsewhere."""
    if impl == "auto":
        return "tilelang" if device.type == "cuda" else "torch"
    return impl


@dataclass
class OPDLossOutput:
    """Loss and per-position diagnostics; per-position tensors are fp32 [N_all] (0 off the loss positions)."""

    loss: torch.Tensor
    """Scalar, differentiable w.r.t. the student hidden states and head."""
    divergence: torch.Tensor
    """The per-token divergence of `kind` (for 'sampled': the estimate log p_s(y) − log p_t(y))."""
    reverse_kl: Optional[torch.Tensor]
    """Full-vocabulary KL(student‖teacher) per token (None when not computed)."""
    entropy: Optional[torch.Tensor]
    """Student entropy per token (None when not computed)."""
    sampled_logprob: torch.Tensor
    """log p_s of the sampled token."""
    teacher_of_position: torch.Tensor
    """[N_all] int64 pool index of the teacher of each position, -1 off the loss positions."""
    seconds: float
    """Time spent in the loss computations (teacher stage excluded)."""


def token_logprob(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(hidden · headᵀ / τ)[targets], [N]; chunked, and recomputed in the backward, so at most
    LOGPROB_CHUNK_ROWS × V logits are alive at once."""
    def chunk_logprob(h, w, t):
        logits = (h @ w.T).to(torch.promote_types(h.dtype, torch.float32)) / temperature
        return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], LOGPROB_CHUNK_ROWS):
        args = (hidden[start:start + LOGPROB_CHUNK_ROWS], head, targets[start:start + LOGPROB_CHUNK_ROWS])
        parts.append(checkpoint(chunk_logprob, *args, use_reentrant=False) if grad else chunk_logprob(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def _cast(impl: str, student_hidden: torch.Tensor, student_head: torch.Tensor, group: TeacherGroup):
    if impl == "tilelang":
        dtype = torch.bfloat16
        return student_hidden.to(dtype), student_head.to(dtype), group.hidden.to(dtype), group.heads.to(dtype)
    dtype = student_hidden.dtype
    return student_hidden, student_head.to(dtype), group.hidden.to(dtype), group.heads.to(dtype)


def opd_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, groups: Iterable[TeacherGroup],
             targets: torch.Tensor, n_valid: int, cfg: LossConfig, impl: str) -> OPDLossOutput:
    """Token-mean distillation loss of the student against the teachers of `groups`.

    student_hidden [N_all, Ds] (the student's final hidden states at every position, with grad),
    student_head [V, Ds], targets [N_all] int64 next tokens, n_valid: the number of loss positions
    over all groups (the normaliser). `groups` is consumed lazily (one group's teachers alive at a
    time). impl: 'torch' or 'tilelang' (see `resolve_impl`).
    """
    n_all = student_hidden.shape[0]
    device = student_hidden.device
    zeros = lambda: torch.zeros(n_all, dtype=torch.float32, device=device)  # noqa: E731
    divergence, sampled_logprob = zeros(), zeros()
    reverse_kl = zeros() if cfg.kind == "reverse" or cfg.log_reverse_kl else None
    entropy = zeros() if reverse_kl is not None or cfg.kind != "sampled" else None
    teacher_of_position = torch.full((n_all,), -1, dtype=torch.long, device=device)
    normaliser = float(max(n_valid, 1))
    loss = student_hidden.sum() * 0.0
    seconds = 0.0
    for group in groups:
        start = time.perf_counter()
        pos = group.positions
        teacher_of_position[pos] = torch.as_tensor(group.teachers, device=device)[group.local_ids]
        hs, ws, ht, wt = _cast(impl, student_hidden[pos], student_head, group)
        tgt = targets[pos]
        if cfg.kind == "sampled":
            student_lp = token_logprob(hs, ws, tgt, cfg.temperature)
            with torch.no_grad():
                teacher_lp = torch.empty_like(student_lp)
                for local in range(len(group.teachers)):
                    rows = (group.local_ids == local).nonzero().flatten()
                    teacher_lp[rows] = token_logprob(ht[rows], wt[local], tgt[rows], cfg.temperature)
            estimate = (student_lp - teacher_lp).detach()
            loss = loss + (estimate * student_lp).sum() / normaliser
            divergence[pos] = estimate.float()
            sampled_logprob[pos] = student_lp.detach().float()
        else:
            out = distill_kl(hs, ws, ht, wt, teacher_ids=group.local_ids, kind=cfg.kind, beta=cfg.beta,
                             temperature=cfg.temperature, reduction="sum", impl=impl, target_ids=tgt)
            loss = loss + out.loss / normaliser
            divergence[pos] = out.per_token_kl.float()
            entropy[pos] = out.entropy.float()
            sampled_logprob[pos] = out.target_logprob.float()
            if cfg.kind == "reverse":
                reverse_kl[pos] = out.per_token_kl.float()
        if reverse_kl is not None and cfg.kind != "reverse":
            with torch.no_grad():
                out = distill_kl(hs.detach(), ws.detach(), ht, wt, teacher_ids=group.local_ids, kind="reverse",
                                 temperature=cfg.temperature, reduction="sum", impl=impl)
            reverse_kl[pos] = out.per_token_kl.float()
            entropy[pos] = out.entropy.float()
        seconds += time.perf_counter() - start
    return OPDLossOutput(loss=loss, divergence=divergence, reverse_kl=reverse_kl, entropy=entropy,
                         sampled_logprob=sampled_logprob, teacher_of_position=teacher_of_position, seconds=seconds)
