"""Triton kernel for the symmetric products of Newton–Schulz (spec §3.11): C = s·(alpha·X·Yᵀ + beta·D + delta·I).

In a Newton–Schulz step both A = X·Xᵀ and B = b·A + c·A·A are symmetric, and since A = Aᵀ the second is
c·A·Aᵀ + b·A: the same "Gram plus addend" product. Only the tiles on and above the diagonal are computed;
each off-diagonal tile is also stored transposed below the diagonal. That halves the work of two of the
three matmuls of a step (the third, B·X, is a general product left to cuBLAS).

The Gram form of Newton–Schulz (train.optim.newton_schulz) multiplies two different symmetric matrices that
commute (polynomials of the same Gram matrix), whose product is symmetric too: with Y = B symmetric, X·Yᵀ is
that product, so the same kernel takes a second operand Y.

The optional per-matrix factor s and diagonal term delta·I let the first Newton–Schulz step take an
unnormalised X (train.optim.newton_schulz, `sum_squares`): A₀ = X·Xᵀ/‖X‖², B₀ = (a·I + b·A₀ + c·A₀²)/‖X‖,
X₁ = B₀·X, so the separate X/‖X‖ pass over the whole matrix disappears.

Imported lazily by `train.optim.newton_schulz` only when ns_kernel="triton", so CPU runs never need Triton.
The torch reference is `torch.baddbmm(D, X, X.mT, beta=beta, alpha=alpha)`.

Shapes: X and Y [batch, n, k] (row-major, contiguous; Y = X unless given), D [batch, n, n] symmetric or
None, s fp32 [batch] or None, C [batch, n, n].
TRITON_INTERPRET=1 (Triton installed, no GPU) runs the kernel on CPU tensors for debugging.
"""

import os

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]


