"""mHC: manifold-constrained hyper-connections (spec §3.1).

Legend: B batch, T tokens, H streams (n_hc), D hidden size, M = (2 + H) * H mixing logits.
Everything here runs in fp32 (spec §3.10). Row order of `fn`, `base` and the mixing logits:
[pre (H), post (H), comb (H*H, row-major)] (spec §3.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def sinkhorn(comb_logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Spec §3.1.2 step 6: row softmax + eps, column norm, then (iters-1) x (row, column) norms.

    comb_logits: [..., H, H] fp32. The last step normalizes columns, so column sums are ~1 to
    fp precision and row sums only approximately (spec §5 items 1-2).
    """
    comb = comb_logits.float().softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


@dataclass
class HCMix:
    """Per-token mHC maps of one sublayer."""
    pre_BTH: torch.Tensor
    post_BTH: torch.Tensor
    comb_BTHH: torch.Tensor
    comb_logits_BTHH: torch.Tensor


def _mixing_logits(streams_BTHD: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(x . fn^T) * rho with rho the unweighted RMS factor of the flattened H*D vector."""
    x = streams_BTHD.flatten(-2).float()
    rho = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)
    return (x @ fn.float().t()) * rho


class HyperConnection(nn.Module):
    """One mHC unit around a sublayer: `hc_{name}_fn`, `hc_{name}_base`, `hc_{name}_scale`.

    The parameters live on the owning block (checkpoint names `hc_attn_*`, `hc_ffn_*`); this
    module only holds the math and is given them at call time.
    """

    def __init__(self, n_streams: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 dynamic: bool):
        super().__init__()
        self.n_streams, self.sinkhorn_iters = n_streams, sinkhorn_iters
        self.hc_eps, self.norm_eps, self.dynamic = hc_eps, norm_eps, dynamic

    def mix(self, streams_BTHD: torch.Tensor, fn: torch.Tensor, base: torch.Tensor,
            scale: torch.Tensor) -> HCMix:
        """Dynamic pre/post/comb maps (spec §3.1.2 steps 1-6)."""
        H = self.n_streams
        lead = streams_BTHD.shape[:-2]
        if not self.dynamic:
            one = streams_BTHD.new_ones(*lead, 1, dtype=torch.float32)
            return HCMix(one, one, one[..., None], torch.zeros_like(one[..., None]))
        mix = _mixing_logits(streams_BTHD, fn, self.norm_eps)
        base = base.float()
        pre = torch.sigmoid(mix[..., :H] * scale[0] + base[:H]) + self.hc_eps
        post = 2 * torch.sigmoid(mix[..., H:2 * H] * scale[1] + base[H:2 * H])
        comb_logits = (mix[..., 2 * H:] * scale[2] + base[2 * H:]).unflatten(-1, (H, H))
        comb = sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)
        return HCMix(pre, post, comb, comb_logits)

    @staticmethod
    def collapse(streams_BTHD: torch.Tensor, pre_BTH: torch.Tensor) -> torch.Tensor:
        """Layer input u = sum_j pre_j X_j (step 7), cast back to the activation dtype."""
        u = (pre_BTH[..., None] * streams_BTHD.float()).sum(-2)
        return u.to(streams_BTHD.dtype)

    @staticmethod
    def expand(out_BTD: torch.Tensor, streams_BTHD: torch.Tensor, mix: HCMix) -> torch.Tensor:
        """Post-mix X'_j = post_j y + sum_i comb_ij X_i (step 8): new stream j takes column j."""
        mixed = torch.einsum("btij,btid->btjd", mix.comb_BTHH, streams_BTHD.float())
        new = mix.post_BTH[..., None] * out_BTD.float()[..., None, :] + mixed
        return new.to(streams_BTHD.dtype)


def hc_head_collapse(streams_BTHD: torch.Tensor, fn: torch.Tensor, base: torch.Tensor,
                     scale: torch.Tensor, hc_eps: float, norm_eps: float,
                     dynamic: bool = True) -> torch.Tensor:
    """Final collapse (spec §3.1.3): pre = sigmoid(mix*scale + base) + eps; h = sum_j pre_j X_j."""
    if not dynamic:
        return streams_BTHD.sum(-2)
    mix = _mixing_logits(streams_BTHD, fn, norm_eps)
    pre = torch.sigmoid(mix * scale[0] + base.float()) + hc_eps
    return HyperConnection.collapse(streams_BTHD, pre)


def init_hc_params(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                   fn_std: float, init_scale: float) -> None:
    """Spec §3.1.4 [rec]: fn ~ N(0, 0.006), base = 0, scale = 0.01 (a pre-norm residual)."""
    with torch.no_grad():
        nn.init.normal_(fn, std=fn_std)
        base.zero_()
        scale.fill_(init_scale)


def sinkhorn_row_error(comb_BTHH: torch.Tensor) -> torch.Tensor:
    """max |row sum - 1| of comb over all tokens (a monitoring metric, spec §5 item 2)."""
    return (comb_BTHH.sum(-1) - 1).abs().amax()
