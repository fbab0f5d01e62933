"""Optimizer and learning-rate schedule configuration (spec §2.2, §3.11)."""

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """Muon + AdamW hyper-parameters and the warmup → constant → cosine LR schedule.

    Muon and AdamW share one learning rate: the 0.18 update-RMS matching is designed for that (§3.11).
    """

    lr: float = 2.7e-4
    """Peak learning rate, shared by Muon and AdamW (V4-Flash: 2.7e-4, §2.2)."""
    min_lr: float = 2.7e-5
    """Learning rate at the end of the cosine decay (V4: peak / 10)."""
    warmup_steps: int = 2000
    """Steps of linear warmup from 0 to `lr`."""
    decay_start_fraction: float = 0.9
    """Fraction of the total steps after which the cosine decay to `min_lr` starts; before it the LR is constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay of Muon matrices and of the AdamW matrices (embedding, head, `ape`)."""
    vector_weight_decay: float = 0.0
    """Decoupled weight decay of 1-D AdamW parameters (RMSNorm weights, mHC bases/scales, `attn_sink`) [rec]."""
    adam_beta1: float = 0.9
    """AdamW β1 (V3's value [rec])."""
    adam_beta2: float = 0.95
    """AdamW β2 (V3's value [rec])."""
    adam_eps: float = 1e-20
    """AdamW ε (1e-20, per the Primus reproduction)."""
    muon_momentum: float = 0.95
    """Muon momentum μ in M ← μ·M + G."""
    nesterov: bool = True
    """Orthogonalize the look-ahead μ·M + G instead of M."""
    update_rms: float = 0.18
    """Target RMS γ of a Muon update: the orthogonalized matrix is scaled by sqrt(max(n, m))·γ."""
    ns_dtype: str = "auto"
    """Newton–Schulz compute dtype: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16" or "float32"."""
    ns_kernel: str = "auto"
    """Newton–Schulz implementation: "torch" (reference, any device), "triton" (symmetric-product kernel, CUDA
    only) or "auto" (triton on CUDA when Triton is installed, else torch)."""
    ns_form: str = "auto"
    """Newton–Schulz evaluation: "standard" (X·Xᵀ products every step), "gram" (n×n products of the Gram matrix
    with restarts, in fp16 for bf16 work; train.optim.newton_schulz) or "auto" (Gram on CUDA for matrices at
    least twice as wide as tall, standard elsewhere). Same iteration and schedule; fp32 results agree to 1e-6."""
    muon_elementwise: str = "auto"
    """Memory-bound half of the Muon step: "foreach" (torch foreach ops, reference, any device), "triton"
    (fused momentum + look-ahead + cast into the NS buffers, fused decayed update; CUDA, plain parameters only,
    other layouts fall back to "foreach"; see train.optim.bucketed_step) or "auto" (triton on CUDA when Triton
    is installed, else foreach)."""
    fold_ns_normalization: bool = True
    """With muon_elementwise="triton": the look-ahead pass also writes each matrix's sum of squares, and Newton–
    Schulz folds 1/‖X‖ into its first step (standard form, ns_kernel="triton") or divides by the given norm
    (ns_kernel="torch", and the Gram form's normalise-and-cast pass) instead of computing the norm in a pass of
    its own. False: Newton–Schulz normalises on its own (reference)."""
    overlap_muon_update: bool = False
    """With muon_elementwise="triton" on CUDA: each bucket's update pass W ← W·(1 − ηλ) − ηsO runs on a side
    stream while Newton–Schulz works on the next bucket (one NS call and CUDA graph per bucket). Same results."""
    overlap_adamw: bool = False
    """On CUDA, run the AdamW half of the step on a side stream once the Muon look-ahead is written, so its
    memory-bound pass overlaps the compute-bound Newton–Schulz; the step ends when both have. Same results."""
    ns_cuda_graphs: bool = True
    """On CUDA, capture each step's Newton–Schulz (fixed shapes) in a CUDA graph and replay it: fewer launches,
    which matters once the work is shared over ranks (h200_1b, 8 ranks: 8.0 → 5.6 ms; 1 GPU: 39.0 vs 40.3 ms).
    Bit-identical to eager (tests/optim/test_muon.py, run on an H200). No effect on CPU."""
    grad_clip: float = 1.0
    """Global gradient-norm clip applied to the raw gradients before the step (0 disables); the training loop applies it."""
    hc_fn_muon: bool = True
    """Optimize the mHC dynamic projections `hc_*_fn` with Muon as whole matrices ([infer] §3.1.4); False → AdamW."""
    wo_a_per_group: bool = True
    """Orthogonalize each of the o_groups row blocks of `attn.wo_a` separately ([rec] §3.11); False → whole matrix."""
    distribute_ns: bool = True
    """Spread the Newton–Schulz work over the data-parallel (and expert-data-parallel) ranks, then all-gather."""
    tp_blockwise: bool = False
    """Orthogonalize tensor-parallel shards on their own instead of gathering the full matrix (approximation)."""

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix when a value is out of range."""
        if self.ns_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"OptimConfig.ns_dtype={self.ns_dtype!r}: use 'auto', 'bfloat16' or 'float32'")
        if self.ns_kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"OptimConfig.ns_kernel={self.ns_kernel!r}: use 'auto', 'torch' or 'triton'")
        if self.ns_form not in ("auto", "standard", "gram"):
            raise ValueError(f"OptimConfig.ns_form={self.ns_form!r}: use 'auto', 'standard' or 'gram'")
        if self.muon_elementwise not in ("auto", "foreach", "triton"):
            raise ValueError(f"OptimConfig.muon_elementwise={self.muon_elementwise!r}: use 'auto', 'foreach' or 'triton'")
        if not 0.0 <= self.decay_start_fraction <= 1.0:
            raise ValueError(f"OptimConfig.decay_start_fraction={self.decay_start_fraction}: must lie in [0, 1]")
        if self.min_lr > self.lr:
            raise ValueError(f"OptimConfig.min_lr={self.min_lr} exceeds lr={self.lr}: lower min_lr")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"OptimConfig.muon_momentum={self.muon_momentum}: must lie in [0, 1)")

    def resolved(self, device: torch.device) -> "OptimConfig":
        """This config with the "auto" fast paths decided for parameters on `device`; an explicit
        "triton" without CUDA or without Triton installed is an error here, before any step."""
        fast = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        kernel = self.ns_kernel if self.ns_kernel != "auto" else ("triton" if fast else "torch")
        elementwise = self.muon_elementwise if self.muon_elementwise != "auto" else ("triton" if fast else "foreach")
        for name, value in (("ns_kernel", kernel), ("muon_elementwise", elementwise)):
            if value == "triton" and not fast:
                raise ValueError(f"OptimConfig.{name}='triton' needs CUDA parameters and Triton installed (device "
                                 f"{device}); use {name}='auto'")
        return dataclasses.replace(self, ns_kernel=kernel, muon_elementwise=elementwise)
