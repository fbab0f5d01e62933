"""TileLang kernels of the fused distillation loss (spec opd-and-fused-loss §6, §7).

Gradient-in-forward with 4 head-sized GEMMs (spec §6 table), processed per chunk of R token rows:

1. `logits_partials_kernel` (TileLang, persistent: one CTA per SM walks the 128×128 tiles of the
   chunk's [R, V] logits): one warpgroup loads (TMA), one accumulates the student tile `H_s·W_sᵀ`
   and one the teacher tile `H_t·W_tᵀ` in registers (WGMMA), each over its own hidden width, so
   one head's epilogue runs under the other head's MMAs (ping-pong). Each epilogue reduces its
   fp32 accumulators to the tempered per-tile partials of `ref.PARTIAL_CHANNELS` (the cross sum
   only for the kind that needs it) and writes the tile's logits *relative to their tile max* as
   fp16 ([R, V] workspace): near the max fp16 keeps 11 bits where raw bf16 logits keep 8, so the
   gradient sees logits 8× more precise than a bf16 logits tensor would give.
2. `combine_partials_kernel` (TileLang) merges the partials with the flash-decoding combine (the
   twin of `ref.merge_vocab_partials`) into per-row log-sum-exps, KL and entropy. For JSD,
   `jsd_partials_kernel` adds the pass that needs both normalised distributions.
3. `logit_grad_kernel` (TileLang, elementwise) turns the chunk's workspace into d loss / d logits
   in bf16, in place, before the next chunk's logits kernel reuses the teacher workspace.
4. cuBLAS (torch.mm) does `dH = G·W_s` and `dW_s += Gᵀ·H_s` once per group of
   `chunks_per_gemm` chunks: plain GEMMs that cuBLAS runs near the matrix-unit ceiling, and closer
   to it the more rows they cover (3072 rather than 2048 rows: 5-9 % less time per row);
   dW_s accumulates across groups in the head's dtype (one rounding per group, as Liger's default
   does per chunk). dW_s runs on a second stream beside dH (`concurrent_gemms`).
5. In the backward, `scale_unless_one_kernel` applies the upstream gradient to the stored
   gradients on the device (nothing to do when it is 1), so neither pass syncs the host.

The workspace is one fp16 [gemm rows + R, V] buffer: the student logits of each chunk of the
group, each overwritten in place by its bf16 gradient, then the current chunk's teacher logits.
Its size comes from a byte budget, so peak memory does not grow with V (spec §11 case 3) apart
from the [V, Ds] head gradient itself.

Shape legend: R rows of a chunk, V vocabulary (Vp: V rounded up to 8 for 16-byte TMA strides),
Ds / Dt hidden widths, P vocabulary tiles of the kernels.
"""

import contextlib
import functools
import math
from dataclasses import dataclass

import tilelang
import tilelang.language as T
import torch

from .ref import N_PARTIALS, PARTIAL_CHANNELS, DistillKLResult, resolve_kind, teacher_row_groups

LOG2E = 1.4426950408889634  # exp(x) = exp2(x·log2 e)
LN2 = 0.6931471805599453
# Logits minus the tile max are stored as fp16; clamping keeps them finite (exp underflows to 0
# long before -6e4 anyway), so no 0·inf appears downstream.
FP16_FLOOR = -60000.0
# Logit given to the columns past V of the last tile: finite, so 0·(z − m) stays 0, and far below
# any real logit, so exp underflows to 0 (even times a large 1/τ, where it reaches -inf).
PAD_LOGIT = -1e30
PASS_CONFIGS = {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True}
# The logits kernel writes its roles, barriers and register split by hand: TileLang's automatic
# warp specialisation, its sync insertion (it does not see the mbarrier protocol) and its reuse of
# shared memory (the ring stays live during the epilogues) are off.
LOGITS_PASS_CONFIGS = PASS_CONFIGS | {
    tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True,
    tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True,
    tilelang.PassConfigKey.TL_DISABLE_SHARED_MEMORY_REUSE: True,
}
# Channel indices of the partials' `ref.PARTIAL_CHANNELS` dimension, by name.
STUDENT_MAX, STUDENT_SUMEXP, STUDENT_CENTERED, REVERSE_CROSS, TEACHER_MAX, TEACHER_SUMEXP, FORWARD_CROSS = (
    PARTIAL_CHANNELS.index(name)
    for name in ("student_max", "student_sumexp", "student_centered", "reverse_cross", "teacher_max", "teacher_sumexp", "forward_cross")
)
# The one cross-sum channel of the partials each kind's loss needs; JSD sums its own terms.
CROSS_CHANNEL = {"reverse": REVERSE_CROSS, "forward": FORWARD_CROSS, "jsd": None}


