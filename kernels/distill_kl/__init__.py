"""Fused distillation loss from hidden states: `distill_kl` (spec opd-and-fused-loss §2, §6, §7).

The student and teacher logits `h·Wᵀ` are recomputed inside the loss and the `[N, V]` logits are
never materialised. Two implementations share one contract:

* `impl="tilelang"`: `kernel.py`, TileLang kernels for sm_90 plus cuBLAS GEMMs; CUDA, bf16.
* `impl="torch"`: `ref.py`, a readable chunked fp32 reference; forced for CPU tensors.

`distill_kl_topk` (`topk.py`) is the variant for teachers that ship top-k log-probs instead of
hidden states (spec §2, §11 case 12).

Gradients are computed during the forward pass (the loss is terminal), so only the scalar loss is
differentiable, and only with respect to `student_hidden` and `student_head`; the per-token
outputs are diagnostics without gradient. Call `.backward()` once per forward.
"""

import torch

from .ref import KINDS, REDUCTIONS, DistillKLOutput, DistillKLResult, check_row_inputs, distill_kl_reference
from .topk import distill_kl_topk

IMPLS = ("tilelang", "torch")


class _DistillKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_head, result: DistillKLResult, scale_on_device):
        ctx.save_for_backward(result.grad_student_hidden, result.grad_student_head)
        ctx.scale_on_device = scale_on_device
        extras = [result.per_token_kl, result.entropy]
        if result.target_logprob is not None:
            extras.append(result.target_logprob)
        ctx.mark_non_differentiable(*extras)
        return (result.loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        grad_hidden, grad_head = ctx.saved_tensors
        # Gradient-in-forward (spec §6): the stored gradients are for grad_loss = 1; any other
        # upstream scale (loss weights, later averaging) is applied here, in place.
        grads = [grad for grad in (grad_hidden, grad_head) if grad is not None]
        if ctx.scale_on_device:  # the TileLang path: no host sync, no work when grad_loss is 1
            from .kernel import scale_unless_one

            for grad in grads:
                scale_unless_one(grad, grad_loss)
        elif grad_loss.item() != 1.0:
            for grad in grads:
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_hidden, grad_head, None, None


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor itself when already contiguous (no dispatcher call), else a dense copy."""
    return tensor if tensor is None or tensor.is_contiguous() else tensor.contiguous()


def _check_inputs(student_hidden, student_head, teacher_hidden, teacher_heads, teacher_ids, target_ids, mask, kind, temperature, reduction, impl):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}; per-token values are always returned")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if isinstance(teacher_heads, (list, tuple)):
        raise ValueError(
            "teacher_heads must be one tensor [G, V, Dt]: torch.stack the heads; teachers of different widths "
            "need separate distill_kl calls (one teacher_hidden tensor has one width)"
        )
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("student_hidden [N, Ds] and teacher_hidden [N, Dt] must be 2-D: flatten batch and time first")
    n_rows, d_s = student_hidden.shape
    if teacher_hidden.shape[0] != n_rows:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, student_hidden {n_rows}")
    if student_head.dim() != 2 or student_head.shape[1] != d_s:
        raise ValueError(f"student_head must be [V, {d_s}], got {tuple(student_head.shape)}")
    vocab = student_head.shape[0]
    if teacher_heads.dim() != 3 or teacher_heads.shape[2] != teacher_hidden.shape[1]:
        raise ValueError(f"teacher_heads must be [G, V, {teacher_hidden.shape[1]}], got {tuple(teacher_heads.shape)}")
    if teacher_heads.shape[1] != vocab:
        raise ValueError(
            f"teacher vocabulary {teacher_heads.shape[1]} != student vocabulary {vocab}: if the extra rows are padding, "
            f"pass teacher_heads[:, :{vocab}]; never pad the student head (it would give padding tokens probability)"
        )
    if student_hidden.dtype != student_head.dtype or teacher_hidden.dtype != teacher_heads.dtype:
        raise ValueError("each hidden tensor must have its head's dtype")
    if teacher_ids is not None and (teacher_ids.shape != (n_rows,) or teacher_ids.dtype != torch.int64):
        raise ValueError(f"teacher_ids must be int64 [{n_rows}], got {teacher_ids.dtype} {tuple(teacher_ids.shape)}")
    check_row_inputs(n_rows, vocab, mask, target_ids)
    n_teachers = teacher_heads.shape[0]
    if teacher_ids is None and n_teachers != 1:
        raise ValueError(f"teacher_ids is required with {n_teachers} stacked teacher heads")
    if teacher_ids is not None and teacher_ids.numel():
        low, high = teacher_ids.min().item(), teacher_ids.max().item()
        if low < 0 or high >= n_teachers:
            raise ValueError(f"teacher_ids span [{low}, {high}] but only {n_teachers} teacher heads were given")


def distill_kl(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_heads: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    kind: str = "reverse",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "tilelang",
    target_ids: torch.Tensor | None = None,
    config=None,
) -> DistillKLOutput:
    """Divergence between the student's and the teachers' next-token distributions, from hidden states.

    student_hidden [N, Ds] and student_head [V, Ds] (trainable); teacher_hidden [N, Dt] and
    teacher_heads [V, Dt] or stacked [G, V, Dt] (frozen: they never receive gradients).
    teacher_ids: int64 [N], the teacher of each row (required when G > 1); rows are grouped by
    teacher inside. kind: "reverse" KL(p_s‖p_t) (default, OPD), "forward" KL(p_t‖p_s), or "jsd",
    the generalized JSD β·KL(q‖m) + (1−β)·KL(p‖m) with m = βq + (1−β)p; β = 0 / 1 give forward /
    reverse KL (TRL/Liger convention). temperature τ divides both logits (no τ² factor).
    mask: bool [N], True where the token counts; masked rows get zero loss, zero gradient and 0 in
    every per-token output. reduction: "mean" over unmasked tokens, or "sum" (divide by a global
    token count yourself to split a batch into micro-batches). target_ids: int64 [N], the sampled
    tokens whose student log-prob is returned (None → target_logprob is None). impl: "tilelang"
    (CUDA, bf16) or "torch"; CPU tensors always use "torch". config: a
    `kernel.DistillKLKernelConfig` for the TileLang path.

    No clamp is applied to log-probabilities: they come from logits minus a log-sum-exp, so they
    stay finite wherever the logits are, however small the teacher's probabilities.
    """
    if isinstance(teacher_heads, torch.Tensor) and teacher_heads.dim() == 2:
        teacher_heads = teacher_heads.unsqueeze(0)
    _check_inputs(student_hidden, student_head, teacher_hidden, teacher_heads, teacher_ids, target_ids, mask, kind, temperature, reduction, impl)
    grad_enabled = torch.is_grad_enabled()
    grad_hidden = grad_enabled and student_hidden.requires_grad
    grad_head = grad_enabled and student_head.requires_grad
    use_kernel = impl == "tilelang" and student_hidden.is_cuda
    if use_kernel:
        if student_hidden.dtype != torch.bfloat16 or teacher_hidden.dtype != torch.bfloat16:
            raise ValueError("impl='tilelang' takes bf16 hidden states and heads; cast them or use impl='torch'")
        for name, width in (("student", student_hidden.shape[1]), ("teacher", teacher_hidden.shape[1])):
            if width % 8:
                raise ValueError(f"impl='tilelang' needs the {name} hidden width ({width}) to be a multiple of 8 (TMA 16-byte rows); use impl='torch'")
        try:
            from . import kernel
        except ImportError as error:
            raise RuntimeError("impl='tilelang' needs tilelang==0.1.15 (pip install tilelang==0.1.15)") from error
        backend, options = kernel.distill_kl_tilelang, ({} if config is None else {"config": config})
    else:
        backend, options = distill_kl_reference, {}
    # The gradients are computed inside (spec §6), so no autograd graph is recorded there.
    with torch.no_grad():
        result: DistillKLResult = backend(
            _contiguous(student_hidden),
            _contiguous(student_head),
            _contiguous(teacher_hidden),
            _contiguous(teacher_heads),
            _contiguous(teacher_ids),
            _contiguous(target_ids),
            _contiguous(mask),
            kind,
            beta,
            temperature,
            reduction,
            grad_hidden,
            grad_head,
            **options,
        )

    if grad_hidden or grad_head:
        # Autograd records its node after the kernels are queued, so that its host time overlaps
        # them instead of delaying the first one.
        outputs = _DistillKLFunction.apply(student_hidden, student_head, result, use_kernel)
        loss, per_token_kl, entropy = outputs[:3]
        target_logprob = outputs[3] if target_ids is not None else None
    else:
        loss, per_token_kl, entropy, target_logprob = result.loss, result.per_token_kl, result.entropy, result.target_logprob
    return DistillKLOutput(loss, per_token_kl, target_logprob, entropy)


__all__ = ["distill_kl", "distill_kl_topk", "DistillKLOutput"]
