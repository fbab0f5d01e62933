"""Parameter grouping on the real V4 model (spec §3.11 "Parameter groups")."""

import pytest
import torch
from torch import nn

from model import ModelArgs, V4Model
from train.optim import OptimConfig, build_optimizer, param_groups_for
from train.optim.grouping import MUON_EXPERT_STACK, MUON_MATRIX, MUON_ROW_GROUPS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return V4Model(ModelArgs.preset("tiny"))


def treatments(grouping) -> dict[str, str]:
    out = {m.name: f"muon/{m.layout}" for m in grouping.muon}
    out |= {a.name: f"adamw/{'decay' if a.decay else 'vector'}" for a in grouping.adamw}
    out |= {e.name: "excluded" for e in grouping.excluded}
    return out


def test_every_parameter_is_placed_exactly_once(tiny):
    grouping = param_groups_for(tiny, OptimConfig())
    names = [m.name for m in grouping.muon] + [a.name for a in grouping.adamw] + [e.name for e in grouping.excluded]
    assert sorted(names) == sorted(n for n, _ in tiny.named_parameters())
    assert len(set(names)) == len(names)


def test_v4_rules_on_the_tiny_model(tiny):
    args = tiny.args
    grouping = param_groups_for(tiny, OptimConfig())
    t = treatments(grouping)
    assert t["embed.weight"] == "adamw/decay"
    assert t["head.weight"] == "adamw/decay"
    assert t["norm.weight"] == "adamw/vector"
    assert t["hc_head_base"] == t["hc_head_scale"] == "adamw/vector"
    assert t["hc_head_fn"] == "muon/" + MUON_MATRIX
    assert t["layers.1.attn.compressor.ape"] == "adamw/decay"
    assert t["layers.0.attn.attn_sink"] == "adamw/vector"
    assert t["layers.0.attn.q_norm.weight"] == "adamw/vector"
    assert t["layers.0.hc_attn_fn"] == t["layers.0.hc_ffn_fn"] == "muon/" + MUON_MATRIX
    assert t["layers.0.hc_attn_base"] == t["layers.0.hc_ffn_scale"] == "adamw/vector"
    assert t["layers.0.ffn.gate.weight"] == "muon/" + MUON_MATRIX
    assert t["layers.0.ffn.shared_experts.w2.weight"] == "muon/" + MUON_MATRIX
    assert t["mtp.0.e_proj.weight"] == t["mtp.0.h_proj.weight"] == "muon/" + MUON_MATRIX
    assert t["mtp.0.hc_head_base"] == "adamw/vector"
    # Balancing state is held as buffers, so it never reaches an optimizer.
    params = dict(tiny.named_parameters())
    buffers = dict(tiny.named_buffers())
    assert "layers.0.ffn.gate.tid2eid" in buffers and "layers.0.ffn.gate.tid2eid" not in params
    assert "layers.1.ffn.gate.bias" in buffers and "layers.1.ffn.gate.bias" not in params

    by_name = {m.name: m for m in grouping.muon}
    for layer in ("layers.0", "layers.3", "mtp.0"):
        for w in ("w1", "w2", "w3"):
            expert = by_name[f"{layer}.ffn.experts.{w}"]
            assert expert.layout == MUON_EXPERT_STACK and expert.is_expert
            assert expert.as_blocks(expert.param).shape[0] == args.n_routed_experts
        wo_a = by_name[f"{layer}.attn.wo_a.weight"]
        assert wo_a.layout == MUON_ROW_GROUPS
        blocks = wo_a.as_blocks(wo_a.param)
        assert tuple(blocks.shape) == (args.o_groups, args.o_lora_rank, args.n_heads * args.head_dim // args.o_groups)
        # Block k must be rows [k·d_g, (k+1)·d_g) of the checkpoint tensor.
        assert torch.equal(blocks[1], wo_a.param[args.o_lora_rank : 2 * args.o_lora_rank])


def test_switches_and_frozen_parameters(tiny):
    tiny.layers[0].attn.wq_a.weight.requires_grad_(False)
    try:
        t = treatments(param_groups_for(tiny, OptimConfig(hc_fn_muon=False, wo_a_per_group=False)))
    finally:
        tiny.layers[0].attn.wq_a.weight.requires_grad_(True)
    assert t["layers.0.attn.wq_a.weight"] == "excluded"
    assert t["layers.2.hc_ffn_fn"] == "adamw/decay"
    assert t["layers.2.attn.wo_a.weight"] == "muon/" + MUON_MATRIX


def test_balancing_bias_as_parameter_is_excluded_and_unknown_3d_rejected():
    model = nn.Module()
    model.gate = nn.Module()
    model.gate.weight = nn.Parameter(torch.zeros(4, 8))
    model.gate.bias = nn.Parameter(torch.zeros(4))
    t = treatments(param_groups_for(model, OptimConfig(wo_a_per_group=False)))
    assert t == {"gate.weight": "muon/" + MUON_MATRIX, "gate.bias": "excluded"}
    model.conv = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="conv"):
        param_groups_for(model, OptimConfig())


def test_table_for_the_run_log(tiny):
    grouping = param_groups_for(tiny, OptimConfig())
    table = grouping.table()
    args = tiny.args
    layers_with_mtp = args.n_layers + 1
    assert f"layers.*.ffn.experts.w1" in table
    assert f"muon expert_stack: {args.n_routed_experts} × [{args.moe_inter_dim}, {args.dim}]" in table
    assert f"muon row_groups: {args.o_groups} × [{args.o_lora_rank}," in table
    matrices = grouping.muon_matrix_count()
    expected_expert_matrices = 3 * args.n_routed_experts * layers_with_mtp
    expected_wo_a_blocks = args.o_groups * layers_with_mtp
    singles = sum(1 for m in grouping.muon if m.layout == MUON_MATRIX)
    assert matrices == expected_expert_matrices + expected_wo_a_blocks + singles
    assert f"{matrices} matrices" in table.splitlines()[-1]


def test_one_step_on_the_tiny_model_moves_what_it_should(tiny):
    optimizer = build_optimizer(tiny, OptimConfig(lr=1e-2, ns_dtype="float32"))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    ids = torch.randint(0, tiny.args.vocab_size, (1, 33))
    tiny(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    with_grad = {n for n, p in tiny.named_parameters() if p.grad is not None}
    optimizer.step()
    for name, p in tiny.named_parameters():
        changed = not torch.equal(p, before[name])
        # Parameters without a gradient (the indexer without its KL loss, §5.20) are skipped entirely.
        assert changed == (name in with_grad), name
    optimizer.zero_grad()
