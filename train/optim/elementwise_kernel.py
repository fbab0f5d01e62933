"""Triton kernels for the memory-bound half of a Muon step (spec §3.11), one launch per bucket and orientation.

1. `lookahead_into_bucket`: M ← μ·M + G (in place) and L = G + μ·M (Nesterov) or M, cast to the Newton–Schulz
   dtype and written, in the wide orientation, straight into the bucket's stacked buffer. Replaces three
   foreach passes over fp32 (32 B/value), the stacking copy (6 B/value) and a transposed copy: 14 B/value.
   Optionally each tile also writes the sum of squares of its (rounded) look-ahead values to
   `sum_squares[matrix slot, tile]`, so Newton–Schulz gets every matrix's norm without reading the buffer
   again (train.optim.newton_schulz folds 1/‖X‖ into its first step). Partial sums, added up in a fixed
   order afterwards: no atomics, the same result on every run.
2. `apply_bucket_update`: W ← W·(1 − η·λ) − η·s·O from the bucket's Newton–Schulz output, transposed
   back for tall matrices. Replaces a foreach multiply and one add per tensor (18 B/value): 10 B/value.

A launch covers every matrix of one bucket with one orientation. Matrices live in different tensors, so the
kernels read each matrix's tensor through a table of base addresses (one row per tensor: gradient, momentum,
parameter), refreshed every step because gradients are re-allocated by backward. All tensors of a launch
share one dtype and are contiguous (train.optim.bucketed_step checks).

The torch reference is Muon's foreach path (OptimConfig.muon_elementwise="foreach").
"""

import torch
import triton
import triton.language as tl

from train.optim.bucketed_step import TILE as BLOCK
GRAD, MOMENTUM, PARAM = 0, 1, 2
"""Columns of the per-tensor address table."""


@triton.jit
def _matrix_pointers(bases_ptr, tensor_ptr, offset_ptr, matrix, column, ref_ptr):
    tensor = tl.load(tensor_ptr + matrix).to(tl.int64)
    base = tl.load(bases_ptr + tensor * 3 + column).to(tl.pointer_type(ref_ptr.dtype.element_ty))
    return base + tl.load(offset_ptr + matrix)


