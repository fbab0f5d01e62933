"""Hybrid Newton–Schulz orthogonalisation (spec §3.11; invariants §5.9–§5.12).

HybridNS(M): work in the wide orientation, X0 = M / max(‖M‖_F, 1e-7), then 10 iterations of
X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X: 8 with (3.4445, −4.7750, 2.0315), which push the singular values into
about [0.68, 1.13], then 2 with (2, −1.5, 0.5), for which p(1) = 1 and p'(1) = 0, so they converge
quadratically to 1. Each iteration is computed as A = XXᵀ, B = b·A + c·A·A, X ← a·X + B·X.

When the caller already knows each matrix's sum of squares (the fused Muon step writes it while producing
the look-ahead: `sum_squares`), the Triton path folds 1/‖M‖ into the first step instead of a separate pass
that reads and rewrites M: A₀ = M·Mᵀ/‖M‖², B₀ = (a·I + b·A₀ + c·A₀²)/‖M‖, X₁ = B₀·M — the same X₁ as
a·X₀ + b·A₀X₀ + c·A₀²X₀ with X₀ = M/‖M‖, with one rounding fewer on X₀ and one more on B₀'s diagonal.

Shapes: G is [n, m] or a stack [batch, n, m] of same-shape matrices (all experts of a layer, the o_groups
blocks of wo_a, …), orthogonalised independently in one batched call.
"""

import os

import torch

QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: steep slope at 0, drives σ ∈ [1e-3, 1] into [0.68, 1.13] in 8 steps."""
STABILIZING_COEFFS = (2.0, -1.5, 0.5)
"""p(σ) = 2σ − 1.5σ³ + 0.5σ⁵: p(1) = 1, p'(1) = 0, so σ converges quadratically to exactly 1."""
HYBRID_SCHEDULE = (QUINTIC_COEFFS,) * 8 + (STABILIZING_COEFFS,) * 2
"""The V4 schedule: 8 quintic steps, then 2 stabilizing steps (§3.11)."""
NORM_FLOOR = 1e-7
"""Floor on ‖M‖_F so an all-zero gradient gives a zero update instead of NaN (§3.11)."""


def resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """Newton–Schulz compute dtype for `ns_dtype` ("auto" | "bfloat16" | "float32") on `device`.

    "auto" is bf16 on CUDA (the report runs NS in BF16) and fp32 elsewhere, where bf16 matmuls are slow
    and CPU runs are the numerical reference.
    """
    if ns_dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if ns_dtype == "bfloat16":
        return torch.bfloat16
    if ns_dtype == "float32":
        return torch.float32
    raise ValueError(f"ns_dtype={ns_dtype!r}: use 'auto', 'bfloat16' or 'float32'")


def hybrid_newton_schulz(
    G: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    kernel: str = "torch",
    sum_squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Orthogonalise G ([n, m] or [batch, n, m], float) with the V4 hybrid Newton–Schulz schedule.

    Each matrix is normalised by its own Frobenius norm, so the batch members never interact.
    dtype: compute dtype; None = bf16 on CUDA, fp32 elsewhere. kernel: "torch" (cuBLAS/CPU matmuls)
    or "triton" (symmetric-product kernel for XXᵀ and b·A + c·A², CUDA only).
    sum_squares: fp32 [batch] or [batch, parts] (parts summed) with Σ G² of each matrix, computed by the
    caller from G's values; G is then not read for its norm, and with kernel="triton" the normalisation is
    folded into the first iteration (module docstring). None: the norm is computed here.
    Returns a tensor of G's shape in the compute dtype, with singular values ≈ 1 (exactly the U·Vᵀ of
    G's SVD in the limit), so callers scale and cast it once, fused into the parameter update.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"hybrid_newton_schulz expects [n, m] or [batch, n, m], got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"hybrid_newton_schulz expects a floating tensor, got {G.dtype}")
    if kernel not in ("torch", "triton"):
        raise ValueError(f"kernel={kernel!r}: use 'torch' or 'triton'")
    if kernel == "triton" and G.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel='triton' needs a CUDA tensor: use kernel='torch' on CPU")
    compute_dtype = dtype if dtype is not None else resolve_ns_dtype("auto", G.device)

    X = G if G.ndim == 3 else G.unsqueeze(0)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    if sum_squares is not None:
        if sum_squares.dtype != torch.float32 or sum_squares.shape[0] != X.shape[0]:
            raise ValueError(
                f"sum_squares must be fp32 [{X.shape[0]}, ...], got {sum_squares.dtype} {tuple(sum_squares.shape)}"
            )
        norm = sum_squares.reshape(X.shape[0], -1).sum(dim=1).sqrt().view(-1, 1, 1)
    else:
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    norm = norm.clamp_min(NORM_FLOOR)

    schedule = HYBRID_SCHEDULE
    if kernel == "triton" and sum_squares is not None:
        from train.optim.symmetric_kernel import symmetric_gram

        X = X.to(compute_dtype).contiguous()  # no copy for the fused step's bucket buffers
        inverse = norm.view(-1).reciprocal()
        (a, b, c), schedule = schedule[0], schedule[1:]
        A = symmetric_gram(X, scale=inverse * inverse)  # X₀X₀ᵀ from the unnormalised X
        B = symmetric_gram(A, alpha=c, beta=b, addend=A, diagonal=a, scale=inverse)  # (aI + bA + cA²)/‖X‖
        X = torch.bmm(B, X)
    else:
        # The norm is accumulated in fp32; the division runs in the compute dtype, so a bf16 input is read and
        # written once in bf16 instead of passing through an fp32 copy (the bf16-rounded norm is within 2^-9).
        X = X.to(compute_dtype) / norm.to(compute_dtype)
        # The stabilising steps need an X whose rows are contiguous for the kernels and for baddbmm's output.
        X = X.contiguous()

    if kernel == "triton":
        from train.optim.symmetric_kernel import symmetric_gram

        for a, b, c in schedule:
            A = symmetric_gram(X)  # X·Xᵀ, upper tiles only
            B = symmetric_gram(A, alpha=c, beta=b, addend=A)  # c·A·Aᵀ + b·A = b·A + c·A² (A symmetric)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    else:
        for a, b, c in schedule:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)

    if tall:
        X = X.mT
    return X if G.ndim == 3 else X.squeeze(0)


def plain_newton_schulz(G: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Textbook form of the same iteration (separate matmuls and elementwise ops), for benchmarks and tests."""
    compute_dtype = dtype if dtype is not None else resolve_ns_dtype("auto", G.device)
    X = G.to(compute_dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NORM_FLOOR)
    for a, b, c in HYBRID_SCHEDULE:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X
