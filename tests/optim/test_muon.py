"""Single-process Muon: the spec §3.11 update, update RMS (§5.11), the AdamW half, checkpoints, LR schedule."""

import copy
import importlib.util
import io
import math

import pytest
import torch
from torch import nn

from tests.optim.optim_helpers import MiniV4, make_batch, reference_muon_step
from train.optim import Muon, OptimConfig, lr_at, param_groups_for
from train.optim.grouping import MUON_EXPERT_STACK, MUON_MATRIX, MUON_ROW_GROUPS, MuonTensor, ParamGrouping

CFG = OptimConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32")


def set_random_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def test_step_matches_reference_formula():
    torch.manual_seed(0)
    model = MiniV4()
    reference = copy.deepcopy(model)
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    ref_grouping = param_groups_for(reference, CFG)
    momenta = {}
    for step in range(3):
        set_random_grads(model, step)
        set_random_grads(reference, step)
        optimizer.step()
        reference_muon_step(ref_grouping, momenta, CFG.lr, CFG.weight_decay)
    worst = 0.0
    for m, r in zip(optimizer.grouping.muon, ref_grouping.muon):
        worst = max(worst, (m.param - r.param).abs().max().item())
    # Batched fused-matmul NS vs textbook per-matrix NS, both fp32: measured max |diff| 6.0e-8 on weights up to
    # 1.06 after 3 steps of lr 0.02 (one NS output differs by ≤ 6e-7 and is multiplied by lr·scale ≈ 0.02).
    assert worst <= 1e-6, worst
    torch.manual_seed(0)
    start = MiniV4()
    initial = param_groups_for(start, CFG).muon
    moved = max((m.param - s.param).abs().max().item() for m, s in zip(optimizer.grouping.muon, initial))
    assert moved > 1e-3, moved


def _single(name: str, shape: tuple[int, ...], layout: str, group_rows: int | None = None) -> ParamGrouping:
    param = nn.Parameter(torch.zeros(shape))
    return ParamGrouping(muon=[MuonTensor(name, param, layout, group_rows=group_rows)])


@pytest.mark.parametrize(
    "name, shape, layout, group_rows",
    [
        ("attn.wq_b.weight", (256, 1024), MUON_MATRIX, None),
        ("attn.wo_b.weight", (1024, 256), MUON_MATRIX, None),
        ("ffn.experts.w2", (4, 256, 96), MUON_EXPERT_STACK, None),
        ("attn.wo_a.weight", (4 * 64, 384), MUON_ROW_GROUPS, 64),
    ],
)
def test_update_rms_is_0_18(name, shape, layout, group_rows):
    grouping = _single(name, shape, layout, group_rows)
    param = grouping.muon[0].param
    optimizer = Muon(grouping, OptimConfig(lr=1.0, weight_decay=0.0, ns_dtype="float32"))
    param.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    # W started at 0, so W = −O; every orthogonalised block must have RMS γ = 0.18 (spec §5.11: 0.18 ± 0.002;
    # measured 0.18002–0.18004 here).
    for block in grouping.muon[0].as_blocks(param.detach()):
        rms = block.pow(2).mean().sqrt().item()
        assert abs(rms - 0.18) <= 0.002, rms


def test_each_block_is_orthogonalised_separately():
    grouping = _single("attn.wo_a.weight", (2 * 16, 64), MUON_ROW_GROUPS, 16)
    param = grouping.muon[0].param
    optimizer = Muon(grouping, OptimConfig(lr=1.0, weight_decay=0.0, ns_dtype="float32"))
    grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    grad[16:] *= 100.0  # one block 100× larger: a whole-matrix NS would leave the small block near zero
    param.grad = grad
    optimizer.step()
    for block in param.detach().view(2, 16, 64):
        s = torch.linalg.svdvals(block.double()) / (math.sqrt(64) * 0.18)
        # Measured σ ∈ [1.0000001, 1.00054] for both blocks.
        assert 0.99 <= s.min() and s.max() <= 1.01, (s.min().item(), s.max().item())


