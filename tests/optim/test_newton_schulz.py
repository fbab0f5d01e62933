"""Hybrid Newton–Schulz invariants (spec §5.9–§5.12) and the Triton symmetric-product kernel (GPU only)."""

import pytest
import torch

from train.optim import hybrid_newton_schulz
from train.optim.newton_schulz import HYBRID_SCHEDULE, plain_newton_schulz


def singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (64, 512), (96, 200)])
def test_fp32_singular_values_of_gaussian_inputs(shape):
    torch.manual_seed(0)
    X = hybrid_newton_schulz(torch.randn(*shape), dtype=torch.float32)
    s = singular_values(X)
    # Issue bound [0.99, 1.01]; spec §5.10 measured [0.9999, 1.0006] in fp32, and here
    # min 0.99999995, max 1.000538 — so the tighter spec bound is asserted too.
    assert 0.99 <= s.min() and s.max() <= 1.01, (s.min().item(), s.max().item())
    assert 0.9999 <= s.min() and s.max() <= 1.0006, (s.min().item(), s.max().item())


def test_bf16_singular_values_of_gaussian_inputs():
    torch.manual_seed(0)
    X = hybrid_newton_schulz(torch.randn(128, 384), dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    s = singular_values(X.float())
    # Spec §5.10: bf16 non-square lands in [0.993, 1.007]; measured on CPU [0.9979, 1.0043].
    assert 0.993 <= s.min() and s.max() <= 1.007, (s.min().item(), s.max().item())


@pytest.mark.parametrize("kind", ["square", "low_rank", "tiny_singular_values", "huge_scale"])
def test_singular_values_never_exceed_bound(kind):
    torch.manual_seed(1)
    if kind == "square":
        G = torch.randn(128, 128)
    elif kind == "low_rank":
        G = torch.randn(96, 8) @ torch.randn(8, 160)
    elif kind == "tiny_singular_values":
        U, _, V = torch.linalg.svd(torch.randn(64, 160), full_matrices=False)
        G = U @ torch.diag(torch.logspace(-6, 0, 64)) @ V
    else:
        G = torch.randn(80, 200) * 1e6
    s = singular_values(hybrid_newton_schulz(G, dtype=torch.float32))
    # Spec §5.9: no output singular value exceeds 1.0021 in exact arithmetic; issue bound 1.01.
    # Measured max: square/low-rank/huge 1.000538, σ down to 1e-6 1.00173.
    assert s.max() <= 1.01, s.max().item()
    assert torch.isfinite(s).all()


def test_zero_gradient_gives_zero_update():
    X = hybrid_newton_schulz(torch.zeros(2, 16, 48), dtype=torch.float32)
    assert torch.equal(X, torch.zeros_like(X))


def test_given_sum_of_squares_equals_computed_norm():
    torch.manual_seed(5)
    G = torch.randn(3, 40, 90) * 1e-3
    parts = G.pow(2).sum(dim=-1)  # [batch, rows]: any split of Σ G² into parts
    want = hybrid_newton_schulz(G, dtype=torch.float32)
    got = hybrid_newton_schulz(G, dtype=torch.float32, sum_squares=parts)
    # Same iteration; only the summation order of ‖G‖² differs: measured max |diff| 6.9e-7 (fp32).
    torch.testing.assert_close(got, want, atol=5e-6, rtol=0)
    zero = hybrid_newton_schulz(torch.zeros(2, 16, 48), dtype=torch.float32, sum_squares=torch.zeros(2, 3))
    assert torch.equal(zero, torch.zeros_like(zero))
    with pytest.raises(ValueError, match="sum_squares"):
        hybrid_newton_schulz(G, sum_squares=torch.ones(2, dtype=torch.float32))


def test_transpose_equivariance():
    torch.manual_seed(2)
    G = torch.randn(72, 200)
    X = hybrid_newton_schulz(G, dtype=torch.float32)
    Xt = hybrid_newton_schulz(G.T.contiguous(), dtype=torch.float32)
    # Measured max |diff| 6.1e-7 (the fp32 norm and matmuls see transposed layouts).
    torch.testing.assert_close(Xt.T, X, atol=5e-6, rtol=0)


def test_batched_equals_looped():
    torch.manual_seed(3)
    G = torch.randn(6, 48, 112)
    batched = hybrid_newton_schulz(G, dtype=torch.float32)
    looped = torch.stack([hybrid_newton_schulz(g, dtype=torch.float32) for g in G])
    # Each batch member is normalised and multiplied on its own; measured max |diff| 0.0 on CPU.
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=0)


def test_fused_form_equals_textbook_form():
    torch.manual_seed(4)
    G = torch.randn(3, 40, 90)
    # baddbmm-fused vs separate ops: measured max |diff| 6.3e-7.
    torch.testing.assert_close(
        hybrid_newton_schulz(G, dtype=torch.float32), plain_newton_schulz(G, dtype=torch.float32), atol=5e-6, rtol=0
    )


