"""Triton kernels for the antidiagonal estimate (ALGORITHM §9): the result of
`antidiagonal.torch_antidiagonal_scores`, with no strided logits in memory.

A program owns `BLOCK_M` rows: `BLOCK_M // G_PAD` consecutive strided rows of every query head
that shares one KV head (GQA: one K' tile serves the group, and all the program's rows end
their causal key range at the same strided key). Q' rows are gathered from q with the
alternating antidiagonal order (`antidiagonal.strided_order`); K' is k's rows `[S/s, s*D]`,
read through k's strides. Two launches per chunk of strided rows:

1. `_strided_lse_kernel`: for each tile of `BLOCK_N` causal strided keys, the scaled strided
   logits: for `cell_score="mean"` by `tl.dot` over s*D in `BLOCK_K` steps (the diagonal cell
   replaced by its causal cells' mean, computed before the loop), for "max" one D-deep dot per
   antidiagonal segment and the elementwise max of the s tiles (`_tile_cell_max`), then each
   row's log-sum-exp over every `sub` keys (`sub` = the strided keys of a key block, or
   `BLOCK_N` if a key block is wider) stored in a `[rows, sub-blocks]` scratch slice, and the
   row's online (max, sum), stored per row;
   At short lengths the row tiles alone leave SMs idle, so a launch splits each tile's key
   tiles among `key_splits` programs: each stores its keys' sub-block entries and its share
   of the rows' (max, sum) as a partial log-sum-exp, which the second kernel combines;
2. `_block_mass_kernel`: one program per (batch, head, query block) sums
   `exp2(lse_sub - lse_row)` over the query block's strided rows and each key block's
   sub-blocks: the estimate's mass; the largest of the rows' own sums is its peak.

Masks: under "max" the causal and past-S masks and the scale, applied to each segment's
`[rows, keys]` dots, cost about as much as the dot (sm_90 SASS: ~8 instructions an element a
segment, against 1 for the max alone). A program's key tiles wholly below its first strided
row have only causal cells, so they run first without masks: a segment's epilogue is one max
and the scale is applied once per tile (a positive scale commutes with the max; a zero or
negative one, which SDPA allows, is applied per segment). The tiles reaching the diagonal
(one or two at the default tiles) follow with the masks; "mean" skips its diagonal and causal
`where` on the first tiles likewise. A program holding a partial last strided row
(S % s != 0) masks every tile: under "max" a segment past S reads as 0 and would put a 0 logit
in the max ("mean" counts real cells only, but shares the rule: one program per KV head).

Why one pass with a scratch instead of two passes over K': the QK'^T FLOPs are the cost
(`S^2*D/s` per head: 8.8 TFLOP at 128K on Llama-3-8B with s = 8), and a second pass would
redo them to normalise the probabilities. The scratch is one fp32 per (strided row, key block):
`kv_block / s` times smaller than the logits (16x at the default 128 / 8), ~2 GiB at 128K over
32 heads, written and read once (~1.4 ms of HBM traffic; the FLOPs take 10-20 ms at 50-90% of
the H100's bf16 peak).
Its footprint is bounded by launching chunks of strided rows (`chunk_elements` floats per
launch); each chunk's programs then have similar causal lengths, and within a launch the
longest tiles run first. Every output is written by one program: no atomics.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from flexsample.antidiagonal import BlockEstimate
from flexsample.config import SampleConfig

#: Rows per program (group heads x strided rows), strided keys per tile, s*D elements per dot
#: step, warps and pipeline stages of the first kernel. Q' (BLOCK_M x s*D, 256 KiB in bf16 at
#: s = 8) is re-read for every key tile and the programs in flight hold more of it than the
#: H100's L2, so BLOCK_N sets Q' traffic per FLOP (1/BLOCK_N bytes in bf16): 128. Measured
#: (`bench/results/antidiagonal_kernel.md` as of its 2026-11-26 12:29 sweep, before the
#: unmasked tiles; H100, Llama-3-8B shape, 128K): BLOCK_N 128 against
#: 64 is 1.9x faster; 8 warps; 3 or 4 stages within 1%. BLOCK_K 128 against 64 is 16% faster
#: ("max", stride 16: 21.4 vs 25.4 ms; stride 8: 43.7 vs 48.0; "mean" 2-5%) but needs 192 KiB
#: of shared memory at 3 stages, which only Hopper-class GPUs (sm_90+, 227 KiB) have: it is
#: BLOCK_K_SM90 there and BLOCK_K elsewhere.
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 3
BLOCK_K_SM90 = 128
#: Key tiles a split keeps at least (`key_splits`): a launch whose longest row tile spans
#: fewer than twice this many is never split. Measured on the H200: splitting as much as gave
#: the GPU 4 programs per SM (bench/results/antidiagonal_splits_waves4.md) took 32K with 6
#: query / 2 KV heads (128 programs, longest 16 key tiles) from 0.461 to 0.283 ms but 8K with
#: 32 / 8 heads (128 programs, 4 tiles) from 0.174 to 0.206 ms; with this rule
#: (antidiagonal_splits.md) 32K 6 / 2 takes 2 splits, 0.463 -> 0.277 ms (4, 5, 8 splits:
#: 0.28-0.29), 16K 32 / 8 none (1 split 0.315 ms, 2-8 splits 0.327-0.339). Below ~0.3 ms the
#: sweeps are launch-bound and vary run to run, so 8K and 16K with 6 / 2 heads are not settled.
SPLIT_MIN_TILES = 4
#: Key splits a launch takes at least, where its tiles are long enough (`SPLIT_MIN_TILES` each):
#: a program's Q' (BLOCK_M x s*D: 512 KiB at s = 16) is re-read for every key tile, and a
#: launch's ~132 programs in flight held ~66 MiB of it, more than L2. With one KV head's
#: programs in flight together and each row tile's keys split in 4, the same SMs hold ~33 Q'
#: tiles and stream K' tiles they share. Measured in one machine session (H100, stride 16
#: "max", bench/results/antidiagonal_locality.md against antidiagonal_prev_order.md, the
#: previous order with key_splits' previous choice): Llama-3-8B shape (32 / 8 heads) 128K
#: 17.2 -> 14.0 ms, 32K 1.21 -> 1.03, 16K 0.353 -> 0.356; real-text shape (6 / 2) 128K 3.73
#: -> 3.41, 32K 0.278 -> 0.295, 16K 0.157 -> 0.137. At 128K 2, 4 and 8 splits are within 6%
#: of each other; 8K is launch-bound and varies run to run.
LOCALITY_SPLITS = 4
#: With e4m3 inputs, by `cell_score`: products the tensor cores sum before each promotion to
#: fp32 (`tl.dot`'s max_num_imprecise_acc; 0: Triton's default on sm_90, never). Measured (H100,
#: Llama-3-8B shape, bench/results/fp8_accumulation.md): relative RMS error against the exact
#: scores of the rounded inputs at 16K + 77 and time at 128K, for 0 / 64 / 32: "max" (D-long
#: dots) 2.2e-3 / 9.5e-4 / 3.8e-4 and 9.12 / 9.86 / 11.4 ms; "mean" (s*D-long dots) 2.1e-2 /
#: 3.8e-4 / 4.7e-5 and 8.35 / 9.87 / 11.5 ms (bf16 operands: 13.9 and 13.5 ms). "max" keeps the
#: fastest, which the real-text judge found lossless (realtext_fp8.md); "mean" takes 64.
FP8_IMPRECISE_ACC = {"max": 0, "mean": 64}


@triton.jit
def _order(m, a, STRIDE: tl.constexpr):
    """Row offset of segment `a` of strided row `m` (`antidiagonal.strided_order`)."""
    return tl.where(m % 2 == 1, (STRIDE - a) % STRIDE, STRIDE - 1 - a)


@triton.jit
def _cell_counts(m, seq_len, STRIDE: tl.constexpr):
    """The mean's cell counts of strided rows `m`: real cells (row < S), and the real causal
    ones of the diagonal cell (m, m)."""
    a = tl.arange(0, STRIDE)
    order = _order(m[:, None], a[None, :], STRIDE)
    real = m[:, None] * STRIDE + order < seq_len
    causal = order >= a[None, :]
    return tl.sum(real.to(tl.int32), 1), tl.sum((real & causal).to(tl.int32), 1)


@triton.jit
def _tile_logits(acc, n, m, row_scale, diag_logit):
    """Log2-domain strided logits `[rows, keys]` from the tile's dots `acc`: the mean over the
    cell's real cells, the diagonal's own (causal) mean, -inf past the diagonal."""
    logit = tl.where(n[None, :] == m[:, None], diag_logit[:, None], acc * row_scale[:, None])
    return tl.where(n[None, :] <= m[:, None], logit, float("-inf"))


@triton.jit
def _segment(row_ptrs, ok, d, stride_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Columns `d` of the rows starting at `row_ptrs` `[rows]`: `[rows, BLOCK_K]`, 0 where not
    `ok` (past S, padding rows) and past the head dim."""
    x = tl.load(
        row_ptrs[:, None] + d[None, :] * stride_d,
        mask=ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _q_cells(
    q_rows,
    m,
    seg,
    d,
    row_ok,
    seq_len,
    stride_qs,
    stride_qd,
    HEAD_DIM: tl.constexpr,
    STRIDE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Columns `d` of segment `seg` of Q' for strided rows `m` (q_rows: each row's head base
    pointer): q's rows m*s + order(m, seg)."""
    row = m * STRIDE + _order(m, seg, STRIDE)
    # int64 offsets: at 1M tokens head * stride_qh (32 heads x S x D) passes 2^31.
    row_ptrs = q_rows + row.to(tl.int64) * stride_qs
    return _segment(row_ptrs, row_ok & (row < seq_len), d, stride_qd, HEAD_DIM, UPCAST)


@triton.jit
def _k_cells(
    k_base,
    n,
    seg,
    d,
    seq_len,
    stride_ks,
    stride_kd,
    HEAD_DIM: tl.constexpr,
    STRIDE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Columns `d` of segment `seg` of K' for strided keys `n`: k's rows n*s + seg."""
    key = n * STRIDE + seg
    row_ptrs = k_base + key.to(tl.int64) * stride_ks
    return _segment(row_ptrs, key < seq_len, d, stride_kd, HEAD_DIM, UPCAST)


@triton.jit
def _sub_lse(logit, R: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """Log2-domain log-sum-exp of `logit` `[R, BLOCK_N]` over each run of `SUB` keys:
    `[R, BLOCK_N // SUB]`, -inf where a run has no finite logit."""
    cells = tl.reshape(logit, (R, BLOCK_N // SUB, SUB))
    m_sub = tl.max(cells, 2)
    m_sub = tl.where(m_sub == float("-inf"), 0.0, m_sub)  # sub-blocks with no causal key
    sum_sub = tl.sum(tl.exp2(cells - m_sub[:, :, None]), 2)
    return tl.where(
        sum_sub > 0, m_sub + tl.log2(tl.where(sum_sub > 0, sum_sub, 1.0)), float("-inf")
    )


@triton.jit
def _tile_cell_max(
    q_rows,
    k_base,
    m,
    n,
    row_ok,
    seq_len,
    stride_qs,
    stride_qd,
    stride_ks,
    stride_kd,
    row_scale,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STRIDE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE: tl.constexpr,
    MASKED: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
):
    """`cell_score="max"`: log2-domain strided logits `[R, BLOCK_N]`, each the largest of its
    cell's real causal antidiagonal logits (-inf where none): one D-long dot per segment.
    Not `MASKED`: for tiles whose cells are all causal and whose rows are all below S (rows
    never stored may read as 0). `POSITIVE_SCALE`: the scale is applied once, to the max
    (it commutes with a positive scale only; SDPA's scale may be zero or negative)."""
    offs_k = tl.arange(0, BLOCK_K)
    best = tl.full([R, BLOCK_N], float("-inf"), tl.float32)
    for seg in range(0, STRIDE):
        acc = tl.zeros([R, BLOCK_N], tl.float32)
        for c in range(0, D_CHUNKS):
            d = c * BLOCK_K + offs_k
            qc = _q_cells(
                q_rows, m, seg, d, row_ok, seq_len, stride_qs, stride_qd, HEAD_DIM, STRIDE, UPCAST
            )
            kc = _k_cells(
                k_base, n, seg, d, seq_len, stride_ks, stride_kd, HEAD_DIM, STRIDE, UPCAST
            )
            acc = tl.dot(
                qc, tl.trans(kc), acc, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE
            )
        if not POSITIVE_SCALE:
            acc = acc * row_scale[:, None]
        if MASKED:
            order = _order(m, seg, STRIDE)
            # Key n*s + seg against row m*s + order: causal for n < m, and on the diagonal cell
            # where order >= seg; rows past S have no cell.
            ok = (n[None, :] < m[:, None]) | ((n[None, :] == m[:, None]) & (order >= seg)[:, None])
            ok &= (m * STRIDE + order < seq_len)[:, None]
            acc = tl.where(ok, acc, float("-inf"))
        best = tl.maximum(best, acc)
    if POSITIVE_SCALE:
        # One scale for every row in "max": scaling the max equals the max of the scaled.
        best = best * row_scale[:, None]
    return best


@triton.jit
def _strided_lse_kernel(
    Q,
    K,
    HEAD_SCALE,
    BLOCK_LSE,
    ROW_LSE,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    seq_len,
    q_row0,
    row_end,
    kv_heads,
    row0,
    tiles,
    splits,
    chunk_rows,
    width,
    scale_log2e,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STRIDE: tl.constexpr,
    SUB: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE: tl.constexpr,
    MAX: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
):
    # (batch, KV head) by (batch, KV head), each one's row tiles longest first (the last
    # strided rows), a tile's key splits side by side: the programs in flight then read one
    # head's K' and a few Q' tiles, which stay in L2 (`LOCALITY_SPLITS`); short tiles still
    # fill the launch's last wave.
    tile = tiles - 1 - tl.program_id(0) // splits % tiles
    bk = tl.program_id(0) // (splits * tiles)
    split = tl.program_id(0) % splits
    b = bk // kv_heads
    offs_r = tl.arange(0, G_PAD * ROWS)
    g = offs_r // ROWS
    head = bk % kv_heads * GROUP + g
    m = row0 + tile * ROWS + offs_r % ROWS  # strided row of each program row
    row_ok = (g < GROUP) & (m < row_end)
    n_end = tl.minimum(row0 + (tile + 1) * ROWS, row_end)  # keys n <= the last row
    # This split's key tiles: an equal share of the tile's, whole tiles each.
    per_split = tl.cdiv(tl.cdiv(n_end, BLOCK_N), splits) * BLOCK_N
    split_lo = split * per_split
    split_hi = tl.minimum(split_lo + per_split, n_end)
    # Q holds rows q_row0.. only (a context-parallel chunk); rows read are all >= q_row0.
    q_rows = (
        Q
        + b.to(tl.int64) * stride_qb
        + head.to(tl.int64) * stride_qh
        - tl.cast(q_row0, tl.int64) * stride_qs
    )
    k_base = K + b.to(tl.int64) * stride_kb + (bk % kv_heads).to(tl.int64) * stride_kh
    offs_k = tl.arange(0, BLOCK_K)
    # The logits' factor per head: e4m3 operands' scales (fp8.py), else 1.
    head_scale = tl.load(HEAD_SCALE + b * kv_heads * GROUP + head, mask=g < GROUP, other=1.0)

    if MAX:
        row_scale = (head_scale * scale_log2e).to(tl.float32)
    else:
        count, diag_count = _cell_counts(m, seq_len, STRIDE)
        # The diagonal cell (m, m) over its causal cells only: the tiles' dot sums all s of them.
        diag = tl.zeros([G_PAD * ROWS], tl.float32)
        for c in range(0, STRIDE * D_CHUNKS):
            seg = c // D_CHUNKS
            d = c % D_CHUNKS * BLOCK_K + offs_k
            qc = _q_cells(
                q_rows, m, seg, d, row_ok, seq_len, stride_qs, stride_qd, HEAD_DIM, STRIDE, UPCAST
            )
            kc = _k_cells(
                k_base, m, seg, d, seq_len, stride_ks, stride_kd, HEAD_DIM, STRIDE, UPCAST
            )
            prod = tl.sum(qc.to(tl.float32) * kc.to(tl.float32), 1)
            diag += tl.where(_order(m, seg, STRIDE) >= seg, prod, 0.0)
        # fp32 casts: under inductor a float argument arrives as fp64 and would promote the
        # logits.
        row_scale = (head_scale * scale_log2e / tl.maximum(count, 1)).to(tl.float32)
        diag_scale = (head_scale * scale_log2e / tl.maximum(diag_count, 1)).to(tl.float32)
        diag_logit = tl.where(diag_count > 0, diag * diag_scale, float("-inf"))

    # Scratch layout [B * Hq, chunk_rows, width]: a row's sub-blocks are contiguous.
    scratch_row = (b * kv_heads * GROUP + head).to(tl.int64) * chunk_rows + (m - row0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_N // SUB)
    m_i = tl.full([G_PAD * ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD * ROWS], tl.float32)
    # Tiles wholly below the program's first row first, unmasked (module docstring), then the
    # rest: one loop body, compiled once per phase.
    m_first = row0 + tile * ROWS
    fast_end = tl.where(n_end * STRIDE > seq_len, 0, m_first // BLOCK_N * BLOCK_N)
    for masked in tl.static_range(2):
        lo = tl.maximum(fast_end if masked else 0, split_lo)
        hi = tl.minimum(n_end if masked else fast_end, split_hi)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + offs_n
            if MAX:
                logit = _tile_cell_max(
                    q_rows,
                    k_base,
                    m,
                    n,
                    row_ok,
                    seq_len,
                    stride_qs,
                    stride_qd,
                    stride_ks,
                    stride_kd,
                    row_scale,
                    G_PAD * ROWS,
                    BLOCK_N,
                    BLOCK_K,
                    D_CHUNKS,
                    HEAD_DIM,
                    STRIDE,
                    UPCAST,
                    PRECISION,
                    IMPRECISE,
                    masked,
                    POSITIVE_SCALE,
                )
            else:
                acc = tl.zeros([G_PAD * ROWS, BLOCK_N], tl.float32)
                for c in range(0, STRIDE * D_CHUNKS):
                    seg = c // D_CHUNKS
                    d = c % D_CHUNKS * BLOCK_K + offs_k
                    qc = _q_cells(
                        q_rows,
                        m,
                        seg,
                        d,
                        row_ok,
                        seq_len,
                        stride_qs,
                        stride_qd,
                        HEAD_DIM,
                        STRIDE,
                        UPCAST,
                    )
                    kc = _k_cells(
                        k_base, n, seg, d, seq_len, stride_ks, stride_kd, HEAD_DIM, STRIDE, UPCAST
                    )
                    acc = tl.dot(
                        qc,
                        tl.trans(kc),
                        acc,
                        input_precision=PRECISION,
                        max_num_imprecise_acc=IMPRECISE,
                    )
                if masked:
                    logit = _tile_logits(acc, n, m, row_scale, diag_logit)
                else:
                    logit = acc * row_scale[:, None]
            lse_sub = _sub_lse(logit, G_PAD * ROWS, BLOCK_N, SUB)
            j = n0 // SUB + offs_j
            tl.store(
                BLOCK_LSE + scratch_row[:, None] * width + j[None, :],
                lse_sub,
                mask=row_ok[:, None] & (j[None, :] * SUB < n_end),
            )
            m_new = tl.maximum(m_i, tl.max(lse_sub, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(lse_sub - m_ref[:, None]), 1)
            m_i = m_new
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    # The split's share of the row's log-sum-exp; -inf where it saw no finite logit (an empty
    # split, or row 0 when S < s/2). The second kernel combines the splits.
    lse = tl.where(l_i > 0, m_ref + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    split_rows = tl.num_programs(0) // (tiles * splits) * GROUP * chunk_rows
    tl.store(ROW_LSE + split.to(tl.int64) * split_rows + scratch_row, lse, mask=row_ok)


@triton.jit
def _rows_peak(share, R: tl.constexpr, J: tl.constexpr, SUBS: tl.constexpr):
    """`[R, J]` shares of rows in sub-blocks -> `[J // SUBS]`: the largest of the rows' sums
    over each key block's SUBS sub-blocks."""
    return tl.max(tl.sum(tl.reshape(share, (R, J // SUBS, SUBS)), 2), 0)


@triton.jit
def _row_lse(ROW_LSE, rows, ok, splits, split_rows):
    """A row's log2-domain log-sum-exp `[R]` from its key splits' shares (-inf: a split without
    a finite logit); +inf for a row without any, so that its shares below are 0."""
    # int32 suffices: split * split_rows < the scratch (splits < its width), ~CHUNK_ELEMENTS.
    m = tl.full(rows.shape, float("-inf"), tl.float32)
    for split in range(0, splits):
        lse = tl.load(ROW_LSE + split * split_rows + rows, mask=ok, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros(rows.shape, tl.float32)
    for split in range(0, splits):
        lse = tl.load(ROW_LSE + split * split_rows + rows, mask=ok, other=float("-inf"))
        total += tl.exp2(lse - m_ref)
    return tl.where(total > 0, m_ref + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))


@triton.jit
def _block_mass_kernel(
    BLOCK_LSE,
    ROW_LSE,
    EST,
    PEAK,
    row_end,
    row0,
    q_block0,
    splits,
    split_rows,
    chunk_rows,
    width,
    out_q0,
    out_q,
    num_kv,
    PER_Q: tl.constexpr,
    SUB: tl.constexpr,
    SUBS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    qb = q_block0 + tl.program_id(0)
    bh = tl.program_id(1)  # batch * Hq + head: the scratch's and the estimate's leading index
    first = qb * PER_Q
    last = tl.minimum(first + PER_Q, row_end)
    num_sub = (last - 1) // SUB + 1  # sub-blocks with a key causal for the block's last row
    # EST holds query blocks out_q0 .. out_q0 + out_q - 1 (a context-parallel chunk's).
    out = (bh.to(tl.int64) * out_q + qb - out_q0) * num_kv
    offs_j = tl.arange(0, BLOCK_J)
    for j0 in range(0, num_sub, BLOCK_J):
        j = j0 + offs_j
        mass = tl.zeros([BLOCK_J], tl.float32)
        peak = tl.zeros([BLOCK_J // SUBS], tl.float32)
        for r0 in range(first, last, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rows = bh.to(tl.int64) * chunk_rows + (r - row0)
            lse = _row_lse(ROW_LSE, rows, r < last, splits, split_rows)
            # Only entries the first kernel wrote: sub-blocks starting at or before the row.
            ok = (r[:, None] < last) & (j[None, :] * SUB <= r[:, None])
            lse_sub = tl.load(
                BLOCK_LSE + rows[:, None] * width + j[None, :], mask=ok, other=float("-inf")
            )
            share = tl.where(ok, tl.exp2(lse_sub - lse[:, None]), 0.0)
            mass += tl.sum(share, 0)
            peak = tl.maximum(peak, _rows_peak(share, BLOCK_R, BLOCK_J, SUBS))
        kb = j0 // SUBS + tl.arange(0, BLOCK_J // SUBS)
        block_mass = tl.sum(tl.reshape(mass, (BLOCK_J // SUBS, SUBS)), 1)
        tl.store(EST + out + kb, block_mass, mask=kb * SUBS < num_sub)
        tl.store(PEAK + out + kb, peak, mask=kb * SUBS < num_sub)


def key_splits(
    requested: int, programs: int, shortest: int, longest: int, device: torch.device
) -> int:
    """Programs per row tile of a launch of `programs` row tiles spanning `shortest` to
    `longest` key tiles (causal: a ramp): `requested` if > 0 (at most `longest`), else 1 off
    CUDA, else the fewest splits that bring the longest program down to the launch's mean
    work per SM (one program per SM: the first kernel's shared memory), and at least
    `LOCALITY_SPLITS` (L2 reuse), keeping `SPLIT_MIN_TILES` key tiles a split."""
    if requested > 0:
        return min(requested, longest)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = programs * (shortest + longest) / 2 / sms
    fill = math.ceil(longest / max(per_sm, 1.0))
    return max(1, min(longest // SPLIT_MIN_TILES, max(fill, LOCALITY_SPLITS)))


@triton_op("flexsample::antidiagonal_scores", mutates_args=())
def antidiagonal_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    head_scale: torch.Tensor,
    scale: float,
    stride: int,
    q_block: int,
    kv_block: int,
    chunk_elements: int,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    cell_max: bool,
    first_q: int,
    end_q: int,
    q_row0: int,
    splits: int,
    imprecise_acc: int,
) -> torch.Tensor:
    """q `[B, Hq, L, D]`, k `[B, Hkv, S, D]` -> the estimate of query blocks first_q..end_q-1,
    its mass and peak stacked, `[2, B, Hq, end_q - first_q, nKV]` (fp32, zeros above the
    diagonal); the logits of head h are multiplied by `scale * head_scale[b, h]` (`[B, Hq]`
    fp32, positive); q holds rows q_row0..
    q_row0 + L - 1 and is read at the blocks' rows only. Strided rows are launched in chunks
    whose scratch holds at most `chunk_elements` floats (or one query block / tile of rows,
    whichever is more); `splits` > 0 splits each row tile's key tiles among that many programs
    (at most the longest tile's key tiles; equal shares of whole tiles, so the last shares
    may be empty), 0 lets `key_splits` choose per launch; `imprecise_acc`: with e4m3 inputs, the
    products the tensor cores sum before each fp32 promotion (0: Triton's default, none); the
    other arguments are the first kernel's launch parameters."""
    batch, heads, _, dim = q.shape
    seq_len = k.shape[2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    num_kv = triton.cdiv(seq_len, kv_block)
    num_strided = triton.cdiv(seq_len, stride)
    per_q, per_kv = q_block // stride, kv_block // stride
    g_pad = triton.next_power_of_2(group)
    rows = max(1, block_m // g_pad)  # strided rows per head of a program
    sub = min(block_n, per_kv)  # strided keys per scratch entry (both powers of two)
    width = triton.cdiv(num_strided, sub)
    unit = max(rows, per_q)  # chunks hold whole tiles and whole query blocks
    chunk_rows = max(unit, chunk_elements // (batch * heads * width) // unit * unit)
    row_lo, row_hi = first_q * per_q, min(end_q * per_q, num_strided)
    chunk_rows = min(chunk_rows, triton.cdiv(row_hi - row_lo, unit) * unit)
    launches = []
    for row0 in range(row_lo, row_hi, chunk_rows):
        chunk = min(chunk_rows, row_hi - row0)
        tiles = triton.cdiv(chunk, rows)
        longest = triton.cdiv(min(row0 + tiles * rows, row_hi), block_n)
        shortest = triton.cdiv(min(row0 + rows, row_hi), block_n)
        programs = tiles * batch * kv_heads
        split = key_splits(splits, programs, shortest, longest, q.device)
        launches.append((row0, chunk, tiles, split))
    est = torch.zeros(2, batch, heads, end_q - first_q, num_kv, device=q.device)
    block_lse = torch.empty(batch * heads, chunk_rows, width, device=q.device)
    most = max(launch[3] for launch in launches)
    row_lse = torch.empty(most, batch * heads, chunk_rows, device=q.device)
    upcast = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    # tl.dot's K: at least 16, and 32 for 8-bit inputs (Triton does not compile less).
    fp8 = q.element_size() == 1
    block_k = min(block_k, max(32 if fp8 else 16, triton.next_power_of_2(dim)))
    block_r = min(32, triton.next_power_of_2(per_q))
    for row0, chunk, tiles, split in launches:
        wrap_triton(_strided_lse_kernel)[(tiles * batch * kv_heads * split,)](
            q,
            k,
            head_scale,
            block_lse,
            row_lse,
            *q.stride(),
            *k.stride(),
            seq_len,
            q_row0,
            row_hi,  # row_end: rows past it (another chunk's) are not read
            kv_heads,
            row0,
            tiles,
            split,
            chunk_rows,
            width,
            scale * math.log2(math.e),
            GROUP=group,
            G_PAD=g_pad,
            ROWS=rows,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            D_CHUNKS=triton.cdiv(dim, block_k),
            HEAD_DIM=dim,
            STRIDE=stride,
            SUB=sub,
            UPCAST=upcast,
            PRECISION="ieee" if upcast else "tf32",
            IMPRECISE=min(imprecise_acc, block_k) if imprecise_acc and fp8 else None,
            MAX=cell_max,
            POSITIVE_SCALE=scale > 0,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        wrap_triton(_block_mass_kernel)[(triton.cdiv(chunk, per_q), batch * heads)](
            block_lse,
            row_lse,
            est[0],
            est[1],
            row_hi,
            row0,
            row0 // per_q,
            split,
            batch * heads * chunk_rows,
            chunk_rows,
            width,
            first_q,
            end_q - first_q,
            num_kv,
            PER_Q=per_q,
            SUB=sub,
            SUBS=per_kv // sub,
            BLOCK_R=block_r,
            BLOCK_J=max(per_kv // sub, 64),
        )
    return est


def triton_antidiagonal_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig,
    scale: float,
    *,
    chunk_elements: int,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    q_blocks: tuple[int, int] | None = None,
    q_row0: int = 0,
    splits: int = 0,
    head_scale: torch.Tensor | None = None,
    imprecise_acc: int | None = None,
) -> BlockEstimate:
    """`antidiagonal.antidiagonal_scores` through the kernels (same result); q and k may be
    e4m3 (`fp8.quantize`), with `head_scale` `[B, Hq]` the logits' factor per head (None: 1)
    and `imprecise_acc` as in `antidiagonal_block_scores` (None: `FP8_IMPRECISE_ACC`);
    launch knobs for tests and sweeps (block_k None: BLOCK_K_SM90 on sm_90+ GPUs, else BLOCK_K,
    scaled to the element size; splits 0: `key_splits` chooses)."""
    if block_k is None:
        hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
        # The tile sizes fit 16-bit inputs; fp32 tiles halve (and e4m3 ones double, up to the
        # head dim) so their shared memory stays the same or less (BLOCK_K_SM90 in fp32 asked
        # 256 KiB of the H200's 227).
        block_k = (BLOCK_K_SM90 if hopper else BLOCK_K) * 2 // q.element_size()
    first_q, end_q = (0, triton.cdiv(k.shape[2], config.q_block)) if q_blocks is None else q_blocks
    if head_scale is None:
        head_scale = torch.ones(q.shape[:2], device=q.device)
    if imprecise_acc is None:
        imprecise_acc = FP8_IMPRECISE_ACC[config.cell_score]
    both = antidiagonal_block_scores(
        q,
        k,
        head_scale.float().contiguous(),
        scale,
        config.stride,
        config.q_block,
        config.kv_block,
        chunk_elements,
        block_m,
        block_n,
        block_k,
        num_warps,
        num_stages,
        config.cell_score == "max",
        first_q,
        end_q,
        q_row0,
        splits,
        imprecise_acc,
    )
    return BlockEstimate(*both.unbind(0))