def test_adamw_half_equals_torch_adamw():
    torch.manual_seed(0)
    model = MiniV4()
    reference = copy.deepcopy(model)
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    grouping = param_groups_for(reference, CFG)
    decay = [a.param for a in grouping.adamw if a.decay]
    vector = [a.param for a in grouping.adamw if not a.decay]
    torch_adamw = torch.optim.AdamW(
        [dict(params=decay, weight_decay=CFG.weight_decay), dict(params=vector, weight_decay=CFG.vector_weight_decay)],
        lr=CFG.lr, betas=(CFG.adam_beta1, CFG.adam_beta2), eps=CFG.adam_eps,
    )
    for step in range(3):
        set_random_grads(model, step)
        set_random_grads(reference, step)
        optimizer.step()
        torch_adamw.step()
    for ours, theirs in zip(optimizer.grouping.adamw, grouping.adamw):
        assert torch.equal(ours.param, theirs.param), ours.name
    assert not torch.equal(optimizer.grouping.adamw[0].param, MiniV4().embed.weight)


def test_parameters_without_gradient_are_left_alone():
    torch.manual_seed(0)
    model = MiniV4()
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    set_random_grads(model, 0)
    frozen_in_step = model.layers[0].attn.wq_a.weight
    frozen_in_step.grad = None
    before = frozen_in_step.detach().clone()
    optimizer.step()
    assert torch.equal(frozen_in_step, before)
    assert not torch.equal(model.layers[1].attn.wq_a.weight, before)


def _train(model: MiniV4, optimizer: Muon, steps: range) -> None:
    for step in steps:
        ids, labels = make_batch(step)
        optimizer.zero_grad()
        model(ids, labels).backward()
        optimizer.step()


def test_state_round_trips_through_a_checkpoint():
    torch.manual_seed(0)
    model = MiniV4()
    resumed_model = copy.deepcopy(model)
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    _train(model, optimizer, range(5))

    first = Muon(param_groups_for(resumed_model, CFG), CFG)
    _train(resumed_model, first, range(3))
    blob = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optimizer": first.state_dict()}, blob)
    blob.seek(0)
    checkpoint = torch.load(blob, weights_only=True)
    fresh_model = MiniV4()
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = Muon(param_groups_for(fresh_model, CFG), CFG)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert {g["name"]: g["lr"] for g in fresh.param_groups} == {g["name"]: g["lr"] for g in optimizer.param_groups}
    _train(fresh_model, fresh, range(3, 5))

    for (name, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), name
    kinds = {key for state in fresh.state.values() for key in state}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= kinds


