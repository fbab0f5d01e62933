"""mHC invariants (spec §5 items 1-8)."""

import pytest
import torch

from model import ModelArgs, V4Model
from model.mhc import HyperConnection, sinkhorn
from model.norm import RMSNorm

H, ITERS, EPS = 4, 20, 1e-6


def _logits(std, n=4096, seed=0):
    return torch.randn(n, H, H, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("std", [0.1, 1.0, 3.0, 20.0, 100.0])
def test_column_sums_entries_spectral(std):
    comb = sinkhorn(_logits(std), ITERS, EPS)
    col_err = (comb.sum(-2) - 1).abs().max().item()
    assert col_err <= 1e-5, col_err                         # item 1 (measured <= 1.2e-6)
    assert comb.min().item() > 0                             # item 3
    if std <= 20:
        spectral = torch.linalg.matrix_norm(comb.double(), ord=2).max().item()
        assert spectral <= 1.03, spectral                    # item 4 (observed <= 1.021)


def test_row_sums_at_small_logit_scale():
    comb = sinkhorn(_logits(1.0), ITERS, EPS)
    assert (comb.sum(-1) - 1).abs().max().item() <= 1e-3     # item 2
    wide = sinkhorn(_logits(20.0), ITERS, EPS)
    assert (wide.sum(-1) - 1).abs().max().item() > 1e-3     # degrades with range (a metric)


def test_gradients_finite_for_huge_logits():
    logits = (_logits(300.0, n=256)).requires_grad_()
    sinkhorn(logits, ITERS, EPS).square().sum().backward()   # item 5
    assert torch.isfinite(logits.grad).all()


def _unit(D=16, dynamic=True, n=H):
    return HyperConnection(n, ITERS, EPS, 1e-6, dynamic)


def test_pre_post_ranges():
    torch.manual_seed(0)
    D = 16
    hc = _unit(D)
    X = torch.randn(2, 5, H, D) * 10
    fn, base, scale = torch.randn((2 + H) * H, H * D), torch.randn((2 + H) * H) * 5, torch.ones(3) * 3
    mix = hc.mix(X, fn, base, scale)
    # item 6: (eps, 1 + eps) and (0, 2); the ends are reached in fp32 when sigmoid saturates
    assert (mix.pre_BTH >= EPS).all() and (mix.pre_BTH <= 1 + EPS).all()
    assert (mix.post_BTH >= 0).all() and (mix.post_BTH <= 2).all()
    mild = hc.mix(X * 0.01, fn * 0.01, base * 0.01, scale)
    assert (mild.pre_BTH > EPS).all() and (mild.pre_BTH < 1 + EPS).all()
    assert (mild.post_BTH > 0).all() and (mild.post_BTH < 2).all()


def test_plain_prenorm_residual_with_one_static_stream():
    """hc_mult = 1, static identity: the block equals x + Attn(norm(x)); x + MoE(norm(.)) bit-for-bit."""
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny", hc_mult=1, hc_dynamic=False)
    model = V4Model(args).eval()
    block = model.layers[0]
    x = torch.randn(2, 16, args.dim)
    ids = torch.randint(0, args.vocab_size, (2, 16))
    docs = torch.zeros_like(ids)
    pos = torch.arange(16).expand(2, 16)
    out, _, _ = block(x[:, :, None, :], ids, docs, pos, None, None)
    h = x + block.attn(block.attn_norm(x), docs, pos)[0]
    ref = h + block.ffn(block.ffn_norm(h), ids)[0]
    assert torch.equal(out[:, :, 0], ref)                                        # item 7


def test_init_is_a_prenorm_residual():
    """At init comb is uniform within 1e-2 and streams stay equal up to the fn perturbation."""
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny")
    model = V4Model(args).eval()
    ids = torch.randint(0, args.vocab_size, (2, 32))
    block = model.layers[0]
    X = model.embed(ids)[:, :, None, :].expand(2, 32, H, args.dim)
    mix = block.hc.mix(X, block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale)
    assert (mix.comb_BTHH - 1 / H).abs().max().item() < 1e-2                     # item 7
    assert (mix.post_BTH - 1).abs().max().item() < 1e-2
    out, _, _ = block(X, ids, torch.zeros_like(ids), torch.arange(32).expand(2, 32), None, None)
    spread = (out - out.mean(2, keepdim=True)).abs().max() / out.abs().max()
    assert spread.item() < 0.05


def test_conservation_with_doubly_stochastic_comb():
    """Exactly doubly stochastic comb and post = 0 preserve the stream sum (item 8)."""
    torch.manual_seed(0)
    D = 8
    perm = torch.eye(H)[torch.randperm(H)]
    comb = 0.5 * perm + 0.5 * torch.full((H, H), 1 / H)
    X = torch.randn(3, 4, H, D)
    from model.mhc import HCMix
    mix = HCMix(torch.ones(3, 4, H), torch.zeros(3, 4, H), comb.expand(3, 4, H, H), comb)
    out = HyperConnection.expand(torch.randn(3, 4, D), X, mix)
    assert torch.allclose(out.sum(2), X.sum(2), atol=1e-6)


def test_post_mix_uses_columns():
    """new stream j = sum_i comb_ij X_i (spec §6 pitfall 1)."""
    D = 3
    comb = torch.zeros(1, 1, H, H)
    comb[0, 0, 2, 0] = 1.0           # stream 0 takes old stream 2
    X = torch.arange(H * D, dtype=torch.float32).view(1, 1, H, D)
    from model.mhc import HCMix
    mix = HCMix(torch.ones(1, 1, H), torch.zeros(1, 1, H), comb, comb)
    out = HyperConnection.expand(torch.zeros(1, 1, D), X, mix)
    assert torch.equal(out[0, 0, 0], X[0, 0, 2])
