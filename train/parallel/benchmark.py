"""Layout parity and tokens/s of a preset on GPUs (issue 5 "must show"; bench/NOTES.md "## parallel").

Layouts: `plain` (one process, no engine: bf16 weights, fused torch AdamW), `engine` (one process
through `train.parallel`: DeepSpeed ZeRO-1 bf16 with fp32 masters, the expert step), `dp2`, `tp2`,
`ep2`, `tp2_ep2` (torchrun). Every layout trains on the same global batches from the same init,
so the loss curves are comparable; tokens/s = global tokens per step / median step time after
warm-up. Rank 0 prints one JSON line and writes it to --out.

    python -m train.parallel.benchmark --layout plain --out plain.json
    torchrun --nproc-per-node 2 -m train.parallel.benchmark --layout ep2 --out ep2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from model import ModelArgs, V4Model

LAYOUTS = {"engine": dict(), "dp2": dict(), "tp2": dict(tp=2), "ep2": dict(ep=2), "tp2_ep2": dict(tp=2, ep=2)}


def global_batch(step: int, rows: int, seq: int, vocab: int):
    """A learnable token stream (t -> 5t + 3 mod vocab) from a per-step seed."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.empty(rows, seq + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (rows,), generator=gen)
    for t in range(seq):
        ids[:, t + 1] = (5 * ids[:, t] + 3) % vocab
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def build_model(args: ModelArgs, device: torch.device) -> V4Model:
    """The same init on every rank and layout (built on CPU: the hash tables use a CPU generator)."""
    torch.manual_seed(0)
    return V4Model(args).to(device)


def adamw(params, lr: float):
    params = list(params)
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused)


def run(opts) -> dict:
    args = ModelArgs.preset(opts.preset)
    if opts.layout == "plain":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(args, device)
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
        opt = adamw(model.parameters(), opts.lr)
        dp, dp_rank, rank = 1, 0, 0

        def train_step(ids, labels):
            out = model(ids, labels=labels)
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss), float(norm)
    else:
        from train.parallel import ParallelConfig, init_parallel, parallelize

        dims = init_parallel(ParallelConfig(**LAYOUTS[opts.layout]), args)
        device, dp, dp_rank, rank = dims.device, dims.dp, dims.dp_rank, dims.rank
        model = build_model(args, device)
        engine = parallelize(model, dims, dense_optimizer_fn=lambda named: adamw([p for _, p in named], opts.lr),
                             expert_optimizer_fn=lambda named: adamw([p for _, p in named], opts.lr),
                             micro_batch_size=opts.rows // dp, grad_clip=opts.clip)

        def train_step(ids, labels):
            # Every row is full (no ignored targets), so plain dp-averaging is the global mean.
            out = engine(ids, labels=labels)
            engine.backward(out.loss)
            norm = engine.clip_grad_norm()
            engine.step()
            loss = out.loss.detach().float().clone()
            if dp > 1:
                dist.all_reduce(loss, group=dims.dp_group)
            return float(loss) / dp, norm

    rows = opts.rows // dp
    losses, norms, times = [], [], []
    for step in range(opts.steps):
        ids, labels = global_batch(step, opts.rows, opts.seq, args.vocab_size)
        ids = ids[dp_rank * rows:(dp_rank + 1) * rows].to(device)
        labels = labels[dp_rank * rows:(dp_rank + 1) * rows].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, norm = train_step(ids, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        norms.append(norm)
    step_time = statistics.median(times[opts.warmup:]) if opts.steps > opts.warmup else times[-1]
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = {
        "layout": opts.layout, "preset": opts.preset, "gpus": world, "rows": opts.rows, "seq": opts.seq,
        "losses": losses, "grad_norms": norms, "step_s": step_time,
        "tokens_per_s": opts.rows * opts.seq / step_time,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0,
    }
    return result if rank == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, choices=["plain", *LAYOUTS])
    parser.add_argument("--preset", default="h200_1b")
    parser.add_argument("--rows", type=int, default=2, help="global batch rows")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out")
    opts = parser.parse_args()
    result = run(opts)
    if result:
        line = json.dumps(result)
        print(line, flush=True)
        if opts.out:
            with open(opts.out, "w") as f:
                f.write(line + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
