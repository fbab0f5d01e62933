"""Worker processes of the distributed Muon tests (gloo on CPU), started by torch.multiprocessing.spawn.

Each scenario runs 5 optimizer steps and rank 0 saves the resulting full parameters to `out_path`.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from tests.optim.optim_helpers import MiniV4, make_batch
from train.optim import Muon, OptimConfig, param_groups_for
from train.optim.grouping import MUON_EXPERT_STACK, MUON_MATRIX, MUON_ROW_GROUPS, MuonTensor, ParamGrouping

STEPS = 5
CFG = OptimConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32")
GRAM_CFG = OptimConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32", ns_form="gram")


def init_process(rank: int, world: int, init_file: str) -> None:
    # A file rendezvous: no TCP port that another process on the machine could take between choice and bind.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def finish_process() -> None:
    """Leave the group together and exit at once: with a rank still saving while the other tore its gloo
    group down, and even after a barrier (1 run in 8), interpreter teardown under pytest aborted now and
    then (std::terminate, SIGABRT) although the results were written."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def seeded_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


# ---------------------------------------------------------------- data-parallel distributed Newton–Schulz
def run_dp_and_tp(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The data-parallel and both tensor-parallel scenarios in one process group (one spawn for three tests)."""
    init_process(rank, world, init_file)
    run_dp_shared_ns(rank, f"{out_dir}/dp.pt")
    run_dp_shared_ns(rank, f"{out_dir}/dp_gram.pt", GRAM_CFG)
    run_tensor_parallel(rank, world, f"{out_dir}/tp.pt", blockwise=False)
    run_tensor_parallel(rank, world, f"{out_dir}/tp_blockwise.pt", blockwise=True)
    finish_process()


def run_dp_shared_ns(rank: int, out_path: str, cfg: OptimConfig = CFG) -> None:
    """Replicas with identical gradients; each rank orthogonalises a share of the matrices, then all-gather."""
    torch.manual_seed(0)
    model = MiniV4()
    optimizer = Muon(param_groups_for(model, cfg), cfg, dp_group=dist.group.WORLD)
    params = list(model.parameters())
    for step in range(STEPS):
        for p, g in zip(params, seeded_grads(params, step)):
            p.grad = g
        optimizer.step()
    if rank == 0:
        torch.save(model.state_dict(), out_path)


def single_dp_shared_ns(cfg: OptimConfig = CFG) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MiniV4()
    optimizer = Muon(param_groups_for(model, cfg), cfg)
    params = list(model.parameters())
    for step in range(STEPS):
        for p, g in zip(params, seeded_grads(params, step)):
            p.grad = g
        optimizer.step()
    return model.state_dict()


# ---------------------------------------------------------------- tensor parallel
# (name, full shape, layout, group_rows, partition_dim); experts use expert_tp_group.
TP_TENSORS = [
    ("attn.wq_b.weight", (48, 20), MUON_MATRIX, None, 0),  # column-parallel: output rows split
    ("attn.wo_b.weight", (20, 48), MUON_MATRIX, None, 1),  # row-parallel: input columns split
    ("attn.wo_a.weight", (4 * 8, 24), MUON_ROW_GROUPS, 8, 0),  # each rank holds 2 of the 4 groups
    ("attn.wo_a_cols.weight", (2 * 8, 24), MUON_ROW_GROUPS, 8, 1),  # groups split along their columns
    ("ffn.experts.w1", (3, 16, 20), MUON_EXPERT_STACK, None, 1),  # expert tensor parallel
]


def full_tp_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g) * 0.1 for _, shape, _, _, _ in TP_TENSORS]


def tp_grouping(tensors: list[torch.Tensor]) -> ParamGrouping:
    muon = []
    for (name, _, layout, group_rows, _), tensor in zip(TP_TENSORS, tensors):
        muon.append(MuonTensor(name, nn.Parameter(tensor), layout, group_rows=group_rows,
                               is_expert=layout == MUON_EXPERT_STACK))
    return ParamGrouping(muon=muon)


def run_tensor_parallel(rank: int, world: int, out_path: str, blockwise: bool) -> None:
    fulls = full_tp_tensors()
    shards = [f.chunk(world, dim)[rank].clone() for f, (*_, dim) in zip(fulls, TP_TENSORS)]
    grouping = tp_grouping(shards)
    for m, (*_, dim) in zip(grouping.muon, TP_TENSORS):
        m.param.tensor_model_parallel = True
        m.param.partition_dim = dim
        m.param.partition_stride = 1
    cfg = OptimConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32", tp_blockwise=blockwise)
    optimizer = Muon(grouping, cfg, tp_group=dist.group.WORLD, expert_tp_group=dist.group.WORLD)
    for step in range(STEPS):
        for m, g, (*_, dim) in zip(grouping.muon, seeded_grads(fulls, step), TP_TENSORS):
            m.param.grad = g.chunk(world, dim)[rank].clone()
        optimizer.step()
    gathered = []
    for m, (*_, dim) in zip(grouping.muon, TP_TENSORS):
        parts = [torch.empty_like(m.param) for _ in range(world)]
        dist.all_gather(parts, m.param.detach())
        gathered.append(torch.cat(parts, dim))
    if rank == 0:
        torch.save(gathered, out_path)


def single_tensor_parallel_blockwise(world: int) -> list[torch.Tensor]:
    """Single-process Muon over each shard as a tensor of its own: what tp_blockwise must reproduce."""
    fulls = full_tp_tensors()
    dims = [dim for *_, dim in TP_TENSORS]
    shards = [s.clone() for f, dim in zip(fulls, dims) for s in f.chunk(world, dim)]
    specs = [spec for spec in TP_TENSORS for _ in range(world)]
    grouping = ParamGrouping(muon=[
        MuonTensor(name, nn.Parameter(shard), layout, group_rows=rows) for (name, _, layout, rows, _), shard in zip(specs, shards)
    ])
    optimizer = Muon(grouping, CFG)
    for step in range(STEPS):
        grads = [s.clone() for g, dim in zip(seeded_grads(fulls, step), dims) for s in g.chunk(world, dim)]
        for m, g in zip(grouping.muon, grads):
            m.param.grad = g
        optimizer.step()
    params = [m.param.detach() for m in grouping.muon]
    return [torch.cat(params[i * world : (i + 1) * world], dim) for i, dim in enumerate(dims)]


def single_tensor_parallel() -> list[torch.Tensor]:
    fulls = full_tp_tensors()
    grouping = tp_grouping([f.clone() for f in fulls])
    optimizer = Muon(grouping, CFG)
    for step in range(STEPS):
        for m, g in zip(grouping.muon, seeded_grads(fulls, step)):
            m.param.grad = g
        optimizer.step()
    return [m.param.detach() for m in grouping.muon]


# ---------------------------------------------------------------- DeepSpeed ZeRO
GLOBAL_BATCH = 4


def run_deepspeed_zero(rank: int, world: int, init_file: str, out_path: str, stage: int) -> None:
    init_process(rank, world, init_file)
    import deepspeed

    from train.optim.zero import zero_config_for_muon

    torch.manual_seed(0)
    model = MiniV4()
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        **zero_config_for_muon(CFG, stage=stage),
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    norms = []
    for step in range(STEPS):
        ids, labels = make_batch(step, batch=GLOBAL_BATCH)
        loss = engine(ids[rows], labels[rows])
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    if rank == 0:
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save({"params": state, "grad_norms": norms}, out_path)
    finish_process()


def single_clipped_training() -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same 5 steps in one process on the whole global batch, raw gradients clipped before the step."""
    torch.manual_seed(0)
    model = MiniV4()
    optimizer = Muon(param_groups_for(model, CFG), CFG)
    norms = []
    for step in range(STEPS):
        ids, labels = make_batch(step, batch=GLOBAL_BATCH)
        optimizer.zero_grad()
        model(ids, labels).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.grad_clip)))
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms
