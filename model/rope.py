"""Interleaved RoPE on the last dims, with YaRN frequency interpolation (spec §3.2).

Pairs (2i, 2i+1) of the last r dims rotate together. Frequencies theta_i = base^(-2i/r).
YaRN blends theta_i/factor and theta_i with a linear ramp between the correction dims of
beta_fast and beta_slow at `original_seq_len`; no mscale on the logits. Sliding-only layers use
base 1e4 without YaRN; CSA/HCA layers use the compress base with YaRN (spec §6 pitfall 5).
"""

from __future__ import annotations

import math

import torch


def rope_frequencies(rope_dim: int, base: float, factor: float = 1.0, original_seq_len: int = 0,
                     beta_fast: int = 32, beta_slow: int = 1) -> torch.Tensor:
    """Angular frequency per rotated pair, fp32 [rope_dim // 2]."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if factor > 1 and original_seq_len > 0:
        def correction_dim(rotations: float) -> float:
            return rope_dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs.float()


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer positions [...] -> [..., r/2] each (fp32)."""
    angles = positions.to(torch.float64)[..., None] * freqs.to(positions.device, torch.float64)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] dims of x in interleaved pairs.

    x: [..., n] with cos/sin broadcastable to [..., r/2] (leading dims of x, e.g. heads, must
    be inserted by the caller). `inverse` applies the conjugate rotation (output de-rotation).
    """
    half = cos.shape[-1]
    rot = x[..., x.shape[-1] - 2 * half:].float().unflatten(-1, (half, 2))
    a, b = rot[..., 0], rot[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., : x.shape[-1] - 2 * half], rotated.to(x.dtype)), dim=-1)
