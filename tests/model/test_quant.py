"""FP4 / FP8 fake quantization (spec §5 items 24-25), checked bit-exactly."""

import torch

from model.quant import FP4_GRID, fake_quant_fp4, fake_quant_fp8, fp4_quantize, fp8_quantize, hadamard


def _x(shape=(64, 128), seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _block_scales(x, block, qmax):
    amax = x.unflatten(-1, (-1, block)).abs().amax(-1).clamp_min(1e-4)
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def test_fp4_on_grid_and_bounded():
    x = _x()
    q = fp4_quantize(x, 32)
    scale = _block_scales(x, 32, 6.0)
    units = (q.unflatten(-1, (-1, 32)) / scale[..., None]).abs()
    grid = torch.tensor(FP4_GRID)
    assert ((units[..., None] - grid).abs().min(-1).values == 0).all()
    assert (units.amax(-1) <= 6).all()
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))


def test_fp4_idempotent_and_ties_to_even():
    x = _x(seed=1)
    q = fp4_quantize(x, 32)
    assert torch.equal(fp4_quantize(q, 32), q)
    # block scale 1 (amax 6): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24)
    expect = torch.tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0] + [0.0] * 24)
    assert torch.equal(fp4_quantize(ties, 32), expect)
    assert torch.equal(fp4_quantize(-ties, 32), -expect)


def test_fp4_to_fp8_dequant_is_exact():
    """MXFP4 values re-expressed in e4m3 with one power-of-two scale per 1x128 tile are exact
    when the sub-block scale spread fits e4m3's exponent range (here: similar magnitudes)."""
    x = _x(seed=2)
    q4 = fp4_quantize(x, 32)
    assert torch.equal(fp8_quantize(q4, 128), q4)


def test_fp8_scale_error_idempotent():
    x = _x(seed=3)
    q = fp8_quantize(x, 64)
    scale = _block_scales(x, 64, 448.0)
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
    normal = x.abs() > 2 ** -6 * scale.repeat_interleave(64, -1)
    rel = ((q - x).abs() / x.abs())[normal]
    assert rel.max().item() <= 2 ** -4
    assert torch.equal(fp8_quantize(q, 64), q)


def test_straight_through_gradient():
    x = _x().requires_grad_()
    (fake_quant_fp4(x, 32) * 2 + fake_quant_fp8(x, 64)).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_hadamard_orthogonal():
    x = _x((5, 32))
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert torch.allclose(hadamard(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