@triton.jit
def _gram_upper_kernel(
    x_ptr, y_ptr, d_ptr, c_ptr, scale_ptr,
    N, K,
    stride_xb, stride_xn, stride_xk,
    stride_yb, stride_yn, stride_yk,
    stride_db, stride_dn, stride_dm,
    stride_cb, stride_cn, stride_cm,
    alpha, beta, delta,
    HAS_ADDEND: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DIAGONAL: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 enumerates GROUP×GROUP super-tiles of the upper triangle (row-major), and the tiles inside a
    # super-tile row-major: the ~132 programs in flight then share a few row and column blocks of X in L2
    # instead of streaming one column block per program. Axis 1 is the batch member.
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(N, BLOCK)
    GROUP = tl.minimum(tiles, 8)  # SUPER_TILE
    super_tiles = tl.cdiv(tiles, GROUP)
    super_pid = pid // (GROUP * GROUP)
    local = pid % (GROUP * GROUP)
    # Closed-form inverse of the row-major upper-triangle order: counted from the end, super-row
    # super_tiles-1-g holds g+1 super-tiles and starts at g(g+1)/2. The fp32 sqrt is exact enough for
    # q < 2^20; the two fix-ups cover rounding at the boundaries.
    q = super_tiles * (super_tiles + 1) // 2 - 1 - super_pid
    g = ((tl.sqrt((8 * q + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    g = tl.where((g + 1) * (g + 2) // 2 <= q, g + 1, g)
    g = tl.where(g * (g + 1) // 2 > q, g - 1, g)
    ti = (super_tiles - 1 - g) * GROUP + local // GROUP
    tj = (super_tiles - 1 - (q - g * (g + 1) // 2)) * GROUP + local % GROUP
    if (ti > tj) | (tj >= tiles):
        return  # below the diagonal inside a diagonal super-tile, or past the last tile

    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + bid * stride_xb + rows[:, None] * stride_xn + ks[None, :] * stride_xk
    b_ptrs = y_ptr + bid * stride_yb + cols[:, None] * stride_yn + ks[None, :] * stride_yk
    row_ok = rows[:, None] < N
    col_ok = cols[:, None] < N

    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (ks[None, :] + kb * BLOCK_K) < K
        a = tl.load(a_ptrs, mask=row_ok & k_ok, other=0.0)
        b = tl.load(b_ptrs, mask=col_ok & k_ok, other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_yk

    acc = acc * alpha
    out_mask = (rows[:, None] < N) & (cols[None, :] < N)
    if HAS_ADDEND:
        d_ptrs = d_ptr + bid * stride_db + rows[:, None] * stride_dn + cols[None, :] * stride_dm
        acc += beta * tl.load(d_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_DIAGONAL:
        if ti == tj:
            acc += tl.where(rows[:, None] == cols[None, :], delta, 0.0)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + bid)
    out = acc.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + bid * stride_cb
    tl.store(c_base + rows[:, None] * stride_cn + cols[None, :] * stride_cm, out, mask=out_mask)
    if ti != tj:
        # Mirror: element (r, c) of this tile is C[c, r]; storing the transposed tile keeps writes row-major.
        mirror_mask = (cols[:, None] < N) & (rows[None, :] < N)
        tl.store(c_base + cols[:, None] * stride_cn + rows[None, :] * stride_cm, tl.trans(out), mask=mirror_mask)


_gram_upper_kernel_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"])(_gram_upper_kernel)


SUPER_TILE = 8
"""Tiles per side of the super-tiles that order the programs for L2 reuse (also hard-coded in the kernel)."""


def _grid_size(n: int, block: int) -> tuple[int, int]:
    """(programs along axis 0, super-tile side) for an n×n output in block×block tiles."""
    tiles = (n + block - 1) // block
    group = min(SUPER_TILE, tiles)
    super_tiles = (tiles + group - 1) // group
    return super_tiles * (super_tiles + 1) // 2 * group * group, group


def symmetric_gram(
    X: torch.Tensor,
    *,
    other: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    addend: torch.Tensor | None = None,
    diagonal: float | None = None,
    scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """scale·(alpha·X·Yᵀ + beta·addend + diagonal·I) for X [batch, n, k] (CUDA, contiguous), Y = `other` or X.

    other: [batch, n, k] with X·otherᵀ symmetric (the caller's guarantee: only the upper tiles are computed),
    e.g. a symmetric matrix that commutes with X. None: Y = X, the Gram matrix.
    addend: [batch, n, n] symmetric or None; diagonal: added to the diagonal, or None; scale: fp32 [batch]
    (one factor per matrix, on X's device) or None. The whole sum is formed in fp32 and rounded once.

    config: fixed launch parameters {"BLOCK", "BLOCK_K", "num_warps", "num_stages"}; None autotunes per (n, k).
    Returns C [batch, n, n] in X's dtype, accumulated in fp32.
    """
    if X.ndim != 3:
        raise ValueError(f"symmetric_gram expects X [batch, n, k], got shape {tuple(X.shape)}")
    if not X.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("symmetric_gram needs a CUDA tensor: use the torch Newton–Schulz path on CPU")
    X = X.contiguous()
    Y = X if other is None else other.contiguous()
    if Y.shape != X.shape or Y.dtype != X.dtype:
        raise ValueError(f"other must match X: {Y.dtype} {tuple(Y.shape)} vs {X.dtype} {tuple(X.shape)}")
    batch, n, k = X.shape
    C = torch.empty((batch, n, n), dtype=X.dtype, device=X.device)
    if addend is not None:
        if addend.shape != C.shape:
            raise ValueError(f"addend shape {tuple(addend.shape)} != output shape {tuple(C.shape)}")
        d = addend
    else:
        d = C  # never read: HAS_ADDEND=False
    if scale is not None and (scale.shape != (batch,) or scale.dtype != torch.float32 or scale.device != X.device):
        raise ValueError(
            f"scale must be fp32 [{batch}] on {X.device}, got {scale.dtype} {tuple(scale.shape)} on {scale.device}"
        )
    grid = lambda meta: (_grid_size(n, meta["BLOCK"])[0], batch)
    kernel = _gram_upper_kernel_tuned if config is None else _gram_upper_kernel
    kernel[grid](
        X, Y, d, C, scale if scale is not None else C,
        n, k,
        X.stride(0), X.stride(1), X.stride(2),
        Y.stride(0), Y.stride(1), Y.stride(2),
        d.stride(0), d.stride(1), d.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        alpha, beta, diagonal or 0.0,
        HAS_ADDEND=addend is not None,
        HAS_SCALE=scale is not None,
        HAS_DIAGONAL=diagonal is not None,
        IEEE_FP32=X.dtype == torch.float32,
        **(config or {}),
    )
    return C