def padded_vocab(vocab: int) -> int:
    """Vp: V rounded up to 8, the row length of the fp16 workspace (TMA needs 16-byte row strides)."""
    return -(-vocab // 8) * 8


@dataclass(frozen=True)
class DistillKLKernelConfig:
    """Tiling and memory budget of the TileLang path."""

    block_m: int = 128
    """token rows of a logits tile (one warpgroup per head: two m64 WGMMAs per k16 step)"""
    block_v: int = 128
    """vocabulary rows of a logits tile; the partials and the fp16 workspace are per block_v tile"""
    block_k: int = 64
    """hidden-dimension step of the TMA/WGMMA pipeline"""
    num_stages: int = 5
    """depth of the logits kernel's ring of one-head stages (block_m×block_k hidden + block_v×block_k
    head, 32 KiB at the defaults); 5 fill the shared memory beside the two fp16 staging tiles.
    4 stages ran 3.5 % slower (bench/NOTES.md)"""
    persistent_ctas: int = 0
    """CTAs of the persistent logits kernel; 0: one per SM of the device"""
    threads: int = 256
    """threads per CTA of the elementwise kernels (gradient, JSD partials)"""
    elementwise_block_m: int = 64
    """token rows per CTA of the gradient and JSD kernels"""
    combine_block_r: int = 8
    """token rows per CTA of the combine kernel: 8 gives 128 CTAs for a 1024-row chunk, where 32
    rows gave 32 CTAs (a quarter of the SMs) for a pass that only streams the partials"""
    combine_group: int = 64
    """vocabulary tiles the combine kernel reads per step (8 rows × 64 tiles: 18.8 µs per 1024-row
    chunk, against 30.8 µs for 32 × 32)"""
    workspace_bytes: int = 1 << 30
    """budget for the fp16 [rows, V] workspace; sets the chunk size (a multiple of block_m)"""
    chunks_per_gemm: int = 3
    """logits chunks whose bf16 gradients share one dH and one dW_s GEMM. The workspace holds
    their gradients plus one chunk's teacher logits, so a chunk gets 1/(chunks_per_gemm + 1) of
    it: 3 gives 1024-row chunks and 3072-row GEMMs at V = 129,280 (1 gives 2048 and 2048)"""
    concurrent_gemms: bool = True
    """queue dW_s on a second stream beside dH, so that each GEMM's last partial wave of tiles
    overlaps the other's work: −0.12 to −0.22 ms per GEMM group on the H200 while it has power
    headroom, nothing once it sits at its 700 W cap; bitwise-equal results (bench/NOTES.md)"""


@tilelang.jit(pass_configs=LOGITS_PASS_CONFIGS)
def logits_partials_kernel(
    block_m: int,
    block_v: int,
    block_k: int,
    num_stages: int,
    kind: str,
    num_ctas: int = 132,
):
    """Builds the persistent head-split ping-pong logits + partials kernel for one divergence `kind`.

    Warpgroup 0 loads, warpgroup 1 owns the student's whole block_m×block_v tile and warpgroup 2
    the teacher's: two m64 WGMMAs per k16 step from one-head ring stages, so each MMA flop loads
    the bytes the two-head tile loaded, while one warpgroup's epilogue runs under the other's MMAs.
    The producer loads each tile's `lead` head first, then the other; the lead leaves its fp16
    relative tile and its row max in shared memory, and the other head's epilogue takes the kind's
    cross sum from them: Σ e_s (z_s − z_t) for "reverse" (the student leads), Σ e_t (z_t − z_s) for
    "forward" (the teacher leads). The lead is the head whose exp weights the sum, so its fp16
    values sit near 0 where the weight is large. "jsd" sums no cross term. `num_ctas` is the
    persistent grid (the SM count); every tile's arithmetic is the same for any value.
    """
    if kind not in CROSS_CHANNEL:
        raise ValueError(f"logits_partials_kernel: kind={kind!r} is not one of {tuple(CROSS_CHANNEL)}")
    rows, vocab, vocab_pad, d_s, d_t = T.dynamic("rows, vocab, vocab_pad, d_s, d_t")
    n_tiles = T.ceildiv(vocab, block_v)
    n_row_blocks = T.ceildiv(rows, block_m)
    bf16, f16, f32 = T.bfloat16, T.float16, T.float32
    student_leads = kind != "forward"
    exchange = kind != "jsd"
    cross_channel = CROSS_CHANNEL[kind]

    def tile_of(cta, n):
        """(row block, vocabulary tile) of the CTA's n-th tile; row blocks vary fastest, so the CTAs
        in flight share a few head tiles through L2 and each head row is read from HBM once per chunk."""
        t = cta + n * num_ctas
        return t % n_row_blocks, t // n_row_blocks

    @T.macro
    def load_head(hidden, head, hidden_ring, head_ring, full, empty, go, bm, bv, first, k_steps):
        for k in T.serial(k_steps):
            it = first + k
            s = it % num_stages
            T.barrier_wait(empty[s], ((it // num_stages) % 2) ^ 1)
            if k == 0:  # the slot is free: this head's consumer may now wait on the ring (`mma_head`)
                if T.get_thread_binding(0) == 0:
                    T.barrier_arrive(go[0])
            T.tma_copy(hidden[bm * block_m : (bm + 1) * block_m, k * block_k : (k + 1) * block_k], hidden_ring[s, :, :], barrier=full[s])
            T.tma_copy(head[bv * block_v : (bv + 1) * block_v, k * block_k : (k + 1) * block_k], head_ring[s, :, :], barrier=full[s])
            if T.get_thread_binding(0) == 0:  # the thread that set the expected bytes
                T.barrier_arrive(full[s])

    @T.macro
    def mma_head(hidden_ring, head_ring, full, empty, go, z, n, first, k_steps):
        # A parity wait tells only two phases of a slot apart: a consumer that reached its next
        # head a whole head ahead of the producer would pass on an old phase, so it first waits
        # until the producer is at that head.
        T.barrier_wait(go[0], n % 2)
        for k in T.serial(k_steps):
            it = first + k
            s = it % num_stages
            T.barrier_wait(full[s], (it // num_stages) % 2)
            # Accumulators zeroed by the first MMA (a T.clear before the loop made ptxas serialise
            # every WGMMA, C7515); one K step stays in flight, the one before it frees its slot.
            T.wgmma_gemm(hidden_ring[s, :, :], head_ring[s, :, :], z, transpose_B=True, policy=T.GemmWarpPolicy.FullRow, clear_accum=k == 0)
            T.wait_wgmma(1)
            if k > 0:
                T.barrier_arrive(empty[(it - 1) % num_stages])
        T.wait_wgmma(0)
        T.barrier_arrive(empty[(first + k_steps - 1) % num_stages])

    @T.macro
    def head_epilogue(z, work, row_max, row_sum, centered, cross, own_tile, other_tile, rel_out, lead_row_max, xchg_full, xchg_empty, inv_tau, n, bm, bv, named_barrier, is_student, is_lead):
        """One head's tile: the fp16 relative tile (`own_tile`, stored by TMA) and the partials.

        With a cross sum, the lead also leaves its row max and the low part of its relative logits
        (rel − fp16(rel), in fp16, in the other head's staging tile) in shared memory: their sum
        carries 22 bits, so the other head's cross sum weighs with the lead's own exp values, not
        ones 2^-11·|rel| off (which made per-token errors 8× those of fp32 partials)."""
        # The accumulators stay untempered: τ > 0 commutes with the max, and every sum below is
        # linear in z, so 1/τ is applied per row at the end and folded into one FFMA per element
        # (exp2(z·c − m·c), as flash attention does). Columns past V (only in the ragged last
        # tile) become a huge finite negative logit: exp gives 0, and so does every product with it.
        if bv == n_tiles - 1:
            for i, j in T.Parallel(block_m, block_v):
                z[i, j] = T.if_then_else(bv * block_v + j < vocab, z[i, j], PAD_LOGIT)
        T.reduce_max(z, row_max, dim=1)
        exp_scale = inv_tau * LOG2E
        if exchange and not is_lead:
            # Σ e_lead (z_lead − z), z_lead = rel_lead·τ + m_lead: "reverse" A·τ = Σ e_s (z_s − z_t),
            # "forward" −(its B)·τ = Σ e_t (z_t − z_s). The low parts sit in this head's staging tile.
            T.barrier_wait(xchg_full[0], n % 2)
            for i, j in T.Parallel(block_m, block_v):
                rel = T.cast(other_tile[i, j], f32) + T.cast(own_tile[i, j], f32)
                work[i, j] = T.exp2(rel * LOG2E) * (rel / inv_tau + (lead_row_max[i] - z[i, j]))
            T.reduce_sum(work, cross, dim=1)
            T.sync_threads(named_barrier, 128)  # every thread has read the low parts
        elif n > 0:  # the previous tile's store has read the staging tile
            T.tma_store_wait()
            T.sync_threads(named_barrier, 128)
            if exchange:  # and the other head has read the low parts and its staging tile is free
                T.barrier_wait(xchg_empty[0], (n - 1) % 2)
        # The fp16 relative tile first: its TMA store reads shared memory while the sums run.
        for i, j in T.Parallel(block_m, block_v):
            rel = T.max(z[i, j] * inv_tau - row_max[i] * inv_tau, FP16_FLOOR)
            own_tile[i, j] = rel
            if exchange and is_lead:
                other_tile[i, j] = T.max(rel - T.cast(T.cast(rel, f16), f32), FP16_FLOOR)
        if exchange and is_lead:
            T.copy(row_max, lead_row_max)
        T.fence_proxy_async()
        T.sync_threads(named_barrier, 128)
        T.tma_copy(own_tile, rel_out[bm * block_m : (bm + 1) * block_m, bv * block_v : (bv + 1) * block_v])
        if exchange and is_lead:
            T.barrier_arrive(xchg_full[0])

        for i, j in T.Parallel(block_m, block_v):
            work[i, j] = T.exp2(z[i, j] * exp_scale - row_max[i] * exp_scale)
        T.reduce_sum(work, row_sum, dim=1)
        if is_student:  # E·τ = Σ e_s (z_s − m_s)
            for i, j in T.Parallel(block_m, block_v):
                work[i, j] = work[i, j] * (z[i, j] - row_max[i])
            T.reduce_sum(work, centered, dim=1)
        if exchange and not is_lead:  # the store has read this staging tile: the lead may refill both
            T.tma_store_wait()
            T.barrier_arrive(xchg_empty[0])
        for i in T.Parallel(block_m):  # temper the per-row results
            row_max[i] = row_max[i] * inv_tau
            if is_student:
                centered[i] = centered[i] * inv_tau
            if exchange and not is_lead:
                cross[i] = cross[i] * inv_tau

    def first_step(n, k_s, k_t, student: bool):
        """Ring position of tile n's first K step of one head: the lead head's steps come first."""
        return n * (k_s + k_t) + (0 if student == student_leads else (k_t if student else k_s))

    @T.macro
    def consume_head(is_student, z, work, row_max, row_sum, centered, cross, own_tile, other_tile, rel_out, go, hidden_ring, head_ring, full, empty, lead_row_max, xchg_full, xchg_empty, partials, inv_tau, cta, my_tiles, k_s, k_t):
        """One consumer warpgroup: its head's K loop and epilogue for each of the CTA's tiles."""
        is_lead = is_student == student_leads
        T.set_max_nreg(240, 1)
        bm = T.alloc_var(T.int32)
        bv = T.alloc_var(T.int32)
        for n in T.serial(my_tiles):
            bm, bv = tile_of(cta, n)
            mma_head(hidden_ring, head_ring, full, empty, go, z, n, first_step(n, k_s, k_t, is_student), k_s if is_student else k_t)
            head_epilogue(z, work, row_max, row_sum, centered, cross, own_tile, other_tile, rel_out, lead_row_max, xchg_full, xchg_empty, inv_tau, n, bm, bv, 1 if is_student else 2, is_student, is_lead)
            T.copy(row_max, partials[bv, STUDENT_MAX if is_student else TEACHER_MAX, bm * block_m])
            T.copy(row_sum, partials[bv, STUDENT_SUMEXP if is_student else TEACHER_SUMEXP, bm * block_m])
            if is_student:
                T.copy(centered, partials[bv, STUDENT_CENTERED, bm * block_m])
            if exchange and not is_lead:
                T.copy(cross, partials[bv, cross_channel, bm * block_m])
        T.tma_store_wait()

    @T.prim_func
    def logits_partials(
        student_hidden: T.Tensor((rows, d_s), bf16),
        student_head: T.Tensor((vocab, d_s), bf16),
        teacher_hidden: T.Tensor((rows, d_t), bf16),
        teacher_head: T.Tensor((vocab, d_t), bf16),
        inv_tau: f32,
        student_rel: T.Tensor((rows, vocab_pad), f16),
        teacher_rel: T.Tensor((rows, vocab_pad), f16),
        partials: T.Tensor((n_tiles, N_PARTIALS, rows), f32),
    ):
        with T.Kernel(num_ctas, threads=384) as cta:
            hidden_ring = T.alloc_shared((num_stages, block_m, block_k), bf16)
            head_ring = T.alloc_shared((num_stages, block_v, block_k), bf16)
            student_tile = T.alloc_shared((block_m, block_v), f16)
            teacher_tile = T.alloc_shared((block_m, block_v), f16)
            lead_row_max = T.alloc_shared((block_m,), f32)
            full = T.alloc_barrier([1] * num_stages)  # one arrival + the TMA bytes
            empty = T.alloc_barrier([128] * num_stages)  # every thread of the consuming warpgroup
            student_go = T.alloc_barrier([1])
            teacher_go = T.alloc_barrier([1])
            xchg_full = T.alloc_barrier([128])  # the lead's tile and row max are in shared memory
            xchg_empty = T.alloc_barrier([128])  # the other head has read them

            zs = T.alloc_fragment((block_m, block_v), f32)
            zt = T.alloc_fragment((block_m, block_v), f32)
            work_s = T.alloc_fragment((block_m, block_v), f32)
            work_t = T.alloc_fragment((block_m, block_v), f32)
            max_s = T.alloc_fragment((block_m,), f32)
            sum_s = T.alloc_fragment((block_m,), f32)
            centered_s = T.alloc_fragment((block_m,), f32)
            cross_s = T.alloc_fragment((block_m,), f32)
            max_t = T.alloc_fragment((block_m,), f32)
            sum_t = T.alloc_fragment((block_m,), f32)
            cross_t = T.alloc_fragment((block_m,), f32)

            k_s = T.ceildiv(d_s, block_k)
            k_t = T.ceildiv(d_t, block_k)
            my_tiles = T.ceildiv(T.max(n_row_blocks * n_tiles - cta, 0), num_ctas)

            # Roles as if / else (one `T.ws` each would be separate ifs: 5.5 % slower, bench/NOTES.md).
            if T.get_thread_binding(0) < 128:
                with T.ws(0):
                    T.set_max_nreg(24, 0)
                    pbm = T.alloc_var(T.int32)
                    pbv = T.alloc_var(T.int32)
                    for n in T.serial(my_tiles):
                        pbm, pbv = tile_of(cta, n)
                        if student_leads:
                            load_head(student_hidden, student_head, hidden_ring, head_ring, full, empty, student_go, pbm, pbv, first_step(n, k_s, k_t, True), k_s)
                            load_head(teacher_hidden, teacher_head, hidden_ring, head_ring, full, empty, teacher_go, pbm, pbv, first_step(n, k_s, k_t, False), k_t)
                        else:
                            load_head(teacher_hidden, teacher_head, hidden_ring, head_ring, full, empty, teacher_go, pbm, pbv, first_step(n, k_s, k_t, False), k_t)
                            load_head(student_hidden, student_head, hidden_ring, head_ring, full, empty, student_go, pbm, pbv, first_step(n, k_s, k_t, True), k_s)
            else:
                if T.get_thread_binding(0) < 256:
                    with T.ws(1):
                        consume_head(True, zs, work_s, max_s, sum_s, centered_s, cross_s, student_tile, teacher_tile, student_rel, student_go, hidden_ring, head_ring, full, empty, lead_row_max, xchg_full, xchg_empty, partials, inv_tau, cta, my_tiles, k_s, k_t)
                else:
                    with T.ws(2):
                        consume_head(False, zt, work_t, max_t, sum_t, None, cross_t, teacher_tile, student_tile, teacher_rel, teacher_go, hidden_ring, head_ring, full, empty, lead_row_max, xchg_full, xchg_empty, partials, inv_tau, cta, my_tiles, k_s, k_t)

    return logits_partials


# Rows of the [N_ROW_STATS, R] output of `combine_partials_kernel`: "kl" is the kind's KL,
# KL(p‖q) for "reverse" and KL(q‖p) for "forward"; unwritten for "jsd" (its terms have a pass of their own).
ROW_STATS = ("student_lse", "teacher_lse", "kl", "student_entropy")
N_ROW_STATS = len(ROW_STATS)
STUDENT_LSE, TEACHER_LSE, KIND_KL, STUDENT_ENTROPY = range(N_ROW_STATS)


@tilelang.jit(pass_configs=PASS_CONFIGS)
def combine_partials_kernel(kind: str, vocab: int, block_v: int, block_r: int = 32, group: int = 32, threads: int = 256):
    """Builds the flash-decoding combine of the per-tile partials into per-row statistics.

    The TileLang twin of `ref.merge_vocab_partials` (same formulas, fixed summation order, so it is
    deterministic), for the channels `logits_partials_kernel` of the same `kind` writes: a first
    pass over the tiles takes the row maxima, a second rescales and sums. Each CTA owns `block_r`
    rows and walks the tiles `group` at a time; partial maxima and sums stay elementwise in
    registers until one cross-thread reduction at the end of each pass.
    """
    if kind not in CROSS_CHANNEL:
        raise ValueError(f"combine_partials_kernel: kind={kind!r} is not one of {tuple(CROSS_CHANNEL)}")
    cross_channel = CROSS_CHANNEL[kind]
    rows = T.dynamic("rows")
    n_tiles = -(-vocab // block_v)
    n_groups = -(-n_tiles // group)
    f32 = T.float32

    @T.prim_func
    def combine_partials(
        partials: T.Tensor((n_tiles, N_PARTIALS, rows), f32),
        row_stats: T.Tensor((N_ROW_STATS, rows), f32),
    ):
        with T.Kernel(T.ceildiv(rows, block_r), threads=threads) as br:
            r0 = br * block_r
            ms = T.alloc_fragment((group, block_r), f32)
            mt = T.alloc_fragment((group, block_r), f32)
            ss = T.alloc_fragment((group, block_r), f32)
            es = T.alloc_fragment((group, block_r), f32)
            st = T.alloc_fragment((group, block_r), f32)
            cross = T.alloc_fragment((group, block_r), f32)
            acc_ss = T.alloc_fragment((group, block_r), f32)
            acc_es = T.alloc_fragment((group, block_r), f32)
            acc_st = T.alloc_fragment((group, block_r), f32)
            acc_cross = T.alloc_fragment((group, block_r), f32)
            row_ms = T.alloc_fragment((block_r,), f32)
            row_mt = T.alloc_fragment((block_r,), f32)
            sum_ss = T.alloc_fragment((block_r,), f32)
            sum_es = T.alloc_fragment((block_r,), f32)
            sum_st = T.alloc_fragment((block_r,), f32)
            sum_cross = T.alloc_fragment((block_r,), f32)
            lse_s = T.alloc_fragment((block_r,), f32)
            lse_t = T.alloc_fragment((block_r,), f32)
            out = T.alloc_fragment((block_r,), f32)

            # Pass 1: elementwise running maxima over the groups, one cross-thread reduce at the end.
            T.fill(acc_ss, -T.infinity(f32))
            T.fill(acc_st, -T.infinity(f32))
            for grp in T.serial(n_groups):
                T.copy(partials[grp * group : (grp + 1) * group, STUDENT_MAX, r0 : r0 + block_r], ms)
                T.copy(partials[grp * group : (grp + 1) * group, TEACHER_MAX, r0 : r0 + block_r], mt)
                for k, i in T.Parallel(group, block_r):  # tiles past the last one are padding
                    acc_ss[k, i] = T.if_then_else(grp * group + k < n_tiles, T.max(acc_ss[k, i], ms[k, i]), acc_ss[k, i])
                    acc_st[k, i] = T.if_then_else(grp * group + k < n_tiles, T.max(acc_st[k, i], mt[k, i]), acc_st[k, i])
            T.reduce_max(acc_ss, row_ms, dim=0)
            T.reduce_max(acc_st, row_mt, dim=0)

            T.clear(acc_ss)
            T.clear(acc_es)
            T.clear(acc_st)
            if kind != "jsd":
                T.clear(acc_cross)
            for grp in T.serial(n_groups):
                T.copy(partials[grp * group : (grp + 1) * group, STUDENT_MAX, r0 : r0 + block_r], ms)
                T.copy(partials[grp * group : (grp + 1) * group, STUDENT_SUMEXP, r0 : r0 + block_r], ss)
                T.copy(partials[grp * group : (grp + 1) * group, STUDENT_CENTERED, r0 : r0 + block_r], es)
                T.copy(partials[grp * group : (grp + 1) * group, TEACHER_MAX, r0 : r0 + block_r], mt)
                T.copy(partials[grp * group : (grp + 1) * group, TEACHER_SUMEXP, r0 : r0 + block_r], st)
                if kind != "jsd":
                    T.copy(partials[grp * group : (grp + 1) * group, cross_channel, r0 : r0 + block_r], cross)
                for k, i in T.Parallel(group, block_r):
                    valid = grp * group + k < n_tiles
                    ws = T.if_then_else(valid, T.exp2((ms[k, i] - row_ms[i]) * LOG2E), 0.0)
                    wt = T.if_then_else(valid, T.exp2((mt[k, i] - row_mt[i]) * LOG2E), 0.0)
                    acc_ss[k, i] += ws * ss[k, i]
                    acc_es[k, i] += ws * (es[k, i] + (ms[k, i] - row_ms[i]) * ss[k, i])
                    acc_st[k, i] += wt * st[k, i]
                    if kind == "reverse":
                        acc_cross[k, i] += ws * cross[k, i]
                    elif kind == "forward":
                        acc_cross[k, i] += wt * cross[k, i]
            T.reduce_sum(acc_ss, sum_ss, dim=0)
            T.reduce_sum(acc_es, sum_es, dim=0)
            T.reduce_sum(acc_st, sum_st, dim=0)
            if kind != "jsd":
                T.reduce_sum(acc_cross, sum_cross, dim=0)

            # lse = m + log S; KL(p‖q) = A/S_s − lse_s + lse_t; KL(q‖p) = B/S_t − lse_t + lse_s;
            # H(p) = log S_s − E/S_s (ref.merge_vocab_partials).
            for i in T.Parallel(block_r):
                lse_s[i] = row_ms[i] + T.log2(sum_ss[i]) * LN2
                lse_t[i] = row_mt[i] + T.log2(sum_st[i]) * LN2
            T.copy(lse_s, row_stats[STUDENT_LSE, r0])
            T.copy(lse_t, row_stats[TEACHER_LSE, r0])
            if kind != "jsd":
                for i in T.Parallel(block_r):
                    if kind == "reverse":
                        out[i] = sum_cross[i] / sum_ss[i] - lse_s[i] + lse_t[i]
                    else:
                        out[i] = sum_cross[i] / sum_st[i] - lse_t[i] + lse_s[i]
                T.copy(out, row_stats[KIND_KL, r0])
            for i in T.Parallel(block_r):
                out[i] = T.log2(sum_ss[i]) * LN2 - sum_es[i] / sum_ss[i]
            T.copy(out, row_stats[STUDENT_ENTROPY, r0])

    return combine_partials


def _log_mixture(student_logp, teacher_logp, log_1m_beta: float, log_beta: float):
    """log((1−β)p + βq) from log p and log q, stably (a logaddexp)."""
    a = student_logp + log_1m_beta
    b = teacher_logp + log_beta
    hi = T.max(a, b)
    return hi + T.log2(1.0 + T.exp2((T.min(a, b) - hi) * LOG2E)) * LN2


def alloc_log_prob_tile(block_m: int, block_v: int):
    """Fragments (rel_s, rel_t, tile_ms, tile_mt, lse_s, lse_t) of one [block_m, block_v] workspace
    tile, filled by `load_log_prob_tile`: log p = rel_s + (tile_ms − lse_s), log q = rel_t + (tile_mt − lse_t)."""
    tiles = [T.alloc_fragment((block_m, block_v), T.float16) for _ in range(2)]
    return (*tiles, *[T.alloc_fragment((block_m,), T.float32) for _ in range(4)])


@T.macro
def load_log_prob_tile(rel_s, rel_t, tile_ms, tile_mt, lse_s, lse_t, student_rel, teacher_rel, partials, row_stats, bm, bv):
    """Fills `alloc_log_prob_tile`'s fragments for the tile (bm, bv) of the workspace."""
    row0, col0 = bm * rel_s.shape[0], bv * rel_s.shape[1]
    T.copy(student_rel[row0, col0], rel_s)
    T.copy(teacher_rel[row0, col0], rel_t)
    T.copy(partials[bv, STUDENT_MAX, row0], tile_ms)
    T.copy(partials[bv, TEACHER_MAX, row0], tile_mt)
    T.copy(row_stats[STUDENT_LSE, row0], lse_s)
    T.copy(row_stats[TEACHER_LSE, row0], lse_t)


def logit_grad_tile_macro(kind: str, beta: float, block_m: int, block_v: int):
    """The gradient of one [block_m, block_v] workspace tile into the bf16 fragment `g` (`logit_grad_kernel`).

    log p = rel_s + (tile max − row LSE), from the partials and the row statistics; `row_term` is
    KL(p‖q) (reverse) or KL(p‖m) (jsd); `scale` (> 0) folds the reduction weight and 1/τ.
    """
    f32, bf16 = T.float32, T.bfloat16
    log_1m_beta = math.log1p(-beta) if kind == "jsd" else 0.0
    log_beta = math.log(beta) if kind == "jsd" else 0.0

    @T.macro
    def logit_grad_tile(student_rel, teacher_rel, partials, row_stats, row_term, scale, g, bm, bv):
        tile = alloc_log_prob_tile(block_m, block_v)
        load_log_prob_tile(*tile, student_rel, teacher_rel, partials, row_stats, bm, bv)
        rel_s, rel_t, tile_ms, tile_mt, lse_s, lse_t = tile
        if kind != "forward":  # the forward gradient p − q has no per-row term
            term = T.alloc_fragment((block_m,), f32)
            T.copy(row_term[bm * block_m], term)
        if kind == "jsd":
            for i, j in T.Parallel(block_m, block_v):
                logp = T.cast(rel_s[i, j], f32) + (tile_ms[i] - lse_s[i])
                logq = T.cast(rel_t[i, j], f32) + (tile_mt[i] - lse_t[i])
                log_m = _log_mixture(logp, logq, log_1m_beta, log_beta)
                g[i, j] = T.cast((1.0 - beta) * T.exp2(logp * LOG2E) * (logp - log_m - term[i]) * scale, bf16)
        else:
            # Per-row constants first, so that an element costs one FFMA before its exp2 and no
            # multiply by `scale` (> 0: folded into the exponent as log2 scale). Reverse:
            # g = 2^(rel_s·log2e + c_s) · (rel_s − rel_t + c_other); forward:
            # g = 2^(rel_s·log2e + c_s) − 2^(rel_t·log2e + c_other). 9 % less time per gradient launch.
            c_s = T.alloc_fragment((block_m,), f32)
            c_other = T.alloc_fragment((block_m,), f32)
            for i in T.Parallel(block_m):
                c_s[i] = (tile_ms[i] - lse_s[i]) * LOG2E + T.log2(scale)
                if kind == "reverse":
                    c_other[i] = (tile_ms[i] - lse_s[i]) - (tile_mt[i] - lse_t[i]) - term[i]
                else:
                    c_other[i] = (tile_mt[i] - lse_t[i]) * LOG2E + T.log2(scale)
            for i, j in T.Parallel(block_m, block_v):
                rs = T.cast(rel_s[i, j], f32)
                rt = T.cast(rel_t[i, j], f32)
                if kind == "reverse":
                    g[i, j] = T.cast(T.exp2(rs * LOG2E + c_s[i]) * (rs - rt + c_other[i]), bf16)
                else:
                    g[i, j] = T.cast(T.exp2(rs * LOG2E + c_s[i]) - T.exp2(rt * LOG2E + c_other[i]), bf16)

    return logit_grad_tile


@tilelang.jit(pass_configs=PASS_CONFIGS)
def logit_grad_kernel(kind: str, beta: float, vocab: int, vocab_pad: int, block_m: int, block_v: int, threads: int):
    """Builds the elementwise d loss / d logits kernel; writes bf16 over the student workspace.

    The vocabulary is static (one model, one vocabulary) so that loads and stores vectorise.
    """
    rows = T.dynamic("rows")
    n_tiles = -(-vocab // block_v)
    f16, f32, bf16 = T.float16, T.float32, T.bfloat16
    logit_grad_tile = logit_grad_tile_macro(kind, beta, block_m, block_v)

    @T.prim_func
    def logit_grad(
        student_rel: T.Tensor((rows, vocab_pad), f16),
        teacher_rel: T.Tensor((rows, vocab_pad), f16),
        partials: T.Tensor((n_tiles, N_PARTIALS, rows), f32),
        row_stats: T.Tensor((N_ROW_STATS, rows), f32),
        row_term: T.Tensor((rows,), f32),
        scale: f32,
        grad: T.Tensor((rows, vocab_pad), bf16),
    ):
        with T.Kernel(T.ceildiv(rows, block_m), n_tiles, threads=threads) as (bm, bv):
            g = T.alloc_fragment((block_m, block_v), bf16)
            logit_grad_tile(student_rel, teacher_rel, partials, row_stats, row_term, scale, g, bm, bv)
            T.copy(g, grad[bm * block_m, bv * block_v])

    return logit_grad


@tilelang.jit(pass_configs=PASS_CONFIGS)
def jsd_partials_kernel(beta: float, vocab: int, vocab_pad: int, block_m: int, block_v: int, threads: int):
    """Builds the per-tile sums Σ p(log p − log m) and Σ q(log q − log m) → [P, 2, R]."""
    rows = T.dynamic("rows")
    n_tiles = -(-vocab // block_v)
    f16, f32 = T.float16, T.float32
    log_1m_beta, log_beta = math.log1p(-beta), math.log(beta)

    @T.prim_func
    def jsd_partials(
        student_rel: T.Tensor((rows, vocab_pad), f16),
        teacher_rel: T.Tensor((rows, vocab_pad), f16),
        partials: T.Tensor((n_tiles, N_PARTIALS, rows), f32),
        row_stats: T.Tensor((N_ROW_STATS, rows), f32),
        out: T.Tensor((n_tiles, 2, rows), f32),
    ):
        with T.Kernel(T.ceildiv(rows, block_m), n_tiles, threads=threads) as (bm, bv):
            tile = alloc_log_prob_tile(block_m, block_v)
            load_log_prob_tile(*tile, student_rel, teacher_rel, partials, row_stats, bm, bv)
            rel_s, rel_t, tile_ms, tile_mt, lse_s, lse_t = tile
            p_term = T.alloc_fragment((block_m, block_v), f32)
            q_term = T.alloc_fragment((block_m, block_v), f32)
            p_sum = T.alloc_fragment((block_m,), f32)
            q_sum = T.alloc_fragment((block_m,), f32)
            for i, j in T.Parallel(block_m, block_v):
                logp = T.cast(rel_s[i, j], f32) + (tile_ms[i] - lse_s[i])
                logq = T.cast(rel_t[i, j], f32) + (tile_mt[i] - lse_t[i])
                log_m = _log_mixture(logp, logq, log_1m_beta, log_beta)
                # Columns past V (the row padding and the ragged last tile) must not be summed.
                in_vocab = bv * block_v + j < vocab
                p_term[i, j] = T.if_then_else(in_vocab, T.exp2(logp * LOG2E) * (logp - log_m), 0.0)
                q_term[i, j] = T.if_then_else(in_vocab, T.exp2(logq * LOG2E) * (logq - log_m), 0.0)
            T.reduce_sum(p_term, p_sum, dim=1)
            T.reduce_sum(q_term, q_sum, dim=1)
            T.copy(p_sum, out[bv, 0, bm * block_m])
            T.copy(q_sum, out[bv, 1, bm * block_m])

    return jsd_partials


@tilelang.jit(pass_configs=PASS_CONFIGS)
def scale_unless_one_kernel(block_rows: int = 8, block_cols: int = 2048, row_steps: int = 8, threads: int = 256):
    """Builds `values *= scale[0]` for a 2-D bf16 tensor, skipped on the device when scale is 1.

    The backward of the gradient-in-forward loss must apply the upstream gradient; reading it on
    the host would be a device sync per backward (the host could not queue the next work while the
    GEMMs finish). Each CTA reads the scalar and returns at once when it is 1, the usual case, so
    a 1 GB gradient costs microseconds instead of a 0.6 ms read-modify-write. Two dynamic
    dimensions keep every index below 2^31 for heads of any size; each CTA walks `row_steps`
    tiles so that the skipped launch has few CTAs.
    """
    rows, cols = T.dynamic("rows, cols")
    bf16, f32 = T.bfloat16, T.float32

    @T.prim_func
    def scale_unless_one(values: T.Tensor((rows, cols), bf16), scale: T.Tensor((1,), f32)):
        with T.Kernel(T.ceildiv(cols, block_cols), T.ceildiv(rows, block_rows * row_steps), threads=threads) as (bc, br):
            tile = T.alloc_fragment((block_rows, block_cols), bf16)
            if scale[0] != 1.0:
                for step in T.serial(row_steps):
                    r0 = (br * row_steps + step) * block_rows
                    T.copy(values[r0, bc * block_cols], tile)
                    for i, j in T.Parallel(block_rows, block_cols):
                        tile[i, j] = T.cast(T.cast(tile[i, j], f32) * scale[0], bf16)
                    T.copy(tile, values[r0, bc * block_cols])

    return scale_unless_one


def scale_unless_one(values: torch.Tensor, scale: torch.Tensor) -> None:
    """In place `values *= scale` (2-D contiguous bf16 CUDA tensor, one-element scale), no host sync."""
    scale_unless_one_kernel()(values, scale.reshape(1).to(torch.float32))


_GEMM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def gemm_side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream that runs dW_s beside dH (`concurrent_gemms`); one per device, made on first use."""
    if device not in _GEMM_STREAMS:
        _GEMM_STREAMS[device] = torch.cuda.Stream(device)
    return _GEMM_STREAMS[device]


@functools.cache
def kernels_for(config: DistillKLKernelConfig, kind: str, beta: float, vocab: int, with_grad: bool, num_sms: int):
    """(logits, combine, gradient or None, JSD partials or None) of one call's setting: one lookup
    per call instead of one per `tilelang.jit` factory."""
    c = config
    vocab_pad = padded_vocab(vocab)
    ctas = c.persistent_ctas or num_sms
    logits = logits_partials_kernel(c.block_m, c.block_v, c.block_k, c.num_stages, kind, num_ctas=ctas)
    combine = combine_partials_kernel(kind, vocab, c.block_v, c.combine_block_r, c.combine_group)
    grad_beta = beta if kind == "jsd" else 0.0  # one compiled gradient per kind outside JSD
    grad = logit_grad_kernel(kind, grad_beta, vocab, vocab_pad, c.elementwise_block_m, c.block_v, c.threads) if with_grad else None
    jsd = jsd_partials_kernel(beta, vocab, vocab_pad, c.elementwise_block_m, c.block_v, c.threads) if kind == "jsd" else None
    return logits, combine, grad, jsd


def chunk_rows_for(vocab_pad: int, config: DistillKLKernelConfig, n_rows: int) -> tuple[int, int]:
    """(rows per logits chunk, rows per gradient GEMM) for `n_rows` rows, so that the fp16
    [gemm + chunk, Vp] workspace fits `workspace_bytes`; multiples of block_m."""
    block = config.block_m
    workspace_rows = config.workspace_bytes // (2 * vocab_pad) // block * block
    chunk = max(block, workspace_rows // (config.chunks_per_gemm + 1) // block * block)
    needed = -(-max(n_rows, 1) // block) * block
    gemm_rows = min(chunk * config.chunks_per_gemm, needed)
    # When one GEMM covers every row, the chunk takes the rest of the budget (fewer launches).
    return min(max(chunk, workspace_rows - gemm_rows), gemm_rows), gemm_rows


def distill_kl_tilelang(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_heads: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
    reduction: str,
    grad_hidden: bool,
    grad_head: bool,
    config: DistillKLKernelConfig = DistillKLKernelConfig(),
) -> DistillKLResult:
    """Same contract as `ref.distill_kl_reference`; CUDA bf16 tensors, widths multiples of 8."""
    kind, beta = resolve_kind(kind, beta)
    n_rows, d_s = student_hidden.shape
    vocab = student_head.shape[0]
    vocab_pad = padded_vocab(vocab)
    device = student_hidden.device
    inv_tau = 1.0 / temperature
    c = config

    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    logits_kernel, combine_kernel, grad_kernel, jsd_kernel = kernels_for(c, kind, beta, vocab, grad_hidden or grad_head, num_sms)

    n_tiles = -(-vocab // c.block_v)

    # The first logits kernel is queued after as few host calls as possible (this host time is GPU
    # idle time when the GPU waits for the step): outputs that no kernel before the GEMMs writes
    # are allocated later. One teacher without a mask gives its rows chunk by chunk in order, so
    # the per-row outputs are concatenated at the end; grouped or masked rows are scattered into
    # outputs allocated here (zeros where a mask leaves rows unwritten).
    groups = teacher_row_groups(teacher_ids, mask, n_rows, device)
    in_order = all(rows is None for _, rows in groups)
    rows_fill = torch.empty if mask is None else torch.zeros
    chunk_kl, chunk_entropy, chunk_target = [], [], []
    if not in_order:
        per_token_kl = rows_fill(n_rows, dtype=torch.float32, device=device)
        entropy = rows_fill(n_rows, dtype=torch.float32, device=device)
        target_logprob = None if target_ids is None else rows_fill(n_rows, dtype=torch.float32, device=device)
    d_hidden = d_head = None  # allocated at the first GEMM group; zeros at the end if there is none

    n_valid = sum(n_rows if rows is None else rows.numel() for _, rows in groups)
    row_weight = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    chunk, gemm_rows = chunk_rows_for(vocab_pad, c, n_valid)
    # Rows [0, gemm_rows): the student logits of each chunk, overwritten in place by its bf16
    # gradient; rows [gemm_rows, gemm_rows + chunk): the current chunk's teacher logits.
    workspace = torch.empty(gemm_rows + chunk, vocab_pad, dtype=torch.float16, device=device)
    teacher_rel_buf = workspace[gemm_rows:]
    grad_scale = row_weight * inv_tau

    def write_grad(student_rel, partials, row_stats, grad_term):
        """The chunk's gradient over its workspace rows (reads the teacher workspace)."""
        grad_kernel(student_rel, teacher_rel_buf[: student_rel.shape[0]], partials, row_stats, grad_term, grad_scale, student_rel.view(torch.bfloat16))

    for teacher, group_rows in groups:
        head_t = teacher_heads[teacher]
        n_group = n_rows if group_rows is None else group_rows.numel()
        for gemm_start in range(0, n_group, gemm_rows):
            gemm_stop = min(gemm_start + gemm_rows, n_group)
            if group_rows is None:  # every row, in order: contiguous slices, no gather or scatter
                gemm_sel = slice(gemm_start, gemm_stop)
                hs_rows, ht_rows, first_row = student_hidden, teacher_hidden, gemm_start
            else:
                gemm_sel = group_rows[gemm_start:gemm_stop]
                hs_rows = student_hidden.index_select(0, gemm_sel)
                ht_rows = teacher_hidden.index_select(0, gemm_sel)
                first_row = 0
            for offset in range(0, gemm_stop - gemm_start, chunk):
                r = min(chunk, gemm_stop - gemm_start - offset)
                hs = hs_rows[first_row + offset : first_row + offset + r]
                ht = ht_rows[first_row + offset : first_row + offset + r]
                student_rel = workspace[offset : offset + r]
                teacher_rel = teacher_rel_buf[:r]
                partials = torch.empty(n_tiles, N_PARTIALS, r, dtype=torch.float32, device=device)
                row_stats = torch.empty(N_ROW_STATS, r, dtype=torch.float32, device=device)
                logits_kernel(hs, student_head, ht, head_t, inv_tau, student_rel, teacher_rel, partials)
                combine_kernel(partials, row_stats)
                rows = slice(gemm_start + offset, gemm_start + offset + r) if group_rows is None else gemm_sel[offset : offset + r]
                lse_s, _, kind_kl, row_entropy = row_stats
                target_lp = None
                if target_ids is not None:
                    target_rows = student_head.index_select(0, target_ids[rows])
                    target_logits = torch.linalg.vecdot(hs.float(), target_rows.float()) * inv_tau
                    target_lp = target_logits - lse_s

                if kind != "jsd":
                    row_loss = grad_term = kind_kl
                else:
                    jsd_sums = torch.empty(n_tiles, 2, r, dtype=torch.float32, device=device)
                    jsd_kernel(student_rel, teacher_rel, partials, row_stats, jsd_sums)
                    kl_p_m, kl_q_m = jsd_sums.sum(0)
                    row_loss, grad_term = beta * kl_q_m + (1.0 - beta) * kl_p_m, kl_p_m
                if in_order:
                    chunk_kl.append(row_loss)
                    chunk_entropy.append(row_entropy)
                    chunk_target.append(target_lp)
                else:
                    per_token_kl[rows] = row_loss
                    entropy[rows] = row_entropy
                    if target_lp is not None:
                        target_logprob[rows] = target_lp
                if grad_kernel is not None:  # before the next chunk's logits reuse the teacher workspace
                    write_grad(student_rel, partials, row_stats, grad_term)

            if grad_kernel is None:
                continue
            grad_logits = workspace[: gemm_stop - gemm_start].view(torch.bfloat16)[:, :vocab]
            if grad_hidden and d_hidden is None:
                d_hidden = rows_fill(student_hidden.shape, dtype=student_hidden.dtype, device=device)
            first_head_group = grad_head and d_head is None
            if first_head_group:
                d_head = torch.empty_like(student_head)
            # Both GEMMs read the group's gradients, which the next logits kernel overwrites: with
            # a side stream, it joins the main one before anything else is queued.
            side = gemm_side_stream(device) if grad_head and grad_hidden and c.concurrent_gemms else None
            if side is not None:
                main = torch.cuda.current_stream(device)
                side.wait_stream(main)
            if grad_hidden:
                if group_rows is None:
                    torch.mm(grad_logits, student_head, out=d_hidden[gemm_sel])
                else:
                    d_hidden.index_copy_(0, gemm_sel, grad_logits @ student_head)
            if grad_head:
                hs_gemm = hs_rows[gemm_sel] if group_rows is None else hs_rows
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    if first_head_group:
                        torch.mm(grad_logits.T, hs_gemm, out=d_head)
                    else:
                        d_head.addmm_(grad_logits.T, hs_gemm)
            if side is not None:
                main.wait_stream(side)

    if grad_hidden and d_hidden is None:  # no row counted
        d_hidden = torch.zeros_like(student_hidden)
    if grad_head and d_head is None:
        d_head = torch.zeros_like(student_head)
    if in_order:

        def joined(chunks):  # no chunks only when there are no rows
            return torch.cat(chunks) if chunks else torch.zeros(n_rows, dtype=torch.float32, device=device)

        per_token_kl, entropy = joined(chunk_kl), joined(chunk_entropy)
        target_logprob = None if target_ids is None else joined(chunk_target)
    loss = per_token_kl.sum() * row_weight
    return DistillKLResult(loss, per_token_kl, target_logprob, entropy, d_hidden, d_head)
