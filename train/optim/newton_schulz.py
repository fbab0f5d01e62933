"""Hybrid Newton–Schulz orthogonalisation (spec §3.11; invariants §5.9–§5.12).

HybridNS(M): work in the wide orientation, X0 = M / max(‖M‖_F, 1e-7), then 10 iterations of
X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X: 8 with (3.4445, −4.7750, 2.0315), which push the singular values into
about [0.68, 1.13], then 2 with (2, −1.5, 0.5), for which p(1) = 1 and p'(1) = 0, so they converge
quadratically to 1. Each iteration is computed as A = XXᵀ, B = b·A + c·A·A, X ← a·X + B·X.

When the caller already knows each matrix's sum of squares (the fused Muon step writes it while producing
the look-ahead: `sum_squares`), the Triton path folds 1/‖M‖ into the first step instead of a separate pass
that reads and rewrites M: A₀ = M·Mᵀ/‖M‖², B₀ = (a·I + b·A₀ + c·A₀²)/‖M‖, X₁ = B₀·M — the same X₁ as
a·X₀ + b·A₀X₀ + c·A₀²X₀ with X₀ = M/‖M‖, with one rounding fewer on X₀ and one more on B₀'s diagonal.

The Gram form (`form="gram"`, for wide matrices: n ≪ m) runs the same iteration on n×n matrices only. Every
X_k is P·X₀ for a polynomial P of R = X₀X₀ᵀ, so with M = a·I + b·R + c·R² a step is Q ← Q·M (Q = P) and
R ← M·R·M, and X = Q·X₀ is formed only at the restarts and the end: 4 n×n products a step instead of two n×n×m products and
one n×n×n. All these matrices are polynomials of one R, so they commute and every product is symmetric (half
the tiles with the Triton kernel). Rounding errors in R's near-null directions grow by a² ≈ 11.9 a step
instead of being recomputed from X, so X and R are rebuilt (X ← Q·X, R ← X·Xᵀ) before the steps in
`GRAM_RESTARTS`, and the bf16 computation runs in fp16 (same tensor-core rate, 3 more mantissa bits; all
values stay far below fp16's range: ‖X₀‖_F = 1, ‖R‖ ≤ 1, ‖Q‖ ≤ a² per segment). In bf16 the output's singular
values drifted by 1–2 %; with longer segments, or none, fp16 overflowed on ill-conditioned inputs (bench/NOTES.md).
Same idea as Dao AI Lab's "Gram Newton–Schulz" (restarts, fp16).

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
GRAM_RESTARTS = (2, 4, 6, 8)
"""Steps before which the Gram form rebuilds X and R: segments of two steps bound the growth of R's rounding
errors to a⁴ ≈ 141 (bench/NOTES.md compares schedules)."""
GRAM_MIN_ASPECT = 2.0
"""form="auto" takes the Gram form for matrices at least this much wider than tall (cost model in bench/NOTES.md)."""
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


def resolve_ns_form(form: str, shape: tuple[int, ...], device: torch.device) -> str:
    """"standard" or "gram" for matrices of `shape` (last two dims) on `device`; form "auto" picks the Gram form
    on CUDA for matrices at least GRAM_MIN_ASPECT times wider than tall (CPU runs are the reference)."""
    if form in ("standard", "gram"):
        return form
    if form != "auto":
        raise ValueError(f"ns_form={form!r}: use 'auto', 'standard' or 'gram'")
    short, long = sorted(shape[-2:])
    gram = torch.device(device).type == "cuda" and long >= GRAM_MIN_ASPECT * short
    return "gram" if gram else "standard"


def hybrid_newton_schulz(
    G: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    kernel: str = "torch",
    sum_squares: torch.Tensor | None = None,
    form: str = "standard",
) -> torch.Tensor:
    """Orthogonalise G ([n, m] or [batch, n, m], float) with the V4 hybrid Newton–Schulz schedule.

    Each matrix is normalised by its own Frobenius norm, so the batch members never interact.
    dtype: compute dtype; None = bf16 on CUDA, fp32 elsewhere. kernel: "torch" (cuBLAS/CPU matmuls)
    or "triton" (symmetric-product kernel for XXᵀ and b·A + c·A², CUDA only; cuBLAS where that kernel would
    have too few tiles, `symmetric_kernel_pays`).
    sum_squares: fp32 [batch] or [batch, parts] (parts summed) with Σ G² of each matrix, computed by the
    caller from G's values; G is then not read for its norm, and in the standard form with kernel="triton" the
    normalisation is folded into the first iteration (module docstring). None: the norm is computed here.
    form: "standard" (X·Xᵀ products every step) or "gram" (n×n products, restarts; module docstring).
    Returns a tensor of G's shape in the compute dtype (fp16 for the Gram form of bf16 work), with singular values ≈ 1
    (exactly the U·Vᵀ of G's SVD in the limit), so callers scale and cast it once, fused into the update.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"hybrid_newton_schulz expects [n, m] or [batch, n, m], got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"hybrid_newton_schulz expects a floating tensor, got {G.dtype}")
    if kernel not in ("torch", "triton"):
        raise ValueError(f"kernel={kernel!r}: use 'torch' or 'triton'")
    if kernel == "triton" and G.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel='triton' needs a CUDA tensor: use kernel='torch' on CPU")
    if form not in ("standard", "gram"):
        raise ValueError(f"form={form!r}: use 'standard' or 'gram'")
    compute_dtype = dtype if dtype is not None else resolve_ns_dtype("auto", G.device)

    X = G if G.ndim == 3 else G.unsqueeze(0)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    if kernel == "triton" and X.is_cuda and not symmetric_kernel_pays(X.shape[0], X.shape[1], X.device):
        kernel = "torch"
    if sum_squares is not None:
        if sum_squares.dtype != torch.float32 or sum_squares.shape[0] != X.shape[0]:
            raise ValueError(
                f"sum_squares must be fp32 [{X.shape[0]}, ...], got {sum_squares.dtype} {tuple(sum_squares.shape)}"
            )
        norm = sum_squares.reshape(X.shape[0], -1).sum(dim=1).sqrt().view(-1, 1, 1)
    else:
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    norm = norm.clamp_min(NORM_FLOOR)

    if form == "gram":
        gram_dtype = torch.float16 if compute_dtype == torch.bfloat16 else compute_dtype
        # One pass normalises and casts (a raw gradient can overflow fp16 or fall below its normal range).
        X0 = torch.empty(X.shape, dtype=gram_dtype, device=X.device)
        torch.mul(X, norm.reciprocal(), out=X0)
        X = _gram_newton_schulz(X0, kernel)
    else:
        X = _standard_newton_schulz(X, norm, compute_dtype, kernel, folded=sum_squares is not None)
    if tall:
        X = X.mT
    return X if G.ndim == 3 else X.squeeze(0)


def _standard_newton_schulz(
    X: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype, kernel: str, folded: bool
) -> torch.Tensor:
    """The standard form (module docstring) on wide X [batch, n, m] with norms [batch, 1, 1]; folded (Triton
    only): the norms came from the caller, so 1/‖X‖ goes into the first step instead of a division pass."""
    schedule = HYBRID_SCHEDULE
    if kernel == "triton" and folded:
        from train.optim.symmetric_kernel import symmetric_gram

        X = X.to(dtype).contiguous()  # no copy for the fused step's bucket buffers
        inverse = norm.view(-1).reciprocal()
        (a, b, c), schedule = schedule[0], schedule[1:]
        A = symmetric_gram(X, scale=inverse * inverse)  # X₀X₀ᵀ from the unnormalised X
        B = symmetric_gram(A, alpha=c, beta=b, addend=A, diagonal=a, scale=inverse)  # (aI + bA + cA²)/‖X‖
        X = torch.bmm(B, X)
    else:
        # The norm is accumulated in fp32; the division runs in the compute dtype, so a bf16 input is read and
        # written once in bf16 instead of passing through an fp32 copy (the bf16-rounded norm is within 2^-9).
        X = X.to(dtype) / norm.to(dtype)
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
    return X


SYMMETRIC_KERNEL_MIN_WAVES = 4
"""The Triton upper-tile kernel beats cuBLAS only with enough 128×128 tiles to fill the GPU several times: a
single 2048-row matrix (136 tiles on 132 SMs) ran its products 1.9–2.2× slower than cuBLAS, 4096 rows (528
tiles) and the expert batches faster (bench/NOTES.md)."""


def symmetric_kernel_pays(batch: int, rows: int, device: torch.device) -> bool:
    """Whether the symmetric-product kernel has at least SYMMETRIC_KERNEL_MIN_WAVES waves of upper tiles."""
    tiles = -(-rows // 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return batch * tiles * (tiles + 1) // 2 >= SYMMETRIC_KERNEL_MIN_WAVES * sms


def _gram_newton_schulz(X: torch.Tensor, kernel: str) -> torch.Tensor:
    """The Gram form (module docstring) of the hybrid schedule on normalised, wide X [batch, n, m]."""
    product = _symmetric_product(kernel)
    R, Q = product(X, X), None
    steps = len(HYBRID_SCHEDULE)
    for step, (a, b, c) in enumerate(HYBRID_SCHEDULE):
        if step in GRAM_RESTARTS:
            X = torch.bmm(Q, X)
            R, Q = product(X, X), None
        M = product(R, R, alpha=c, beta=b, addend=R, diagonal=a)  # a·I + b·R + c·R²
        Q = M if Q is None else product(Q, M)
        if step + 1 < steps and step + 1 not in GRAM_RESTARTS:
            R = product(M, product(R, M))
    return torch.bmm(Q, X)


def _symmetric_product(kernel: str):
    """f(A, B, alpha, beta, addend, diagonal) = alpha·A·Bᵀ + beta·addend + diagonal·I for A·Bᵀ symmetric: the
    Triton upper-tile kernel, or cuBLAS/CPU matmuls (the reference)."""
    if kernel == "triton":
        from train.optim.symmetric_kernel import symmetric_gram

        return lambda A, B, **kw: symmetric_gram(A, other=None if B is A else B, **kw)

    def product(A, B, *, alpha=1.0, beta=0.0, addend=None, diagonal=None):
        out = torch.bmm(A, B.mT) if addend is None else torch.baddbmm(addend, A, B.mT, beta=beta, alpha=alpha)
        if diagonal is not None:
            out.diagonal(dim1=-2, dim2=-1).add_(diagonal)
        return out

    return product


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
