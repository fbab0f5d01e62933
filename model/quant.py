"""FP8 / MXFP4 fake quantization with straight-through gradients, and the Hadamard transform.

Spec §3.10 and §3.4: FP8 e4m3 with power-of-two (ue8m0) scales, scale = 2^ceil(log2(amax/448)),
amax floored at 1e-4; MXFP4 e2m1 values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6} in 1×B blocks with
scale 2^ceil(log2(amax/6)). Blocks run along the last dim. Rounding is to nearest, ties to
even (what a hardware cast does). The backward is the identity (straight-through estimator).
"""

from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(AMAX_FLOOR) / qmax)))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"fake quantization: block {block} does not divide last dim {x.shape[-1]}")
    return x.unflatten(-1, (x.shape[-1] // block, block))


def fp8_quantize(x: torch.Tensor, block: int) -> torch.Tensor:
    """Values of x after an e4m3 round trip with one power-of-two scale per block (no STE)."""
    xb = _blocks(x.float(), block)
    scale = _pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def _round_to_fp4_grid(a: torch.Tensor) -> torch.Tensor:
    """Round |values| in [0, 6] to the e2m1 grid, ties to the even mantissa."""
    grid = torch.tensor(FP4_GRID, device=a.device, dtype=a.dtype)
    mids = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(a, mids, right=False)          # ties land on the lower neighbour
    tie = (idx < len(mids)) & (a == mids[idx.clamp_max(len(mids) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # odd grid index = odd mantissa
    return grid[idx]


def fp4_quantize(x: torch.Tensor, block: int) -> torch.Tensor:
    """Values of x after an MXFP4 (e2m1, e8m0 scale) round trip per 1×block (no STE)."""
    xb = _blocks(x.float(), block)
    scale = _pow2_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX)
    mag = _round_to_fp4_grid((xb.abs() / scale).clamp_max(FP4_MAX))
    return (torch.sign(xb) * mag * scale).flatten(-2).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 fake quantization with a straight-through gradient."""
    return x + (fp8_quantize(x.detach(), block) - x).detach()


def fake_quant_fp4(x: torch.Tensor, block: int) -> torch.Tensor:
    """MXFP4 fake quantization with a straight-through gradient."""
    return x + (fp4_quantize(x.detach(), block) - x).detach()


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).float()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform over the last dim (a power of two); orthogonal."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    return x @ _hadamard_cpu(n).to(device=x.device, dtype=x.dtype)
