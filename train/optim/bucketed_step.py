"""The fused Muon step over shape buckets (spec §3.11; OptimConfig.muon_elementwise="triton").

Same math as Muon's foreach path (train.optim.muon module docstring), arranged so that every Muon value is
read and written as few times as possible:

1. one Triton pass per bucket and orientation updates the momentum and writes the look-ahead, cast to the
   Newton–Schulz dtype and brought to the wide orientation, into the bucket's persistent stacked buffer
   (and, with OptimConfig.fold_ns_normalization, per-tile sums of squares into `Bucket.sum_squares`);
2. Newton–Schulz runs on those buffers (train.optim.orthogonalize, shared over the process group as usual;
   with CUDA graphs the buffers are the graph's inputs, so there is no staging copy); with the sums of
   squares it skips its normalisation pass (train.optim.newton_schulz);
3. one Triton pass per bucket and orientation applies W ← W·(1 − η·λ) − η·s·O from the bucket's output —
   with OptimConfig.overlap_muon_update on a side stream, under the Newton–Schulz of the next bucket
   (buckets run largest first, so the pass left exposed at the end is the smallest).

A bucket is every matrix of one wide shape [n, m] whose Newton–Schulz is shared over the same process group
(dense matrices over dp_group, routed experts over expert_dp_group). Plans are cached per parameter set.
Only plain parameters qualify (no tensor-parallel shards, no ZeRO partitions): CUDA, contiguous, gradients,
momentum and parameters of one dtype. Anything else takes the foreach path (`unsupported_reason`).
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train.optim.grouping import MuonTensor

TILE = 64
"""Side of the square tiles of the elementwise passes (64×64 fp32 keeps the transposed stores of tall
matrices coalesced through shared memory); also the granularity of the partial sums of squares."""


def tiles_per_matrix(shape: tuple[int, int]) -> int:
    return math.ceil(shape[0] / TILE) * math.ceil(shape[1] / TILE)


@dataclass
class Bucket:
    """Matrices of one wide shape sharing one process group, stacked in `buffer` [count, n, m]."""

    group: dist.ProcessGroup | None
    shape: tuple[int, int]
    buffer: torch.Tensor
    sum_squares: torch.Tensor
    """fp32 [count, tiles_per_matrix]: per-tile Σ look-ahead² written by the look-ahead pass (when folded)."""
    launches: list[dict] = field(default_factory=list)
    """One per source orientation: GPU tables tensor/offset/slot, count, source_shape, transposed."""

    def update_scale(self, update_rms: float) -> float:
        return math.sqrt(max(self.shape)) * update_rms


def unsupported_reason(params: list[torch.nn.Parameter], momenta: list[torch.Tensor]) -> str | None:
    """Why the fused step cannot take these parameters and momentum buffers (None: it can)."""
    dtype = params[0].dtype
    for p, m in zip(params, momenta):
        if not p.is_cuda:
            return "parameters are not on CUDA"
        if getattr(p, "tensor_model_parallel", False):
            return "tensor-parallel parameters need the full-matrix gather of the foreach path"
        if not p.dtype == p.grad.dtype == m.dtype == dtype:
            return "parameters, gradients and momenta of mixed dtypes"
        if not (p.is_contiguous() and p.grad.is_contiguous() and m.is_contiguous()):
            return "non-contiguous parameters, gradients or momenta"
    return None


def build_buckets(
    metas: list[MuonTensor], groups: list[dist.ProcessGroup | None], ns_dtype: torch.dtype
) -> list[Bucket]:
    """Buckets for the Muon tensors `metas` (with gradients), `groups[i]` sharing the NS work of metas[i]."""
    device = metas[0].param.device
    members: dict[tuple[int, tuple[int, int]], list[tuple[int, int, int, int]]] = defaultdict(list)
    group_of: dict[int, dist.ProcessGroup | None] = {}
    for index, (meta, group) in enumerate(zip(metas, groups)):
        blocks, rows, cols = meta.as_blocks(meta.param.detach()).shape
        key = (id(group), (min(rows, cols), max(rows, cols)))
        group_of[id(group)] = group
        members[key].append((index, blocks, rows, cols))
    buckets = []
    for (group_id, shape), entries in members.items():
        total = sum(blocks for _, blocks, _, _ in entries)
        bucket = Bucket(
            group_of[group_id], shape,
            buffer=torch.empty((total, *shape), dtype=ns_dtype, device=device),
            sum_squares=torch.empty((total, tiles_per_matrix(shape)), dtype=torch.float32, device=device),
        )
        by_orientation: dict[bool, list[tuple[int, int, int]]] = defaultdict(list)
        slot = 0
        for index, blocks, rows, cols in entries:
            for block in range(blocks):
                by_orientation[rows > cols].append((index, block * rows * cols, slot))
                slot += 1
        for transposed, matrices in sorted(by_orientation.items()):
            tensor, offset, slots = zip(*matrices)
            bucket.launches.append(dict(
                tensor=torch.tensor(tensor, dtype=torch.int32, device=device),
                offset=torch.tensor(offset, dtype=torch.int64, device=device),
                slot=torch.tensor(slots, dtype=torch.int32, device=device),
                count=len(matrices),
                source_shape=(shape[1], shape[0]) if transposed else shape,
                transposed=transposed,
            ))
        buckets.append(bucket)
    # Largest first: with overlap_muon_update each bucket's update pass hides under the next bucket's NS.
    buckets.sort(key=lambda b: b.buffer.numel(), reverse=True)
    return buckets


def address_table(params: list[torch.nn.Parameter], momenta: list[torch.Tensor]) -> torch.Tensor:
    """int64 [tensors, 3] of (gradient, momentum, parameter) addresses on the parameters' GPU.

    Rebuilt every step: backward allocates new gradients and load_state_dict new momentum buffers.
    """
    rows = [[p.grad.data_ptr(), m.data_ptr(), p.data_ptr()] for p, m in zip(params, momenta)]
    return torch.tensor(rows, dtype=torch.int64).pin_memory().to(params[0].device, non_blocking=True)
