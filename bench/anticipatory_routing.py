"""Overhead of anticipatory routing (spec §3.8.4; report: ~20 % while active).

Times one optimizer step of a preset with standard routing and with anticipatory routing (one
extra forward-only pass over the batch Delta t steps ahead, its routing cached and replayed as
the routing override). CPU by default (tiny); `--device cuda --preset h200_1b` on a GPU.
Prints a table and writes bench/results/anticipatory_routing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model import ModelArgs, V4Model
from train.anticipatory import AnticipatoryRouting
from train.optim import OptimConfig, build_optimizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lookahead", type=int, default=2)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = V4Model(ModelArgs.preset(a.preset)).to(device).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.args.vocab_size, (a.batch, a.seq + 1), generator=gen).to(device)
               for _ in range(a.steps + a.lookahead + 2)]
    routing = AnticipatoryRouting(a.lookahead)

    def step(i: int, anticipatory: bool) -> float:
        _sync(device)
        t0 = time.perf_counter()
        if anticipatory:
            routing.precompute(model, i, 1, lambda ahead, _m: {"input_ids": batches[i + ahead][:, :-1],
                                                                "doc_ids": torch.zeros_like(batches[i + ahead][:, :-1])},
                               device)
        ids = batches[i]
        override = routing.take(i, 0, device) if anticipatory else None
        out = model(ids[:, :-1], labels=ids[:, 1:], routing_override=override)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_biases()
        _sync(device)
        return time.perf_counter() - t0

    step(0, False)                                   # warm-up
    plain = [step(i, False) for i in range(1, a.steps)]
    routing.activate(1, a.steps + 1)
    antic = [step(i, True) for i in range(1, a.steps)]
    row = {"preset": a.preset, "device": a.device, "tokens_per_step": a.batch * a.seq,
           "standard_s": statistics.median(plain), "anticipatory_s": statistics.median(antic)}
    row["overhead"] = row["anticipatory_s"] / row["standard_s"] - 1
    print(f"{'preset':<10}{'device':<8}{'tokens/step':>12}{'standard s':>12}{'anticipatory s':>16}{'overhead':>10}")
    print(f"{row['preset']:<10}{row['device']:<8}{row['tokens_per_step']:>12}{row['standard_s']:>12.3f}"
          f"{row['anticipatory_s']:>16.3f}{row['overhead']:>10.1%}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "anticipatory_routing.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