def test_schedule_is_the_v4_hybrid():
    assert len(HYBRID_SCHEDULE) == 10
    assert HYBRID_SCHEDULE[:8] == ((3.4445, -4.7750, 2.0315),) * 8
    assert HYBRID_SCHEDULE[8:] == ((2.0, -1.5, 0.5),) * 2


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="expects"):
        hybrid_newton_schulz(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="CUDA"):
        hybrid_newton_schulz(torch.randn(4, 8), kernel="triton")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (3, 200, 333), (16, 384, 1024), (1, 130, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_symmetric_gram_matches_torch(shape, dtype):
    from train.optim.symmetric_kernel import symmetric_gram

    torch.manual_seed(0)
    X = torch.randn(*shape, device="cuda", dtype=dtype) / shape[-1] ** 0.5
    D = torch.randn(shape[0], shape[1], shape[1], device="cuda", dtype=dtype)
    D = (D + D.mT) / 2
    got = symmetric_gram(X, alpha=-0.7, beta=1.3, addend=D)
    want = torch.baddbmm(D.float(), X.float(), X.float().mT, beta=1.3, alpha=-0.7)
    err = (got.float() - want).abs().max().item()
    # bf16 output rounding of O(1) values: 2^-8 relative → ≤ 0.03 absolute here; fp32 (ieee dot) ≤ 1e-4.
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert err <= tol, f"max abs err {err}"
    asym = (got.float() - got.float().mT).abs().max().item()
    assert asym == 0.0, f"mirrored tiles must make the output exactly symmetric, got max |C - Cᵀ| = {asym}"


@cuda
@pytest.mark.parametrize("shape", [(1, 1024, 3072), (8, 384, 1024), (4, 512, 256)])
def test_triton_newton_schulz_matches_torch(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, device="cuda")
    ref = hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="torch").float()
    got = hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="triton").float()
    s = torch.linalg.svdvals(got)
    # Same accuracy band as the torch bf16 path (spec §5.10: [0.993, 1.007] non-square).
    assert 0.99 <= s.min() and s.max() <= 1.01, (s.min().item(), s.max().item())
    # Both are bf16 iterations of the same map; they differ by bf16 rounding only.
    assert (got - ref).abs().max().item() <= 2e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_symmetric_gram_scale_and_diagonal(dtype):
    from train.optim.symmetric_kernel import symmetric_gram

    torch.manual_seed(0)
    X = torch.randn(3, 200, 333, device="cuda", dtype=dtype) / 333**0.5
    D = torch.randn(3, 200, 200, device="cuda", dtype=dtype)
    D = (D + D.mT) / 2
    scale = torch.rand(3, device="cuda") + 0.5
    got = symmetric_gram(X, alpha=-0.7, beta=1.3, addend=D, diagonal=3.4, scale=scale)
    eye = torch.eye(200, device="cuda")
    want = (torch.baddbmm(D.float(), X.float(), X.float().mT, beta=1.3, alpha=-0.7) + 3.4 * eye) * scale[:, None, None]
    err = (got.float() - want).abs().max().item()
    # One rounding of values up to ~8: bf16 ≤ 2^-8·8 ≈ 0.03 (+ input roundings); fp32 measured 3e-7 relative
    # under TRITON_INTERPRET.
    assert err <= (6e-2 if dtype == torch.bfloat16 else 1e-4), err
    assert torch.equal(got, got.mT)


@cuda
@pytest.mark.parametrize("shape", [(8, 384, 1024), (3, 200, 333), (1, 130, 70)])
def test_folded_normalization_matches_separate_pass(shape):
    torch.manual_seed(0)
    G = (torch.randn(*shape, device="cuda") * 1e-3).to(torch.bfloat16)
    squares = G.float().pow(2).sum(dim=-1)
    separate = hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="triton").float()
    folded = hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="triton", sum_squares=squares).float()
    s = torch.linalg.svdvals(folded)
    # Same accuracy band as the separate pass (spec §5.10, bf16 non-square [0.993, 1.007]); a CPU emulation of
    # both bf16 paths gave σ ∈ [0.9977, 1.0053] (folded) vs [0.9976, 1.0047] and max |diff| 3.9e-3.
    assert 0.99 <= s.min() and s.max() <= 1.01, (s.min().item(), s.max().item())
    assert (folded - separate).abs().max().item() <= 2e-2
    zero = hybrid_newton_schulz(torch.zeros_like(G), dtype=torch.bfloat16, kernel="triton",
                                sum_squares=torch.zeros_like(squares))
    assert torch.equal(zero, torch.zeros_like(zero))
