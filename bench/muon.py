"""Muon / hybrid Newton–Schulz benchmark on one GPU (issue 4; spec §3.11).

Measures, in bf16 on CUDA:
1. Newton–Schulz (10 hybrid steps) on 4096×4096, 2048×7168 and 7168×18432: textbook torch ops ("plain"),
   our fused torch path (addmm/baddbmm epilogues), our Triton symmetric-product path, the Gram form (cuBLAS
   or Triton products, fp16), the same replayed from CUDA graphs, and DeepSpeed's 5-step NS; time, TFLOP/s
   counted as 10·(4n²m + 2n³) (5· for DeepSpeed) whatever the form, output singular-value range.
   Section "gram": the Gram form's restart schedules against the bf16 standard form — error vs the fp32
   iteration and singular values on Gaussian, log-uniform and "spiky" spectra.
2. The two symmetric products alone (Triton upper-tile kernel vs cuBLAS).
3. The optimizer step of the h200_1b preset (spec §4.2; the real V4Model parameter set): our Muon (torch and
   Triton NS), torch fused AdamW over all parameters, DeepSpeed's MuonWithAuxAdam, the NS share alone, and
   the NS time of one rank's share when 2/4/8 data-parallel ranks share the work (communication excluded).

Usage: python bench/muon.py [--out bench/results/muon.json] [--skip-deepspeed] [--sections ns,gram,products,step]
       [--step-only [--rounds 2]]
DeepSpeed's Muon functions are wrapped in torch.compile; they are timed eagerly (compile time would exceed
the benchmark's device budget), which the table notes.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.optim import OptimConfig, build_optimizer, hybrid_newton_schulz  # noqa: E402
from train.optim.newton_schulz import plain_newton_schulz  # noqa: E402
from train.optim.orthogonalize import _newton_schulz_jobs, capture_cuda_graph  # noqa: E402

NS_SHAPES = [(4096, 4096), (2048, 7168), (7168, 18432)]
BRIEF_PLAIN_MS = {(4096, 4096): 6.5, (2048, 7168): 2.5, (7168, 18432): 68.9}
EXPERT_SHAPE, EXPERT_BATCH = (384, 1024), 1287  # h200_1b: 13 MoE layers × 32 experts × 3 + 39 shared matrices
DEVICE = "cuda"
PRESET = "h200_1b"
KERNELS = ("torch", "triton")
STEP_VARIANTS = [  # (ns_kernel, muon_elementwise, ns_cuda_graphs, overlap_adamw, fold_ns_normalization, overlap_muon_update, ns_form)
    ("torch", "foreach", False, False, False, False, "standard"), ("triton", "foreach", True, False, False, False, "standard"),
    ("torch", "triton", True, False, False, False, "standard"), ("triton", "triton", True, False, False, False, "standard"),
    ("triton", "triton", True, True, False, False, "standard"), ("torch", "triton", True, True, False, False, "standard"),
    ("triton", "triton", True, True, True, False, "standard"), ("triton", "triton", True, True, True, True, "standard"),
    ("triton", "triton", True, False, True, True, "standard"), ("triton", "triton", True, True, True, False, "auto"),
    ("torch", "triton", True, True, True, False, "auto"),
]
STEP_ONLY_VARIANTS = [  # --step-only: the defaults with the standard form against the Gram form for wide buckets
    ("triton", "triton", True, True, True, False, "standard"), ("triton", "triton", True, True, True, False, "auto"),
    ("torch", "triton", True, True, True, False, "auto"),
]


def use_cpu_smoke_settings() -> None:
    """--smoke: run every code path on CPU with small shapes (checks the script, not the numbers)."""
    global NS_SHAPES, BRIEF_PLAIN_MS, EXPERT_SHAPE, EXPERT_BATCH, DEVICE, PRESET, KERNELS
    NS_SHAPES = [(64, 64), (32, 112)]
    BRIEF_PLAIN_MS = {shape: float("nan") for shape in NS_SHAPES}
    EXPERT_SHAPE, EXPERT_BATCH = (16, 48), 5
    DEVICE, PRESET, KERNELS = "cpu", "tiny", ("torch",)
    global STEP_VARIANTS
    STEP_VARIANTS = [("torch", "foreach", False, False, False, False, "standard"),
                     ("torch", "foreach", False, False, False, False, "gram")]


def cuda_ms(fn, warmup: int = 2, iters: int = 7) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """fn captured once (lazily, on first call) in a CUDA graph; the returned callable replays it."""
    state = {}

    def replay():
        if not state:
            state["graph"], state["out"] = capture_cuda_graph(fn)
        state["graph"].replay()
        return state["out"]

    return replay


def ns_flops(shape: tuple[int, int], steps: int = 10) -> float:
    n, m = min(shape), max(shape)
    return steps * (4.0 * n * n * m + 2.0 * n**3)


def singular_value_range(X: torch.Tensor) -> tuple[float, float]:
    X = X.float()
    if X.shape[-2] > X.shape[-1]:
        X = X.mT
    eig = torch.linalg.eigvalsh(X @ X.mT).clamp_min(0).sqrt()
    return eig.min().item(), eig.max().item()


def deepspeed_ns_functions():
    from deepspeed.runtime.zero.muon import original_muon

    def eager(fn):
        return getattr(fn, "_torchdynamo_orig_callable", fn)

    return eager(original_muon.zeropower_via_newtonschulz5), eager(original_muon.zeropower_via_gram_newtonschulz)


def bench_newton_schulz(use_deepspeed: bool) -> list[dict]:
    rows = []
    ds_ns5, ds_gram = deepspeed_ns_functions() if use_deepspeed else (None, None)
    for shape in NS_SHAPES + [(EXPERT_BATCH, *EXPERT_SHAPE)]:
        torch.manual_seed(0)
        G = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
        batch = shape[0] if len(shape) == 3 else 1
        variants = {
            "plain torch (textbook ops)": (lambda: plain_newton_schulz(G, dtype=torch.bfloat16), 10),
            "ours torch (fused epilogues)": (lambda: hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="torch"), 10),
        }
        variants["ours Gram torch (cuBLAS, fp16)"] = (
            lambda: hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="torch", form="gram"), 10)
        if "triton" in KERNELS:
            variants["ours triton (symmetric tiles)"] = (
                lambda: hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="triton"), 10)
            variants["ours Gram triton (symmetric tiles, fp16)"] = (
                lambda: hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel="triton", form="gram"), 10)
        if ds_ns5 is not None and batch == 1:
            variants["deepspeed NS5 quintic (eager)"] = (lambda: ds_ns5(G, steps=5), 5)
            variants["deepspeed Gram NS5 fp16 (eager)"] = (lambda: ds_gram(G, steps=5), 5)
        if DEVICE == "cuda":  # as the optimizer runs them (ns_cuda_graphs): one graph replay per call
            for name in ("plain torch (textbook ops)", "ours triton (symmetric tiles)",
                         "ours Gram torch (cuBLAS, fp16)", "ours Gram triton (symmetric tiles, fp16)"):
                if name in variants:
                    variants[name + " + CUDA graph"] = (graphed(variants[name][0]), variants[name][1])
        plain_ms = None
        for name, (fn, steps) in variants.items():
            try:
                out = fn()
            except Exception as error:  # a failing variant (e.g. a kernel that does not compile) is recorded
                rows.append(dict(shape=list(shape), variant=name, error=repr(error)[:500]))
                print(f"  NS {shape}: {name:<34} FAILED {error!r:.300}", flush=True)
                continue
            lo, hi = singular_value_range(out)
            ms = cuda_ms(fn, iters=5 if max(shape) > 10000 or batch > 1 else 9)
            plain_ms = ms if plain_ms is None else plain_ms
            rows.append(dict(shape=list(shape), variant=name, steps=steps, ms=ms,
                             tflops=batch * ns_flops(shape[-2:], steps) / ms / 1e9, sv_min=lo, sv_max=hi,
                             speedup_vs_plain=plain_ms / ms, brief_plain_ms=BRIEF_PLAIN_MS.get(shape)))
            print(f"  NS {shape}: {name:<34} {ms:8.3f} ms  {rows[-1]['tflops']:6.0f} TFLOP/s  "
                  f"σ∈[{lo:.4f}, {hi:.4f}]  ×{rows[-1]['speedup_vs_plain']:.2f}", flush=True)
            del out
    return rows


GRAM_SCHEDULES = [(2, 4, 6, 8), (2, 4, 6), (2, 5, 8), (3, 6, 8), (5,), ()]
"""Restart steps compared by the Gram section (newton_schulz.GRAM_RESTARTS is the one in use)."""


def spectrum_input(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """A bf16 [.., n, m] test input: Gaussian, or random singular vectors with log-uniform singular values in
    [1e-4, 1] ("log-uniform"), or 8 singular values of 1 over a tail from 1e-2 down to 1e-5 ("spiky", like a
    momentum dominated by a few directions)."""
    torch.manual_seed(0)
    if kind == "gaussian":
        return torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    *batch, n, m = shape
    short = min(n, m)
    left = torch.linalg.qr(torch.randn(*batch, n, short, device=DEVICE)).Q
    right = torch.linalg.qr(torch.randn(*batch, m, short, device=DEVICE)).Q
    if kind == "log-uniform":
        sigma = torch.logspace(0, -4, short, device=DEVICE)
    else:
        sigma = torch.cat([torch.ones(8, device=DEVICE), torch.logspace(-2, -5, short - 8, device=DEVICE)])
    return ((left * sigma) @ right.mT).to(torch.bfloat16)


def bench_gram_restarts() -> list[dict]:
    """Accuracy (vs the fp32 standard iteration) and time of the Gram form for each restart schedule, next to
    the bf16 standard form, on the wide shapes and three spectra."""
    from train.optim import newton_schulz

    kernel = KERNELS[-1]
    rows = []
    in_use = newton_schulz.GRAM_RESTARTS
    shapes = [s for s in NS_SHAPES if max(s) >= 2 * min(s)] + [(8, *EXPERT_SHAPE)]
    try:
        for shape in shapes:
            for kind in ("gaussian", "log-uniform", "spiky"):
                G = spectrum_input(shape, kind)
                reference = hybrid_newton_schulz(G, dtype=torch.float32).float()
                runs = [("standard bf16", (), "standard")] + [(f"Gram fp16 {s}", s, "gram") for s in GRAM_SCHEDULES]
                for name, restarts, form in runs:
                    newton_schulz.GRAM_RESTARTS = restarts
                    fn = lambda: hybrid_newton_schulz(G, dtype=torch.bfloat16, kernel=kernel, form=form)  # noqa: E731
                    out = fn().float()
                    finite = bool(torch.isfinite(out).all())
                    error = ((out - reference).norm() / reference.norm()).item() if finite else float("inf")
                    lo, hi = singular_value_range(out) if finite else (float("nan"), float("nan"))
                    ms = cuda_ms(fn, iters=5) if kind == "gaussian" else None
                    rows.append(dict(shape=list(shape), spectrum=kind, variant=name, restarts=list(restarts),
                                     rel_error_vs_fp32=error, sv_min=lo, sv_max=hi, ms=ms))
                    print(f"  {str(shape):<18} {kind:<11} {name:<24} rel err {error:9.2e}  σ∈[{lo:.4f}, {hi:.4f}]"
                          + (f"  {ms:7.3f} ms" if ms is not None else ""), flush=True)
                del G, reference
    finally:
        newton_schulz.GRAM_RESTARTS = in_use
    return rows


def bench_symmetric_products() -> list[dict]:
    from train.optim.symmetric_kernel import symmetric_gram

    rows = []
    for shape in NS_SHAPES + [EXPERT_SHAPE]:
        n, m = min(shape), max(shape)
        batch = EXPERT_BATCH if shape == EXPERT_SHAPE else 1
        X = torch.randn(batch, n, m, device=DEVICE, dtype=torch.bfloat16) / math.sqrt(m)
        A = torch.bmm(X, X.mT)
        products = {
            "X·Xᵀ cuBLAS bmm": lambda: torch.bmm(X, X.mT),
            "X·Xᵀ triton upper tiles": lambda: symmetric_gram(X),
            "b·A+c·A² cuBLAS baddbmm": lambda: torch.baddbmm(A, A, A, beta=-4.775, alpha=2.0315),
            "b·A+c·A² triton upper tiles": lambda: symmetric_gram(A, alpha=2.0315, beta=-4.775, addend=A),
        }
        for name, fn in products.items():
            ms = cuda_ms(fn, iters=15)
            flops = 2.0 * batch * n * n * (m if "X·Xᵀ" in name else n)
            rows.append(dict(shape=[batch, n, m], product=name, ms=ms, tflops_full_count=flops / ms / 1e9))
            print(f"  {batch}×[{n}, {m}] {name:<30} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s (full count)",
                  flush=True)
    return rows


def h200_1b_model():
    """The h200_1b preset's parameters on the GPU (meta init, then random values: timing needs shapes only)."""
    from model import ModelArgs, V4Model

    with torch.device("meta"):
        model = V4Model(ModelArgs.preset(PRESET))
    model.to_empty(device=DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def set_grads(params: list[torch.Tensor], seed: int = 0) -> None:
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3


def share_of_rank0(blocks: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """The stacks rank 0 orthogonalises when `world` ranks split every shape bucket (orthogonalize_blocks' plan)."""
    buckets: dict[tuple[int, int], list[torch.Tensor]] = {}
    for b in blocks:
        wide = b.mT if b.shape[-2] > b.shape[-1] else b
        buckets.setdefault(tuple(wide.shape[-2:]), []).append(wide)
    shares = []
    for stacks in buckets.values():
        total = sum(s.shape[0] for s in stacks)
        take = total // world
        if take:
            shares.append(torch.cat(stacks)[:take].to(torch.bfloat16))
    return shares


def bench_fused_elementwise(optimizer) -> dict:
    """The two fused passes of muon_elementwise="triton" alone, over the plan the last step used."""
    from train.optim import bucketed_step
    from train.optim.elementwise_kernel import apply_bucket_update, lookahead_into_bucket

    (buckets,) = optimizer._bucket_plans.values()
    params = optimizer._model_params["muon"]
    momenta = [optimizer.state[p]["momentum_buffer"] for p in params]
    addresses = bucketed_step.address_table(params, momenta)

    def lookahead():
        for bucket in buckets:
            for launch in bucket.launches:
                lookahead_into_bucket(addresses, launch, bucket.buffer, params[0], 0.95, True)

    def update():
        for bucket in buckets:
            for launch in bucket.launches:
                apply_bucket_update(addresses, launch, bucket.buffer, params[0], 1.0, 0.0)

    def foreach_lookahead():
        optimizer._lookahead(momenta, [p.grad for p in params], dict(momentum=0.95, nesterov=True))

    numel = sum(p.numel() for p in params)
    result = {}
    for name, fn, bytes_per_value in (("lookahead", lookahead, 14), ("update", update, 10),
                                      ("foreach_lookahead_only", foreach_lookahead, 32)):
        ms = cuda_ms(fn, warmup=2, iters=7)
        result[name] = dict(ms=ms, gb_per_s=bytes_per_value * numel / ms / 1e6)
        print(f"    elementwise {name:<24} {ms:6.2f} ms  {result[name]['gb_per_s']:6.0f} GB/s "
              f"({bytes_per_value} B/value counted)", flush=True)
    return result


def fused_step_parity(model, params) -> dict:
    """Max |ΔW| after one step of the fused paths (triton NS + elementwise; with the folded normalisation and
    overlapped update) vs the foreach path (torch NS)."""
    start = [p.detach().clone() for p in params]
    finals, moved = {}, 0.0
    variants = {
        "foreach": dict(ns_kernel="torch", muon_elementwise="foreach", ns_form="standard"),
        "fused": dict(ns_kernel="triton", muon_elementwise="triton", fold_ns_normalization=False, ns_form="standard"),
        "fused_fold_overlap": dict(ns_kernel="triton", muon_elementwise="triton", fold_ns_normalization=True,
                                   overlap_muon_update=True, ns_cuda_graphs=True, ns_form="standard"),
        "fused_gram": dict(ns_kernel="triton", muon_elementwise="triton", ns_form="auto"),
    }
    for name, kwargs in variants.items():
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-3, **kwargs))
        set_grads(params, seed=1)
        optimizer.step()
        muon_ids = {id(p) for p in optimizer._model_params["muon"]}
        finals[name] = [p.detach().clone() for p in params if id(p) in muon_ids]
        moved = max((p - p0).abs().max().item() for p, p0 in zip(params, start) if id(p) in muon_ids)
        del optimizer
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    result = dict(max_update=moved)
    for name in ("fused", "fused_fold_overlap", "fused_gram"):
        diff = max((a - b).abs().max().item() for a, b in zip(finals["foreach"], finals[name]))
        result[f"max_abs_diff_{name}"] = diff
        print(f"  parity, one step, {name} vs foreach (torch NS): max |ΔW| {diff:.3g} (largest |update| {moved:.3g})",
              flush=True)
    diff = max((a - b).abs().max().item() for a, b in zip(finals["fused"], finals["fused_fold_overlap"]))
    result["max_abs_diff_fold_vs_fused"] = diff
    print(f"  parity, one step, fused_fold_overlap vs fused: max |ΔW| {diff:.3g}", flush=True)
    return result