def test_lr_schedule_warmup_constant_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_start_fraction=0.5)
    total = 100
    assert lr_at(0, total, cfg) == pytest.approx(0.1)
    assert lr_at(9, total, cfg) == pytest.approx(1.0)
    assert lr_at(30, total, cfg) == 1.0
    assert lr_at(50, total, cfg) == pytest.approx(1.0)
    assert lr_at(99, total, cfg) == pytest.approx(0.1)
    mid = 50 + (99 - 50) / 2
    assert lr_at(int(mid), total, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 50) / 49)))
    values = [lr_at(s, total, cfg) for s in range(50, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ns_kernel"):
        OptimConfig(ns_kernel="cuda").validate()
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_cuda_graph_replay_equals_eager_steps(kernel):
    torch.manual_seed(0)
    graphed_model = MiniV4().cuda()
    eager_model = copy.deepcopy(graphed_model)
    cfg = OptimConfig(lr=0.02, ns_kernel=kernel, muon_elementwise="foreach", ns_cuda_graphs=True)
    graphed = Muon(param_groups_for(graphed_model, cfg), cfg)
    eager = Muon(param_groups_for(eager_model, cfg),
                 OptimConfig(lr=0.02, ns_kernel=kernel, muon_elementwise="foreach", ns_cuda_graphs=False))
    for step in range(3):  # step 0 captures, steps 1-2 replay with new gradients
        set_random_grads(graphed_model, step)
        set_random_grads(eager_model, step)
        graphed.step()
        eager.step()
    worst = max((a - b).abs().max().item() for a, b in zip(graphed_model.parameters(), eager_model.parameters()))
    # The graph replays the same kernels on the same inputs: expected bit-identical.
    assert worst <= 1e-6, worst
    assert graphed._ns_graphs and all(len(cache) == 1 for cache in graphed._ns_graphs.values())


def test_config_rejects_unknown_elementwise_path():
    with pytest.raises(ValueError, match="muon_elementwise"):
        OptimConfig(muon_elementwise="cuda").validate()


def test_auto_fast_paths_resolve_per_device():
    cpu = OptimConfig().resolved(torch.device("cpu"))
    assert (cpu.ns_kernel, cpu.muon_elementwise) == ("torch", "foreach")
    with pytest.raises(ValueError, match="ns_kernel='triton' needs CUDA"):
        OptimConfig(ns_kernel="triton").resolved(torch.device("cpu"))
    model = MiniV4()
    assert Muon(param_groups_for(model, CFG), CFG).cfg.ns_kernel == "torch"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        gpu = OptimConfig().resolved(torch.device("cuda"))
        assert (gpu.ns_kernel, gpu.muon_elementwise) == ("triton", "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize(
    "ns_kernel, graphs, fold, overlap",
    [("torch", False, False, False), ("torch", False, True, True), ("triton", True, False, False),
     ("triton", True, True, False), ("triton", True, True, True)],
)
def test_fused_elementwise_step_equals_foreach_step(ns_kernel, graphs, fold, overlap):
    torch.manual_seed(0)
    fused_model = MiniV4().cuda()
    foreach_model = copy.deepcopy(fused_model)
    kwargs = dict(lr=0.02, weight_decay=0.1, ns_kernel=ns_kernel, ns_cuda_graphs=graphs)
    fused_cfg = OptimConfig(muon_elementwise="triton", fold_ns_normalization=fold, overlap_muon_update=overlap, **kwargs)
    fused = Muon(param_groups_for(fused_model, CFG), fused_cfg)
    foreach = Muon(param_groups_for(foreach_model, CFG), OptimConfig(muon_elementwise="foreach", **kwargs))
    for step in range(3):
        set_random_grads(fused_model, step)
        set_random_grads(foreach_model, step)
        fused.step()
        foreach.step()
    assert fused._bucket_plans, "the fused path did not run"
    worst_param = 0.0
    for (name, a), b in zip(fused_model.named_parameters(), foreach_model.parameters()):
        # Same roundings except where Triton contracts a·b + c into one FMA: the bf16 look-ahead can differ by
        # one ulp, which bf16 NS spreads over O (times lr·scale ≈ 0.02·0.18·√n per step). Measured on the H200
        # after 3 steps: max |diff| 1.6e-4 without
        # fold_ns_normalization, 3.6e-4 with it (other bf16 roundings in NS step 1), on weights moved by up to ~0.1.
        worst_param = max(worst_param, (a - b).abs().max().item())
        assert (a - b).abs().max().item() <= 1e-3, (name, (a - b).abs().max().item())
    for p, q in zip(fused_model.parameters(), foreach_model.parameters()):
        if "momentum_buffer" in fused.state[p]:
            # The momentum update M·μ + G: at most one fp32 rounding apart (FMA vs multiply-then-add).
            torch.testing.assert_close(fused.state[p]["momentum_buffer"], foreach.state[q]["momentum_buffer"],
                                       atol=1e-5, rtol=1e-6)
    print(f"measured fused vs foreach ({ns_kernel}, graphs={graphs}, fold={fold}, overlap={overlap}): "
          f"max |dW| {worst_param:.3g}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_fused_elementwise_kernels_match_torch():
    """Look-ahead into the stacked buffer and the update, on wide, tall, row-group and masked shapes."""
    from train.optim import bucketed_step
    from train.optim.elementwise_kernel import apply_bucket_update, lookahead_into_bucket

    torch.manual_seed(0)
    specs = [("e", (3, 48, 80), MUON_EXPERT_STACK, None), ("t", (80, 48), MUON_MATRIX, None),
             ("g", (2 * 48, 80), MUON_ROW_GROUPS, 48), ("w", (70, 130), MUON_MATRIX, None)]
    metas = [MuonTensor(n, nn.Parameter(torch.randn(s, device="cuda")), layout, group_rows=rows)
             for n, s, layout, rows in specs]
    params = [m.param for m in metas]
    for p in params:
        p.grad = torch.randn_like(p)
    momenta = [torch.randn_like(p) for p in params]
    want_momenta = [m.clone().mul_(0.95).add_(p.grad) for m, p in zip(momenta, params)]
    buckets = bucketed_step.build_buckets(metas, [None] * len(metas), torch.bfloat16)
    addresses = bucketed_step.address_table(params, momenta)
    for bucket in buckets:
        for launch in bucket.launches:
            lookahead_into_bucket(addresses, launch, bucket.buffer, params[0], 0.95, True,
                                  sum_squares=bucket.sum_squares)
    for bucket in buckets:
        want = bucket.buffer.double().pow(2).sum(dim=(-2, -1))
        # fp32 per-tile sums of the bf16 values, then a sum over tiles: measured 1.1e-7 relative under TRITON_INTERPRET.
        torch.testing.assert_close(bucket.sum_squares.double().sum(dim=1), want, rtol=1e-5, atol=0)
    for got, want in zip(momenta, want_momenta):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # one fp32 rounding (FMA) at most
    wide = {}
    for meta, mom in zip(metas, want_momenta):
        blocks = meta.as_blocks(meta.param.grad + 0.95 * mom)
        blocks = blocks.mT if blocks.shape[-2] > blocks.shape[-1] else blocks
        wide.setdefault(tuple(blocks.shape[-2:]), []).append(blocks)
    for bucket in buckets:
        want = torch.cat(wide[bucket.shape]).to(torch.bfloat16).float()
        # bf16 cast of the same fp32 value up to one fp32 rounding: one bf16 ulp (2^-8 relative) at most.
        assert ((bucket.buffer.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all(), bucket.shape

    outs = {bucket.shape: torch.randn(bucket.buffer.shape, device="cuda").to(torch.bfloat16) for bucket in buckets}
    want_params = []
    first = {shape: 0 for shape in outs}
    for meta in metas:
        blocks = meta.as_blocks(meta.param.detach())
        shape = (min(blocks.shape[-2:]), max(blocks.shape[-2:]))
        o = outs[shape][first[shape] : first[shape] + blocks.shape[0]]
        first[shape] += blocks.shape[0]
        o = o.mT if blocks.shape[-2] > blocks.shape[-1] else o
        want_params.append(meta.param.detach().mul(0.99).add(o.reshape(meta.param.shape), alpha=-0.1))
    for bucket in buckets:
        for launch in bucket.launches:
            apply_bucket_update(addresses, launch, outs[bucket.shape], params[0], 0.99, 0.1)
    for meta, want in zip(metas, want_params):
        # W·0.99 − 0.1·O: measured ≤ 2.4e-7 under TRITON_INTERPRET (FMA contraction).
        torch.testing.assert_close(meta.param.detach(), want, atol=1e-6, rtol=0, msg=meta.name)


def _assert_identical_steps(overlapped_cfg: OptimConfig, serial_cfg: OptimConfig) -> None:
    """Three steps of MiniV4 on CUDA under both configs end with bit-identical parameters."""
    torch.manual_seed(0)
    overlapped_model = MiniV4().cuda()
    serial_model = copy.deepcopy(overlapped_model)
    overlapped = Muon(param_groups_for(overlapped_model, CFG), overlapped_cfg)
    serial = Muon(param_groups_for(serial_model, CFG), serial_cfg)
    for step in range(3):
        set_random_grads(overlapped_model, step)
        set_random_grads(serial_model, step)
        overlapped.step()
        serial.step()
    for (name, a), b in zip(overlapped_model.named_parameters(), serial_model.parameters()):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("elementwise", ["foreach", "triton"])
def test_adamw_on_a_side_stream_gives_identical_steps(elementwise):
    # The same kernels on the same values, only on another stream: bit-identical.
    kwargs = dict(lr=0.02, weight_decay=0.1, muon_elementwise=elementwise)
    _assert_identical_steps(OptimConfig(overlap_adamw=True, **kwargs), OptimConfig(overlap_adamw=False, **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("graphs", [False, True])
def test_update_on_a_side_stream_gives_identical_steps(graphs):
    # The same kernels on the same values (NS per bucket instead of per group), updates on another stream.
    kwargs = dict(lr=0.02, weight_decay=0.1, muon_elementwise="triton", ns_kernel="triton", ns_cuda_graphs=graphs)
    _assert_identical_steps(OptimConfig(overlap_muon_update=True, **kwargs),
                            OptimConfig(overlap_muon_update=False, **kwargs))
