"""`ParallelConfig`: the layout of one model over the ranks (issue 5: tp, ep, dp, ZeRO engine).

Ranks are laid out as megatron-core's `parallel_state` does with `order="tp-cp-ep-dp-pp"`:
tensor-parallel ranks are adjacent, data parallel spans the rest (dp = world / tp). Experts get
megatron's separate expert grid with expert-tensor-parallel size 1: consecutive groups of `ep`
ranks split the experts, and the ranks holding the same expert shard form the
expert-data-parallel group (world / ep ranks). Each tensor-parallel rank feeds its own 1/tp of
the tokens to the experts, so expert parallelism can span tensor-parallel ranks.

`validate_layout` checks the layout against the world size and the model before any process
group exists, and names the offending field in its error.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "gloo", "nccl")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ParallelConfig:
    """How one model is split over the ranks and how its data-parallel engine runs."""

    tp: int = 1
    """Tensor-parallel size: attention heads, indexer heads, shared expert and vocabulary split."""
    ep: int = 1
    """Expert-parallel size: routed experts split over consecutive groups of `ep` ranks."""
    dp: int = -1
    """Data-parallel size of the dense weights; -1 = world_size / tp."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage of the dense weights (1: optimizer state, 2: + gradients)."""
    backend: str = "auto"
    """torch.distributed backend: "gloo", "nccl" or "auto" (nccl with CUDA, else gloo)."""
    precision: str = "auto"
    """Engine weights and gradients: "fp32", "bf16" or "auto" (bf16 with CUDA, fp32 on CPU)."""

    def dp_size(self, world_size: int) -> int:
        """The data-parallel size for this world size (resolves dp = -1)."""
        return world_size // self.tp if self.dp == -1 else self.dp


def validate_layout(cfg: ParallelConfig, world_size: int, args) -> None:
    """Raise ValueError naming the field when `cfg` does not fit `world_size` or the model.

    args: the model's `ModelArgs` (heads, groups, experts, vocabulary, expert width).
    """
    def fail(msg: str) -> None:
        raise ValueError(f"ParallelConfig: {msg}")

    for name in ("tp", "ep"):
        if getattr(cfg, name) < 1:
            fail(f"parallel.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.dp != -1 and cfg.dp < 1:
        fail(f"parallel.dp={cfg.dp} must be >= 1, or -1 for world_size / tp")
    if cfg.zero_stage not in (1, 2):
        fail(f"parallel.zero_stage={cfg.zero_stage}: use 1 or 2")
    if cfg.backend not in BACKENDS:
        fail(f"parallel.backend={cfg.backend!r}: use one of {BACKENDS}")
    if cfg.precision not in PRECISIONS:
        fail(f"parallel.precision={cfg.precision!r}: use one of {PRECISIONS}")
    if world_size % cfg.tp:
        fail(f"parallel.tp={cfg.tp} must divide the world size {world_size}; "
             "launch a multiple of tp processes")
    if cfg.tp * cfg.dp_size(world_size) != world_size:
        fail(f"parallel.tp={cfg.tp} x parallel.dp={cfg.dp} != world size {world_size}; "
             f"set dp={world_size // cfg.tp} or dp=-1")
    if world_size % cfg.ep:
        fail(f"parallel.ep={cfg.ep} must divide the world size {world_size}")
    checks = (
        ("tp", cfg.tp, "n_heads", args.n_heads),
        ("tp", cfg.tp, "o_groups", args.o_groups),
        ("tp", cfg.tp, "index_n_heads", args.index_n_heads),
        ("tp", cfg.tp, "vocab_size", args.vocab_size),
        ("tp", cfg.tp, "moe_inter_dim", args.moe_inter_dim),
        ("ep", cfg.ep, "n_routed_experts", args.n_routed_experts),
    )
    for field_name, size, model_field, value in checks:
        if value % size:
            fail(f"parallel.{field_name}={size} must divide model {model_field}={value}; "
                 f"choose a {field_name} that divides it")
