"""Batched and distributed Newton–Schulz over many matrices (spec §3.11, "Distributed notes").

Newton–Schulz costs scale with the *total* matrix parameters, so the work is (1) batched: every matrix
is brought to the wide orientation and all matrices of one shape go through one batched call (the experts
of all layers, the wo_a blocks, same-shape dense matrices); and (2) shared: with a process group, each
rank orthogonalises a contiguous, equal share of every shape bucket and one all-gather returns all results
to every rank (as in Keller Jordan's and Moonlight's distributed Muon). Every rank of the group must pass
the same list of blocks (same shapes, same values): the data-parallel replicas of a gradient.

Also the tensor-parallel helpers: gather a sharded matrix along its partition dim, take the local shard back.
"""

from collections import defaultdict

import torch
import torch.distributed as dist

from train.optim.newton_schulz import hybrid_newton_schulz, resolve_ns_form


def orthogonalize_blocks(
    blocks: list[torch.Tensor],
    *,
    dtype: torch.dtype,
    kernel: str = "torch",
    group: dist.ProcessGroup | None = None,
    graphs: dict | None = None,
    static_inputs: bool = False,
    sum_squares: list[torch.Tensor] | None = None,
    form: str = "standard",
) -> list[torch.Tensor]:
    """Hybrid-NS every matrix of `blocks` (each [batch_i, rows_i, cols_i], identical on all ranks of `group`).

    Returns [batch_i, rows_i, cols_i] tensors in the compute dtype `dtype` (locally: fp16 for the shapes that
    take the Gram form of bf16 work), identical on every rank.
    group=None (or a group of one) does all the work locally.
    graphs: a cache owned by the caller (one per call site) in which, on CUDA, the Newton–Schulz of each
    distinct set of bucket shapes is captured once as a CUDA graph and replayed on later calls. The returned
    tensors then live in the graph's static memory and are overwritten by the next call with the same shapes.
    static_inputs: the blocks are wide, contiguous, in `dtype`, and keep their storage from call to call (the
    fused step's bucket buffers): a CUDA graph then reads them in place instead of from a staging copy.
    sum_squares: per block, fp32 [batch_i, parts] with each matrix's Σ value² in parts (the same number of
    parts for blocks of one shape); Newton–Schulz then skips its normalisation pass (hybrid_newton_schulz).
    form: "standard", "gram" or "auto", resolved per shape bucket (newton_schulz.resolve_ns_form).
    """
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, block in enumerate(blocks):
        rows, cols = block.shape[-2:]
        buckets[(min(rows, cols), max(rows, cols))].append(index)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0

    device = blocks[0].device
    forms = {shape: resolve_ns_form(form, shape, device) for shape in buckets}
    results: list[torch.Tensor | None] = [None] * len(blocks)
    squares = None
    if world == 1:
        jobs = [[_wide(blocks[i]) for i in indices] for indices in buckets.values()]
        if sum_squares is not None:
            squares = [[sum_squares[i] for i in indices] for indices in buckets.values()]
        outputs = _newton_schulz_jobs(jobs, dtype, kernel, graphs, static_inputs, squares, list(forms.values()))
        for indices, out in zip(buckets.values(), outputs):
            _scatter_back(out, indices, blocks, results)
        return results

    # Each bucket's matrices are numbered 0..total-1 in block order; rank r takes [bounds[r], bounds[r+1]).
    plan = []
    payload_numel = [0] * world
    jobs, job_forms = [], []
    squares = [] if sum_squares is not None else None
    for shape, indices in sorted(buckets.items()):
        total = sum(blocks[i].shape[0] for i in indices)
        bounds = [total * r // world for r in range(world + 1)]
        matrix_numel = shape[0] * shape[1]
        offsets = list(payload_numel)
        for r in range(world):
            payload_numel[r] += (bounds[r + 1] - bounds[r]) * matrix_numel
        plan.append((shape, indices, bounds, offsets))
        start, end = bounds[rank], bounds[rank + 1]
        if end > start:
            jobs.append(_matrix_range([_wide(blocks[i]) for i in indices], start, end))
            job_forms.append(forms[shape])
            if squares is not None:
                squares.append(_matrix_range([sum_squares[i] for i in indices], start, end))
    outputs = _newton_schulz_jobs(jobs, dtype, kernel, graphs, static_inputs, squares, job_forms)

    width = max(payload_numel)
    send = torch.zeros(width, dtype=dtype, device=device)
    filled = 0
    for out in outputs:  # the Gram form's fp16 results travel in `dtype` like the others
        send[filled : filled + out.numel()].copy_(out.reshape(-1))
        filled += out.numel()
    gathered = torch.empty(world * width, dtype=dtype, device=device)
    _all_gather_flat(gathered, send, group)

    for shape, indices, bounds, offsets in plan:
        pieces = []
        for r in range(world):
            count = bounds[r + 1] - bounds[r]
            if count:
                begin = r * width + offsets[r]
                pieces.append(gathered[begin : begin + count * shape[0] * shape[1]].view(count, *shape))
        _scatter_back(torch.cat(pieces) if len(pieces) > 1 else pieces[0], indices, blocks, results)
    return results


def _wide(block: torch.Tensor) -> torch.Tensor:
    return block.mT if block.shape[-2] > block.shape[-1] else block


def _matrix_range(stacks: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """The pieces of `stacks` (all [b_i, n, m]) that make up matrices [start, end) of their concatenation."""
    parts, first = [], 0
    for stack in stacks:
        last = first + stack.shape[0]
        lo, hi = max(start, first), min(end, last)
        if hi > lo:
            parts.append(stack[lo - first : hi - first])
        first = last
    return parts


def _stack_into(buffer: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Copy (and cast) the [b_i, ...] pieces one after another into `buffer` [Σb_i, ...]."""
    first = 0
    for piece in pieces:
        buffer[first : first + piece.shape[0]].copy_(piece)
        first += piece.shape[0]
    return buffer


def _newton_schulz_jobs(
    jobs: list[list[torch.Tensor]],
    dtype: torch.dtype,
    kernel: str,
    graphs: dict | None,
    static_inputs: bool = False,
    squares: list[list[torch.Tensor]] | None = None,
    forms: list[str] | None = None,
) -> list[torch.Tensor]:
    """Hybrid NS of each job (a list of same-shape [b_i, n, m] pieces stacked into one batch).

    squares: per job, the fp32 [b_i, parts] sums of squares of its pieces (hybrid_newton_schulz's sum_squares).
    forms: per job, "standard" or "gram" (None: all standard).
    """
    if not jobs:
        return []
    forms = forms or ["standard"] * len(jobs)
    device = jobs[0][0].device
    shapes = [(sum(p.shape[0] for p in job), *job[0].shape[1:]) for job in jobs]
    square_shapes = [(shape[0], *pieces[0].shape[1:]) for shape, pieces in zip(shapes, squares or [])]
    if graphs is None or device.type != "cuda":
        stacks = [_stacked(job, shape, dtype) for shape, job in zip(shapes, jobs)]
        square_stacks = [_stacked(p, s, torch.float32) for s, p in zip(square_shapes, squares or [])]
        return [
            hybrid_newton_schulz(x, dtype=dtype, kernel=kernel, sum_squares=sq, form=f)
            for x, sq, f in zip(stacks, square_stacks or [None] * len(stacks), forms)
        ]

    # CUDA graph: a step launches ~34 kernels per bucket (10 iterations × 3 products + normalisation), which
    # leaves small buckets launch-bound; one replay per step removes that. Shapes are fixed from step to step.
    key = (dtype, kernel, tuple(shapes), tuple(square_shapes), tuple(forms))
    entry = graphs.get(key)
    if entry is None:
        static_in = [_static_input(job, shape, dtype, static_inputs) for shape, job in zip(shapes, jobs)]
        static_sq = [_static_input(p, s, torch.float32, static_inputs) for s, p in zip(square_shapes, squares or [])]
        run = lambda: [  # noqa: E731
            hybrid_newton_schulz(x, dtype=dtype, kernel=kernel, sum_squares=sq, form=f)
            for x, sq, f in zip(static_in, static_sq or [None] * len(static_in), forms)
        ]
        graph, static_out = capture_cuda_graph(run)
        entry = graphs[key] = (graph, static_in + static_sq, static_out)
    else:
        for buffer, pieces in zip(entry[1], jobs + (squares or [])):
            if len(pieces) > 1 or pieces[0].data_ptr() != buffer.data_ptr():
                _stack_into(buffer, pieces)
    entry[0].replay()
    return entry[2]


def capture_cuda_graph(run):
    """(graph, outputs): run() once on a side stream to warm up (cuBLAS workspaces, Triton autotuning), then
    captured; each graph.replay() recomputes the outputs in place from the same input tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


def _stacked(pieces: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if len(pieces) == 1:
        return pieces[0]
    return _stack_into(torch.empty(shape, dtype=dtype, device=pieces[0].device), pieces)


def _static_input(pieces: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, static: bool) -> torch.Tensor:
    """The graph's input for `pieces`: the piece itself when the caller keeps it in place, else a staging copy."""
    if static and len(pieces) == 1 and pieces[0].is_contiguous() and pieces[0].dtype == dtype:
        return pieces[0]
    return _stack_into(torch.empty(shape, dtype=dtype, device=pieces[0].device), pieces)


def _scatter_back(stacked: torch.Tensor, indices: list[int], blocks: list[torch.Tensor], results: list) -> None:
    first = 0
    for i in indices:
        count = blocks[i].shape[0]
        out = stacked[first : first + count]
        results[i] = out.mT if blocks[i].shape[-2] > blocks[i].shape[-1] else out
        first += count


def _all_gather_flat(gathered: torch.Tensor, send: torch.Tensor, group: dist.ProcessGroup) -> None:
    if dist.get_backend(group) == "gloo":
        # gloo has no all_gather_into_tensor; the list form writes straight into views of `gathered`.
        dist.all_gather(list(gathered.chunk(dist.get_world_size(group))), send, group=group)
    else:
        dist.all_gather_into_tensor(gathered, send, group=group)


def gather_tensor_parallel(shard: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Full tensor from the equal, contiguous shards along `dim` held by the ranks of `group` (megatron layout)."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def local_tensor_parallel(full: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's shard of `full` along `dim` (inverse of gather_tensor_parallel)."""
    return full.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