@triton.jit
def _lookahead_kernel(
    bases_ptr, tensor_ptr, offset_ptr, slot_ptr, out_ptr, ref_ptr, sumsq_ptr,
    R, C, stride_out_b, stride_out_n, stride_sumsq,
    momentum,
    NESTEROV: tl.constexpr, TRANSPOSED: tl.constexpr, SUM_SQUARES: tl.constexpr, BLOCK: tl.constexpr,
):
    matrix = tl.program_id(0)
    tile = tl.program_id(1)
    grad = _matrix_pointers(bases_ptr, tensor_ptr, offset_ptr, matrix, 0, ref_ptr)
    buf = _matrix_pointers(bases_ptr, tensor_ptr, offset_ptr, matrix, 1, ref_ptr)
    tiles_c = tl.cdiv(C, BLOCK)
    rows = (tile // tiles_c) * BLOCK + tl.arange(0, BLOCK)
    cols = (tile % tiles_c) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    src = rows[:, None] * C + cols[None, :]
    g = tl.load(grad + src, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(buf + src, mask=mask, other=0.0).to(tl.float32)
    m = m * momentum + g
    tl.store(buf + src, m.to(buf.dtype.element_ty), mask=mask)
    if NESTEROV:
        look = g + momentum * m
    else:
        look = m
    slot = tl.load(slot_ptr + matrix).to(tl.int64)
    out = out_ptr + slot * stride_out_b
    look = look.to(out_ptr.dtype.element_ty)
    if SUM_SQUARES:  # of the values Newton–Schulz will read (masked lanes hold 0)
        rounded = look.to(tl.float32)
        tl.store(sumsq_ptr + slot * stride_sumsq + tile, tl.sum(tl.sum(rounded * rounded, axis=1), axis=0))
    if TRANSPOSED:  # source [m, n] → bucket row [n, m]: element (r, c) goes to (c, r)
        tl.store(out + cols[:, None] * stride_out_n + rows[None, :], tl.trans(look),
                 mask=(cols[:, None] < C) & (rows[None, :] < R))
    else:
        tl.store(out + rows[:, None] * stride_out_n + cols[None, :], look, mask=mask)


@triton.jit
def _update_kernel(
    bases_ptr, tensor_ptr, offset_ptr, slot_ptr, upd_ptr, ref_ptr,
    R, C, stride_upd_b, stride_upd_n, stride_upd_m,
    decay, step,
    TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr,
):
    matrix = tl.program_id(0)
    tile = tl.program_id(1)
    param = _matrix_pointers(bases_ptr, tensor_ptr, offset_ptr, matrix, 2, ref_ptr)
    tiles_c = tl.cdiv(C, BLOCK)
    rows = (tile // tiles_c) * BLOCK + tl.arange(0, BLOCK)
    cols = (tile % tiles_c) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    src = rows[:, None] * C + cols[None, :]
    upd = upd_ptr + tl.load(slot_ptr + matrix).to(tl.int64) * stride_upd_b
    if TRANSPOSED:
        o = tl.trans(tl.load(upd + cols[:, None] * stride_upd_n + rows[None, :] * stride_upd_m,
                             mask=(cols[:, None] < C) & (rows[None, :] < R), other=0.0))
    else:
        o = tl.load(upd + rows[:, None] * stride_upd_n + cols[None, :] * stride_upd_m, mask=mask, other=0.0)
    w = tl.load(param + src, mask=mask, other=0.0).to(tl.float32)
    # Rounded as the foreach path rounds: W·decay first (torch._foreach_mul_), then the scaled add.
    w = w * decay
    w = w - step * o.to(tl.float32)
    tl.store(param + src, w.to(param.dtype.element_ty), mask=mask)


def lookahead_into_bucket(
    bases: torch.Tensor,
    launch: "dict",
    out: torch.Tensor,
    ref: torch.Tensor,
    momentum: float,
    nesterov: bool,
    sum_squares: torch.Tensor | None = None,
) -> None:
    """Momentum update and look-ahead for the matrices of `launch` (tables built by bucketed_step), into `out`.

    bases: int64 [tensors, 3] addresses (GRAD, MOMENTUM, PARAM columns) on the GPU; ref: any tensor of the
    launch's parameter dtype; out: the bucket's stacked buffer [total, n, m] (rows contiguous);
    sum_squares: fp32 [total, tiles] (tiles = bucketed_step.tiles_per_matrix) or None.
    """
    rows, cols = launch["source_shape"]
    tiles = triton.cdiv(rows, BLOCK) * triton.cdiv(cols, BLOCK)
    if sum_squares is not None and (sum_squares.shape[1] != tiles or sum_squares.stride(1) != 1):
        raise ValueError(f"sum_squares needs {tiles} contiguous columns, got shape {tuple(sum_squares.shape)}")
    grid = (launch["count"], tiles)
    _lookahead_kernel[grid](
        bases, launch["tensor"], launch["offset"], launch["slot"], out, ref,
        sum_squares if sum_squares is not None else out,
        rows, cols, out.stride(0), out.stride(1), sum_squares.stride(0) if sum_squares is not None else 0,
        momentum,
        NESTEROV=nesterov, TRANSPOSED=launch["transposed"], SUM_SQUARES=sum_squares is not None,
        BLOCK=BLOCK, num_warps=4,
    )


def apply_bucket_update(
    bases: torch.Tensor, launch: "dict", update: torch.Tensor, ref: torch.Tensor, decay: float, step: float
) -> None:
    """W ← W·decay − step·O for the matrices of `launch`, O read from `update` [total, n, m]."""
    rows, cols = launch["source_shape"]
    grid = (launch["count"], triton.cdiv(rows, BLOCK) * triton.cdiv(cols, BLOCK))
    _update_kernel[grid](
        bases, launch["tensor"], launch["offset"], launch["slot"], update, ref,
        rows, cols, update.stride(0), update.stride(1), update.stride(2),
        decay, step,
        TRANSPOSED=launch["transposed"], BLOCK=BLOCK, num_warps=4,
    )
