"""Muon step of the h200_1b preset when data-parallel ranks share the Newton–Schulz work (issue 4).

`bench/muon.py` times one rank's share of the work on one GPU without communication; this script runs
the real thing over NCCL: every rank holds the same parameters and the same (already reduced) gradients,
as data-parallel replicas do, and our Muon (`distribute_ns`) orthogonalises its share of every bucket and
all-gathers the rest. One process per GPU:

    torchrun --nproc-per-node 1 bench/muon_ranks.py --out bench/results/muon_ranks_1.json
    torchrun --nproc-per-node 2 bench/muon_ranks.py --out bench/results/muon_ranks_2.json --reference bench/results/muon_ranks_1.pt

Prints the step time (median wall time of synchronised steps after warm-up, slowest rank) and, with --reference, the largest
parameter difference after the first step against the one-rank run (sharing changes who computes, not what).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelArgs, V4Model  # noqa: E402
from train.optim import Muon, OptimConfig, param_groups_for  # noqa: E402


def optim_fields(pairs: list) -> dict:
    """FIELD=VALUE strings -> OptimConfig keyword arguments typed like the field's default."""
    defaults = OptimConfig()
    out = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        default = getattr(defaults, name)
        out[name] = value.lower() == "true" if isinstance(default, bool) else type(default)(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path, default=None,
                        help="parameters after step 1 of the one-rank run (written there as <out>.pt)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="OptimConfig fields, e.g. ns_kernel=triton muon_elementwise=triton ns_cuda_graphs=true")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny preset: checks the script only")
    args = parser.parse_args()

    device = "cpu" if args.smoke else "cuda"
    dist.init_process_group("gloo" if args.smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not args.smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(0)
    model = V4Model(ModelArgs.preset("tiny" if args.smoke else "h200_1b")).to(device)   # init draws on CPU
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(1)
    for p in params:   # identical on every rank: the gradients data-parallel replicas hold after the all-reduce
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    cfg = OptimConfig(**{"lr": 1e-3, "distribute_ns": True, **optim_fields(args.set)})
    group = dist.group.WORLD if world > 1 else None
    optimizer = Muon(param_groups_for(model, cfg), cfg, dp_group=group, expert_dp_group=group)

    sync = (lambda: None) if args.smoke else torch.cuda.synchronize
    optimizer.step()
    sync()
    max_diff = None
    if args.reference is not None:
        reference = torch.load(args.reference, map_location=device)
        max_diff = max(float((p.detach() - reference[name]).abs().max()) for name, p in model.named_parameters()
                       if p.requires_grad)
    elif rank == 0 and world == 1:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: p.detach() for name, p in model.named_parameters() if p.requires_grad},
                   args.out.with_suffix(".pt"))

    times = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    step_ms = statistics.median(times[2:])
    slowest = torch.tensor(step_ms, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        row = {"ranks": world, "optim": optim_fields(args.set), "step_ms": float(slowest), "params_max_abs_diff_vs_one_rank": max_diff,
               "gpu": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "muon_params": sum(p.numel() for p in params)}
        print(f"| {world} | {' '.join(args.set) or 'defaults'} | {float(slowest):.1f} ms | "
              f"{'—' if max_diff is None else f'{max_diff:.2e}'} |")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2))
    dist.barrier()     # no rank leaves while another still talks to it (gloo aborted at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
