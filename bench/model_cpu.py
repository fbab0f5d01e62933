"""Forward + backward time of the tiny preset on CPU (issue: model; goal < 1 s at 2 x 128, 2 threads).

Usage: python bench/model_cpu.py [--threads 2] [--batch 2] [--seq 128] [--repeats 5]
Prints a table and writes bench/results/model_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model import ModelArgs, V4Model


def measure(threads: int, batch: int, seq: int, repeats: int, **overrides) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = V4Model(ModelArgs.preset("tiny", **overrides)).train()
    ids = torch.randint(0, model.args.vocab_size, (batch, seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    for _ in range(2):  # warm-up
        model(inputs, labels=labels).loss.backward()
    fwd, total = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(inputs, labels=labels)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    return {"threads": threads, "batch": batch, "seq": seq, "features": overrides or "all on",
            "forward_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(total),
            "fwd_bwd_min_s": min(total)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    rows = [measure(a.threads, a.batch, a.seq, a.repeats),
            measure(a.threads, a.batch, a.seq, a.repeats, qat_fp8_kv=False, qat_fp4_experts=False,
                    qat_fp4_indexer=False)]
    print(f"{'features':<40} {'threads':>7} {'B x T':>8} {'fwd s':>8} {'fwd+bwd s':>10} {'min s':>8}")
    for r in rows:
        print(f"{str(r['features'])[:40]:<40} {r['threads']:>7} {r['batch']}x{r['seq']:<5} "
              f"{r['forward_s']:>8.3f} {r['fwd_bwd_s']:>10.3f} {r['fwd_bwd_min_s']:>8.3f}")
    print("goal: fwd+bwd < 1 s")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "model_cpu.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
