"""Triton kernels for stage 1: exact softmax of the sampled rows, summed per KV block.

A tile is `sample_block` contiguous sampled rows of every query head that shares one KV head
(GQA without copying K): `group * sample_block` rows, which fills a tensor-core tile for
Llama-like groups (4 x 16 = 64 rows). Two launches, each program one (tile, KV head, split)
where a split is `SPLIT_BLOCKS` KV blocks of the tile's causal prefix:

1. `_block_lse_kernel`: one QK^T per KV block of the split gives each row's block-local
   log-sum-exp (a block-local max, so no rescaling is needed later), stored in a
   `[tile rows, nKV]` scratch slice; the same values feed the split's online (max, sum) of
   the row (FlashAttention's recurrence on one number per block), stored per split;
2. `_block_mass_kernel`: combines the splits' partials into each row's log-sum-exp, then
   reads its split of the scratch back: a block's probability mass in a row is
   `exp2(lse_block - lse_row)`. The mass inside the row's own window blocks goes to
   `covered`, the rest is summed over the tile's rows into that block's score.

Why this formulation: a block's score is a sum over rows of probabilities normalised by each
row's final sum, which is only known after the last block. An earlier version recomputed
QK^T in a second pass (twice the tensor-core and exp2 work, measured 6.3 ms at 128K on the
H100); keeping one fp32 per (sampled row, KV block) instead costs `n * S / kv_block` floats
per head (172 MB at 128K with Llama-3-8B's 32 heads and 1% sampling, no S x S or n x S
tensor), written and read once. Splitting the keys (as flash-decoding does) bounds a
program's serial loop: with one program per tile, the longest tile's loop over the whole
prefix set the kernel's time at 64K (the causal triangle leaves most SMs idle at the end).
Programs run in order of decreasing tile length (longest-processing-time first). Every
(head, tile, block) partial sum and (head, tile, split) covered sum is written by exactly one
program and reduced with `torch.sum`: no atomics, so results do not depend on launch order.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from flexsample.layout import Layout

#: Warps and pipeline stages of the first kernel, chosen on the H100 with bench/score_kernel.py
#: (64 blocks, 4 warps, 3 stages within 1% of the best at 64K and 128K; results there).
NUM_WARPS, NUM_STAGES = 4, 3
#: KV blocks per program of the first kernel (a tile's causal prefix is split in such chunks).
SPLIT_BLOCKS = 64


@triton.jit
def _program(num_tiles, kv_heads):
    # Longest tiles first (tiles ascend in rows, so in causal length), for every KV head: the
    # short ones then fill the last wave instead of long ones running alone at the end.
    groups = tl.num_programs(0) // num_tiles
    tile = num_tiles - 1 - tl.program_id(0) // groups
    b = tl.program_id(0) % groups // kv_heads
    kvh = tl.program_id(0) % groups % kv_heads
    return tile, b, kvh, tl.program_id(1)


@triton.jit
def _tile_rows(
    ROWS,
    tile,
    b,
    kvh,
    kv_heads,
    num_tiles,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    SB: tl.constexpr,
    SB_PAD: tl.constexpr,
):
    """The tile's rows for each head of the group: (slot in tile, row or -1, valid, head,
    head exists (G_PAD pads the group), (batch, head, tile) index of the scratch rows)."""
    offs_m = tl.arange(0, G_PAD * SB_PAD)
    g = offs_m // SB_PAD
    r = offs_m % SB_PAD
    row = tl.load(ROWS + tile * SB + r, mask=r < SB, other=-1)
    valid = (row >= 0) & (g < GROUP)
    head = kvh * GROUP + g
    row_id = (b * kv_heads * GROUP + head).to(tl.int64) * num_tiles + tile
    return r, tl.where(valid, row, -1), valid, head, g < GROUP, row_id


@triton.jit
def _split_blocks(row, split, chunk, KV_BLOCK: tl.constexpr):
    """This program's KV blocks `[first, last)`: its split of the tile's causal prefix."""
    first = split * chunk
    return first, tl.minimum(first + chunk, tl.max(row) // KV_BLOCK + 1)


@triton.jit
def _block_lse_kernel(
    Q,
    K,
    ROWS,
    BLOCK_LSE,
    PART_M,
    PART_L,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    seq_len,
    kv_heads,
    num_tiles,
    num_kv_blocks,
    num_splits,
    chunk,
    scale_log2e,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    SB: tl.constexpr,
    SB_PAD: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile, b, kvh, split = _program(num_tiles, kv_heads)
    r, row, valid, head, head_ok, row_id = _tile_rows(
        ROWS, tile, b, kvh, kv_heads, num_tiles, GROUP, G_PAD, SB, SB_PAD
    )
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    # int64 offsets: at 1M tokens head * stride_qh (32 heads x S x D) passes 2^31.
    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + row[:, None].to(tl.int64) * stride_qs
        + offs_d[None, :] * stride_qd,
        mask=valid[:, None] & d_ok,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    first, last = _split_blocks(row, split, chunk, KV_BLOCK)
    # Scratch layout [B, Hq, tiles, nKV, SB_PAD]: one block's rows are contiguous per head.
    lse_ptr = BLOCK_LSE + row_id * (num_kv_blocks * SB_PAD) + r

    m_i = tl.full([G_PAD * SB_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD * SB_PAD], tl.float32)
    for kb in range(first, last):
        offs_n = kb * KV_BLOCK + tl.arange(0, KV_BLOCK)
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :] * stride_kd,
            mask=(offs_n[:, None] < seq_len) & d_ok,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        # fp32 cast: under inductor a float argument arrives as fp64 and would promote s.
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e).to(tl.float32)
        s = tl.where(offs_n[None, :] <= row[:, None], s, float("-inf"))
        m_b = tl.max(s, 1)
        m_b_ref = tl.where(m_b == float("-inf"), 0.0, m_b)  # rows with no key in this block
        lse_b = m_b_ref + tl.log2(tl.sum(tl.exp2(s - m_b_ref[:, None]), 1))  # -inf if none
        tl.store(lse_ptr + kb * SB_PAD, lse_b, mask=head_ok)
        m_new = tl.maximum(m_i, m_b)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.exp2(lse_b - m_ref)
        m_i = m_new
    # Partial (max, sum) layout [B, Hq, tiles, splits, SB_PAD]; l_i is relative to m_i.
    part = (row_id * num_splits + split) * SB_PAD + r
    tl.store(PART_M + part, m_i, mask=head_ok)
    tl.store(PART_L + part, l_i, mask=head_ok)


@triton.jit
def _block_mass_kernel(
    ROWS,
    WIN_LO,
    WIN_HI,
    BLOCK_LSE,
    PART_M,
    PART_L,
    SCORES,
    COVERED,
    kv_heads,
    num_tiles,
    num_kv_blocks,
    num_splits,
    chunk,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    SB: tl.constexpr,
    SB_PAD: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
):
    tile, b, kvh, split = _program(num_tiles, kv_heads)
    r, row, valid, _, head_ok, row_id = _tile_rows(
        ROWS, tile, b, kvh, kv_heads, num_tiles, GROUP, G_PAD, SB, SB_PAD
    )
    # Each row's log-sum-exp over all keys, from the splits' partials.
    part = row_id * num_splits * SB_PAD + r
    m = tl.full([G_PAD * SB_PAD], float("-inf"), tl.float32)
    for sp in range(0, num_splits):
        m = tl.maximum(m, tl.load(PART_M + part + sp * SB_PAD, mask=head_ok, other=float("-inf")))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([G_PAD * SB_PAD], tl.float32)
    for sp in range(0, num_splits):
        m_s = tl.load(PART_M + part + sp * SB_PAD, mask=head_ok, other=float("-inf"))
        l_s = tl.load(PART_L + part + sp * SB_PAD, mask=head_ok, other=0.0)
        total += l_s * tl.exp2(m_s - m_ref)
    # +inf for rows without keys (padding): every exp2(lse_b - lse) below is then 0, not NaN.
    lse = tl.where(total > 0, m_ref + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))

    lse_ptr = BLOCK_LSE + row_id * (num_kv_blocks * SB_PAD) + r
    q_block = tl.where(valid, row // Q_BLOCK, 0)
    win_lo = tl.load(WIN_LO + q_block, mask=valid, other=0)
    win_hi = tl.load(WIN_HI + q_block, mask=valid, other=-1)
    g_out = tl.arange(0, G_PAD)
    out_base = (b * kv_heads * GROUP + kvh * GROUP + g_out) * num_tiles + tile
    covered = tl.zeros([G_PAD * SB_PAD], tl.float32)
    first, last = _split_blocks(row, split, chunk, KV_BLOCK)
    for kb in range(first, last):
        lse_b = tl.load(lse_ptr + kb * SB_PAD, mask=head_ok, other=float("-inf"))
        mass = tl.where(valid, tl.exp2(lse_b - lse), 0.0)
        in_window = (kb >= win_lo) & (kb <= win_hi)
        covered += tl.where(in_window, mass, 0.0)
        outside = tl.sum(tl.reshape(tl.where(in_window, 0.0, mass), (G_PAD, SB_PAD)), 1)
        tl.store(SCORES + out_base * num_kv_blocks + kb, outside, mask=g_out < GROUP)
    covered_head = tl.sum(tl.reshape(covered, (G_PAD, SB_PAD)), 1)
    tl.store(COVERED + out_base * num_splits + split, covered_head, mask=g_out < GROUP)


@triton_op("flexsample::sample_block_scores", mutates_args=())
def sample_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    win_lo: torch.Tensor,
    win_hi: torch.Tensor,
    scale: float,
    q_block: int,
    kv_block: int,
    split_blocks: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, Hq, S, D]`, k `[B, Hkv, S, D]`, rows `[tiles, sample_block]` (int32, -1 pads),
    window block bounds `[nQ]` (int32) -> per-tile sums over the tile's rows: (mass outside
    the window per KV block `[B, Hq, tiles, nKV]`, window mass `[B, Hq, tiles]`), fp32.
    `split_blocks` KV blocks per program; `num_warps`, `num_stages` of the first kernel."""
    batch, heads, seq_len, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    num_tiles, sample_block = rows.shape
    num_kv_blocks = triton.cdiv(seq_len, kv_block)
    chunk = split_blocks
    num_splits = triton.cdiv(num_kv_blocks, chunk)
    # Zeros: programs write only blocks up to their tile's causal limit.
    partial = torch.zeros(batch, heads, num_tiles, num_kv_blocks, device=q.device)
    covered = torch.zeros(batch, heads, num_tiles, num_splits, device=q.device)
    sb_pad = triton.next_power_of_2(sample_block)
    block_lse = torch.empty(batch, heads, num_tiles, num_kv_blocks, sb_pad, device=q.device)
    part_m = torch.empty(batch, heads, num_tiles, num_splits, sb_pad, device=q.device)
    part_l = torch.empty_like(part_m)
    upcast = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    grid = (num_tiles * batch * kv_heads, num_splits)
    tile_args = dict(
        GROUP=group,
        G_PAD=triton.next_power_of_2(group),
        SB=sample_block,
        SB_PAD=sb_pad,
        KV_BLOCK=kv_block,
    )
    wrap_triton(_block_lse_kernel)[grid](
        q,
        k,
        rows,
        block_lse,
        part_m,
        part_l,
        *q.stride(),
        *k.stride(),
        seq_len,
        kv_heads,
        num_tiles,
        num_kv_blocks,
        num_splits,
        chunk,
        scale * math.log2(math.e),
        HEAD_DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32",
        **tile_args,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    wrap_triton(_block_mass_kernel)[grid](
        rows,
        win_lo,
        win_hi,
        block_lse,
        part_m,
        part_l,
        partial,
        covered,
        kv_heads,
        num_tiles,
        num_kv_blocks,
        num_splits,
        chunk,
        Q_BLOCK=q_block,
        **tile_args,
    )
    return partial, covered.sum(3)


def triton_tile_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    scale: float,
    *,
    split_blocks: int = SPLIT_BLOCKS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.tile_scores` through the Triton kernel (same result); launch knobs for sweeps."""
    config = layout.config
    return sample_block_scores(
        q,
        k,
        layout.rows,
        layout.win_lo.to(torch.int32),
        layout.win_hi.to(torch.int32),
        scale,
        config.q_block,
        config.kv_block,
        split_blocks,
        num_warps,
        num_stages,
    )
