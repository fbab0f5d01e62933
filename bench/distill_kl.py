"""Benchmark of kernels.distill_kl against naive torch and Liger-Kernel (spec opd-and-fused-loss §0, §10).

Forward + backward of the distillation loss with both logits recomputed from hidden states, bf16,
one GPU. Rows: ours (TileLang), naive torch (materialised fp32 logits), Liger-Kernel 0.8.5
`LigerFusedLinearJSD` (beta=1 is reverse KL). Time is the median of CUDA-event timings of whole
fwd+bwd steps; peak is `max_memory_allocated` beyond what was allocated before the step (inputs
and parameters), so the [V, Ds] student-head gradient counts, as in spec §0.

    python bench/distill_kl.py                 # the full grid below; table on stdout
    python bench/distill_kl.py --quick         # N = 8192, d = 4096, V = 129,280 only
Writes bench/results/distill_kl.json.
"""

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.distill_kl import distill_kl  # noqa: E402

GIB = 2**30
CEILING_TFLOPS = 798.0  # spec §0: measured dense bf16 matmul ceiling on this H200


def make_inputs(n, vocab, d_s, d_t, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    hs = torch.randn(n, d_s, **kw).requires_grad_(True)
    ws = (torch.randn(vocab, d_s, **kw) * (2 / math.sqrt(d_s))).requires_grad_(True)
    ht = torch.randn(n, d_t, **kw)
    wt = torch.randn(vocab, d_t, **kw) * (2 / math.sqrt(d_t))
    return hs, ws, ht, wt


def step_ours(hs, ws, ht, wt, kind="reverse", beta=0.5):
    distill_kl(hs, ws, ht, wt, kind=kind, beta=beta, impl="tilelang").loss.backward()


def step_naive(hs, ws, ht, wt, kind="reverse", beta=0.5):
    logp = F.log_softmax((hs @ ws.T).float(), -1)
    with torch.no_grad():
        logq = F.log_softmax((ht @ wt.T).float(), -1)
    if kind == "reverse":
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
    else:
        loss = (logq.exp() * (logq - logp)).sum(-1).mean()
    loss.backward()


def step_liger(hs, ws, ht, wt, kind="reverse", beta=0.5):
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd_beta = {"reverse": 1.0, "forward": 0.0}.get(kind, beta)
    LigerFusedLinearJSD(jsd_beta=jsd_beta)(hs, ws, ht, wt, None).backward()


STEPS = {"ours (TileLang)": step_ours, "naive torch": step_naive, "Liger 0.8.5 FLJSD": step_liger}


def measure(step, inputs, warmup=2, reps=5):
    """Median ms of fwd+bwd and peak extra GiB; None when it does not fit."""
    hs, ws = inputs[0], inputs[1]
    try:
        for _ in range(warmup):
            step(*inputs)
            hs.grad = ws.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            hs.grad = ws.grad = None
        peak = (torch.cuda.max_memory_allocated() - base) / GIB
        return statistics.median(times), peak
    except torch.cuda.OutOfMemoryError:
        hs.grad = ws.grad = None
        torch.cuda.empty_cache()
        return None


def matmul_ceiling(n, vocab, d):
    """Time of one cuBLAS N·d·V bf16 GEMM (the unit of the spec's floors)."""
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.T
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b.T
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def breakdown(n, vocab, d):
    """Per-stage times of the TileLang path: one logits chunk and one dH/dW GEMM group (CUDA events)."""
    from kernels.distill_kl import kernel as K

    c = K.DistillKLKernelConfig()
    hs, ws, ht, wt = make_inputs(n, vocab, d, d)
    vocab_pad = K.padded_vocab(vocab)
    rows, gemm_rows = K.chunk_rows_for(vocab_pad, c, n)
    hs_gemm, ws = hs.detach()[:gemm_rows], ws.detach()
    hs, ht = hs_gemm[:rows], ht[:rows]
    n_tiles = -(-vocab // c.block_v)
    ctas = c.persistent_ctas or torch.cuda.get_device_properties(0).multi_processor_count
    logits = K.logits_partials_kernel(c.block_m, c.block_v, c.block_k, c.num_stages, "reverse", num_ctas=ctas)
    combine = K.combine_partials_kernel("reverse", vocab, c.block_v, c.combine_block_r, c.combine_group)
    grad = K.logit_grad_kernel("reverse", 0.0, vocab, vocab_pad, c.elementwise_block_m, c.block_v, c.threads)
    rel_s = torch.empty(rows, vocab_pad, device="cuda", dtype=torch.float16)
    rel_t = torch.empty_like(rel_s)
    partials = torch.empty(n_tiles, K.N_PARTIALS, rows, device="cuda")
    row_stats = torch.empty(K.N_ROW_STATS, rows, device="cuda")
    d_head = torch.empty_like(ws)
    grad_buf = rel_s.view(torch.bfloat16)
    # The dH / dW_s GEMMs run once per `gemm_rows` rows (several chunks' gradients).
    g = torch.randn(gemm_rows, vocab, device="cuda", dtype=torch.bfloat16)
    stage_fns = {
        "logits+partials kernel": lambda: logits(hs, ws, ht, wt, 1.0, rel_s, rel_t, partials),
        "combine partials kernel": lambda: combine(partials, row_stats),
        "logit grad kernel": lambda: grad(rel_s, rel_t, partials, row_stats, row_stats[2], 1.0 / n, grad_buf),
        f"dH = G·W_s (cuBLAS, {gemm_rows} rows)": lambda: g @ ws,
        f"dW_s = Gᵀ·H_s (cuBLAS, {gemm_rows} rows)": lambda: torch.mm(g.T, hs_gemm, out=d_head),
        f"dW_s += Gᵀ·H_s (addmm, {gemm_rows} rows)": lambda: d_head.addmm_(g.T, hs_gemm),
    }
    # Round-robin, so that the clock drift of a power-capped GPU spreads over every stage.
    times = {name: [] for name in stage_fns}
    for rep in range(6):
        for name, fn in stage_fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if rep:  # the first round warms up
                times[name].append(start.elapsed_time(end))
    stages = {name: statistics.median(t) for name, t in times.items()}
    flop = 2 * rows * d * vocab
    gemm_flop = {name: 2 * gemm_rows * d * vocab for name in stages if name.startswith("dW") or name.startswith("dH")}
    gemm_flop["logits+partials kernel"] = 2 * flop
    return (rows, gemm_rows), {name: (ms, gemm_flop[name] / ms / 1e9 if name in gemm_flop else None) for name, ms in stages.items()}


def host_overhead(n, vocab, d):
    """GPU-idle diagnosis: wall time of the Python call vs GPU time of the step, and host syncs."""
    hs, ws, ht, wt = make_inputs(n, vocab, d, d)
    for _ in range(2):
        step_ours(hs, ws, ht, wt)
        hs.grad = ws.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = distill_kl(hs, ws, ht, wt)
        t_forward_call = time.perf_counter() - t0
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    t_forward_done = time.perf_counter() - t0
    out.loss.backward()
    torch.cuda.synchronize()
    t_step = time.perf_counter() - t0
    hs.grad = ws.grad = None
    syncs = sorted({str(w.message).splitlines()[0][:100] for w in caught})
    return dict(forward_call_ms=1e3 * t_forward_call, forward_done_ms=1e3 * t_forward_done, step_ms=1e3 * t_step, forward_host_syncs=syncs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distill_kl.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    t0 = time.time()

    unit = matmul_ceiling(8192, 129_280, 4096)
    results["one_NdV_gemm_ms"] = unit
    print(f"one N·d·V bf16 GEMM (N=8192, d=4096, V=129,280) via cuBLAS: {unit:.2f} ms = {2 * 8192 * 4096 * 129_280 / unit / 1e9:.0f} TFLOP/s", flush=True)

    grid = [(8192, 4096, 4096, 129_280, tuple(STEPS))]
    if not args.quick:
        grid += [
            (2048, 4096, 4096, 129_280, tuple(STEPS)),
            (32768, 4096, 4096, 129_280, ("ours (TileLang)", "Liger 0.8.5 FLJSD")),
            (8192, 4096, 7168, 129_280, ("ours (TileLang)", "Liger 0.8.5 FLJSD")),
            (8192, 4096, 4096, 151_936, ("ours (TileLang)",)),
        ] + [(8192, 4096, 4096, v, ("ours (TileLang)",)) for v in (32_000, 262_144)]

    header = f"{'impl':<20} {'N':>6} {'d_s':>5} {'d_t':>5} {'V':>8} {'ms fwd+bwd':>11} {'peak GiB':>9} {'TFLOP/s (4 GEMMs)':>18} {'vs 4-GEMM floor':>16}"
    print(header)
    print("-" * len(header), flush=True)
    for n, d_s, d_t, vocab, impls in grid:
        inputs = make_inputs(n, vocab, d_s, d_t)
        useful_flop = 2 * n * vocab * (2 * d_s + d_t + d_s)  # z_s, z_t, dH, dW
        floor_ms = useful_flop / (CEILING_TFLOPS * 1e9)
        for name in impls:
            got = measure(STEPS[name], inputs)
            row = dict(impl=name, n=n, d_s=d_s, d_t=d_t, vocab=vocab, floor_ms=floor_ms)
            if got is None:
                print(f"{name:<20} {n:>6} {d_s:>5} {d_t:>5} {vocab:>8} {'OOM':>11}", flush=True)
                row.update(ms=None, peak_gib=None)
            else:
                ms, peak = got
                row.update(ms=ms, peak_gib=peak, tflops=useful_flop / ms / 1e9)
                print(f"{name:<20} {n:>6} {d_s:>5} {d_t:>5} {vocab:>8} {ms:>11.1f} {peak:>9.2f} {row['tflops']:>18.0f} {ms / floor_ms:>15.2f}x", flush=True)
            results["rows"].append(row)
        del inputs
        torch.cuda.empty_cache()

    if not args.no_breakdown:
        (rows, gemm_rows), stages = breakdown(8192, 129_280, 4096)
        results["breakdown_chunk_rows"] = rows
        results["breakdown_gemm_rows"] = gemm_rows
        results["breakdown"] = {k: v[0] for k, v in stages.items()}
        print(f"\nstages of ours (N = 8192, d = 4096, V = 129,280; logits chunks of {rows} rows, dH/dW GEMMs over {gemm_rows} rows):")
        for name, (ms, tflops) in stages.items():
            print(f"  {name:<40} {ms:8.2f} ms" + (f"  {tflops:6.0f} TFLOP/s" if tflops else ""))
        results["host"] = host_overhead(8192, 129_280, 4096)
        print("host timing of one step:", results["host"])
    results["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