def bench_optimizer_step(use_deepspeed: bool, step_only: bool = False, rounds: int = 1) -> dict:
    """The h200_1b step table (and, unless step_only, the NS-share, bucket, AdamW and DeepSpeed rows).

    step_only: parity and the STEP_ONLY_VARIANTS step times only, `rounds` times interleaved (noise check).
    """
    variants = STEP_ONLY_VARIANTS if step_only and DEVICE == "cuda" else STEP_VARIANTS
    out = {}
    model = h200_1b_model()
    params = list(model.parameters())
    out["params_total"] = sum(p.numel() for p in params)
    if DEVICE == "cuda":
        out["parity"] = fused_step_parity(model, params)
    for round_ in range(rounds):
        for kernel, elementwise, graphs, overlap, fold, overlap_update, form in variants:
            cfg = OptimConfig(ns_kernel=kernel, ns_dtype="auto", ns_cuda_graphs=graphs, muon_elementwise=elementwise,
                              overlap_adamw=overlap, fold_ns_normalization=fold, overlap_muon_update=overlap_update,
                              ns_form=form)
            optimizer = build_optimizer(model, cfg)
            set_grads(params)
            ms = cuda_ms(optimizer.step, warmup=2, iters=7)
            tag = (f"{kernel}_{elementwise}{'_graphs' if graphs else ''}{'_overlap' if overlap else ''}"
                   f"{'_fold' if fold and elementwise == 'triton' else ''}{'_overlapupdate' if overlap_update else ''}"
                   f"{'' if form == 'standard' else '_' + form}")
            out.setdefault(f"muon_step_ms_{tag}", []).append(ms)
            print(f"  {PRESET} Muon+AdamW step (ns_kernel={kernel}, muon_elementwise={elementwise}, "
                  f"cuda_graphs={graphs}, overlap_adamw={overlap}, fold_ns_normalization={fold}, "
                  f"overlap_muon_update={overlap_update}, ns_form={form}), round {round_}: {ms:.2f} ms", flush=True)
            grouping = optimizer.grouping
            if (elementwise == "triton" and DEVICE == "cuda" and not step_only
                    and (kernel, graphs, overlap, fold, overlap_update, form)
                    == ("triton", True, False, False, False, "standard")):
                out[f"elementwise_ms_{tag}"] = bench_fused_elementwise(optimizer)
            del optimizer
            torch.cuda.empty_cache()
    for key, times in list(out.items()):
        if key.startswith("muon_step_ms_") and rounds == 1:
            out[key] = times[0]
    if step_only:
        return out
    out["muon_params"] = sum(m.param.numel() for m in grouping.muon)
    out["muon_matrices"] = grouping.muon_matrix_count()
    out["adamw_params"] = sum(a.param.numel() for a in grouping.adamw)

    blocks = [m.as_blocks(m.param.grad) for m in grouping.muon]
    flops = sum(ns_flops(tuple(b.shape[-2:])) * b.shape[0] for b in blocks)
    out["ns_tflop_per_step"] = flops / 1e12
    for kernel in KERNELS:
        for graphs in (False, True) if DEVICE == "cuda" and kernel != "torch" else (DEVICE == "cuda",):
            for world in (1, 2, 4, 8):
                jobs = [[s] for s in share_of_rank0(blocks, world)]
                cache = {} if graphs else None
                ms = cuda_ms(lambda: _newton_schulz_jobs(jobs, torch.bfloat16, kernel, cache), warmup=2, iters=5)
                tag = f"{kernel}{'_graphs' if graphs else ''}"
                out[f"ns_share_ms_{tag}_world{world}"] = ms
                print(f"  {PRESET} NS only, rank 0 of {world} ({tag}): {ms:.2f} ms"
                      + (f"  ({flops / ms / 1e9:.0f} TFLOP/s)" if world == 1 else ""), flush=True)
    buckets = []
    for stack in share_of_rank0(blocks, 1):
        n, m = stack.shape[-2:]
        bucket_flops = ns_flops((n, m)) * stack.shape[0]
        row = dict(shape=[stack.shape[0], n, m], tflop=bucket_flops / 1e12)
        names = []
        for kernel in KERNELS:
            for form in ("standard", "gram"):
                cache = {} if DEVICE == "cuda" else None
                name = kernel if form == "standard" else f"{kernel}_gram"
                row[f"ms_{name}"] = cuda_ms(
                    lambda: _newton_schulz_jobs([[stack]], torch.bfloat16, kernel, cache, forms=[form]),
                    warmup=2, iters=5)
                names.append(name)
        buckets.append(row)
        print(f"  bucket {stack.shape[0]:5d}×[{n}, {m}]  {row['tflop']:.3f} TFLOP  "
              + "  ".join(f"{k}: {row[f'ms_{k}']:.2f} ms" for k in names), flush=True)
    out["ns_buckets"] = buckets
    del blocks
    torch.cuda.empty_cache()

    adamw = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-20, weight_decay=0.1, fused=DEVICE == "cuda")
    set_grads(params)
    out["fused_adamw_step_ms"] = cuda_ms(adamw.step, warmup=2, iters=5)
    print(f"  {PRESET} torch fused AdamW step (all params): {out['fused_adamw_step_ms']:.2f} ms", flush=True)
    del adamw
    torch.cuda.empty_cache()

    if use_deepspeed:
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        for name, p in model.named_parameters():
            p.use_muon = p.ndim >= 2 and "embed" not in name and "head.weight" != name
            p.is_expert_group = p.ndim == 3
        groups = [dict(params=[p for p in params if p.use_muon], use_muon=True, lr=1e-4, weight_decay=0.1),
                  dict(params=[p for p in params if not p.use_muon], use_muon=False, lr=1e-4, weight_decay=0.1,
                       betas=(0.9, 0.95), eps=1e-20)]
        ds = MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                             adam_optimizer_kwargs=dict(fused=DEVICE == "cuda"))
        set_grads(params)
        out["deepspeed_muon_step_ms_eager"] = cuda_ms(ds.step, warmup=1, iters=3)
        print(f"  {PRESET} DeepSpeed MuonWithAuxAdam step (eager, Gram NS5 fp16): "
              f"{out['deepspeed_muon_step_ms_eager']:.2f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/muon.json")
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--sections", default="ns,gram,products,step")
    parser.add_argument("--smoke", action="store_true", help="CPU, small shapes: checks the script only")
    parser.add_argument("--step-only", action="store_true",
                        help="only the h200_1b step table: parity and STEP_ONLY_VARIANTS (implies --sections step)")
    parser.add_argument("--rounds", type=int, default=1, help="with --step-only: interleaved timing rounds")
    args = parser.parse_args()
    if args.smoke:
        use_cpu_smoke_settings()
    elif not torch.cuda.is_available():
        raise SystemExit("bench/muon.py needs a CUDA GPU (or --smoke)")
    use_ds = not args.skip_deepspeed
    if use_ds:
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            print(f"DeepSpeed unavailable ({error}); skipping its rows", flush=True)
            use_ds = False
        # DeepSpeed's NS and muon_update are torch.compile'd; run them eagerly (module docstring). Our code
        # does not use torch.compile, so this changes only DeepSpeed's rows.
        torch._dynamo.config.disable = True
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    result = dict(device=device_name, torch=torch.__version__, dtype="bfloat16", preset=PRESET)
    sections = ["step"] if args.step_only else args.sections.split(",")
    t0 = time.time()
    runs = [("newton_schulz", "ns", lambda: bench_newton_schulz(use_ds)),
            ("gram_restarts", "gram", bench_gram_restarts),
            ("symmetric_products", "products", bench_symmetric_products),
            ("h200_1b_step", "step", lambda: bench_optimizer_step(use_ds, args.step_only, args.rounds))]
    for key, section, run in runs:
        if section not in sections or (section == "products" and "triton" not in KERNELS):
            continue
        print(f"[{section}]", flush=True)
        try:
            result[key] = run()
        except Exception as error:
            result[key] = dict(error=repr(error)[:1000])
            print(f"  section {section} FAILED: {error!r:.1000}", flush=True)
    result["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
