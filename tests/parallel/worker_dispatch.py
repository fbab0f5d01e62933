"""torchrun worker: the EP all-to-all / TP token-split hooks against the local expert math.

Every rank routes its own random tokens; the reference runs `model.moe.expert_forward` with all
experts on the same tokens. Expert gradients of the reference are summed over the ranks that
exchange tokens and sliced to the local shard. Rank 0 writes max errors as JSON.
"""

import argparse
import json

import torch
import torch.distributed as dist

from model import ModelArgs
from model.moe import GroupedExperts, expert_forward
from train.parallel import ParallelConfig, destroy_parallel, init_parallel
from train.parallel.expert_parallel import shard_experts


def case(tp: int, ep: int, route: str, args: ModelArgs) -> dict:
    dims = init_parallel(ParallelConfig(tp=tp, ep=ep), args)
    E, K, D, N = args.n_routed_experts, args.n_activated_experts, args.dim, 13
    torch.manual_seed(0)
    full = GroupedExperts(args)
    for w in (full.w1, full.w3, full.w2):
        torch.nn.init.normal_(w, std=0.3)
    # Tensor-parallel peers hold the same tokens; other ranks different ones.
    gen = torch.Generator().manual_seed(100 + dist.get_rank() // tp)
    x = torch.randn(N, D, generator=gen)
    high = E if route == "all" else E // 2          # "low": every token avoids the upper experts
    idx = torch.stack([torch.randperm(high, generator=gen)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=gen)
    grad_y = torch.randn(N, D, generator=gen)

    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    weights = [p.detach().clone().requires_grad_() for p in (full.w1, full.w3, full.w2)]
    y_ref = expert_forward(x_ref, idx, w_ref, *weights, args.swiglu_limit)
    (y_ref * grad_y).sum().backward()

    shard_experts(full, dims)
    x_par, w_par = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_par = full(x_par, idx, w_par)
    (y_par * grad_y).sum().backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    errs = {"y": rel(y_par, y_ref), "x_grad": rel(x_par.grad, x_ref.grad), "w_grad": rel(w_par.grad, w_ref.grad)}
    local = E // ep
    start = dims.ep_rank * local
    for name, ref in zip(("w1", "w3", "w2"), weights):
        # An expert owner's gradient covers the tokens it received: those of its EP peers
        # (ep > 1) or this TP rank's token slice (tp > 1, summed over TP peers here).
        ref_grad = ref.grad.clone()
        dist.all_reduce(ref_grad, group=dims.ep_group)
        par_grad = getattr(full, name).grad.clone()
        dist.all_reduce(par_grad, group=dims.tp_group)
        errs[f"{name}_grad"] = rel(par_grad, ref_grad[start:start + local])
    out = torch.tensor(list(errs.values()))
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return dict(zip(errs, out.tolist()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    opts = parser.parse_args()
    # FP4 QAT off: the reference calls expert_forward on the raw weights (parity tests cover QAT).
    args = ModelArgs.preset("tiny", qat_fp4_experts=False)
    results = {"ep2_all": case(1, 2, "all", args), "ep2_one_rank_idle": case(1, 2, "low", args),
               "tp2": case(2, 1, "all", args)}
    if dist.get_rank() == 0:
        with open(opts.out, "w") as f:
            json.dump(results, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
