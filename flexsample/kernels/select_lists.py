"""Triton kernel: the antidiagonal estimate -> each query block's kept blocks and the four block
lists of a causal `BlockMask`, one launch (ALGORITHM §9, selection).

`antidiagonal.select_blocks` followed by `block_mask.keep_lists` is the spec (same outputs, bit
for bit). Those are ~30 eager ops over `[B, H, nQ, nKV]` (a stable sort with int64 indices,
cumsums, scatters); before this kernel they took 4.2 ms (selection) + 2.6 ms (lists) of the
27.1 ms mask build at 128K on the H100 (2026-11-26; ALGORITHM §9). Here one program owns one
(batch, head, query block) row held in registers. The selection is exact integer arithmetic
(§9: the estimate in units of 2^-32 of the row's top power of two), so no sort is needed: a
bisection over the unit value finds the cut `v0` of the descending prefix (every block of `v0`
units or more is kept, and blocks of `v0 - 1` units are kept by index while the running sum
stays below the bar), and the result equals the sorted prefix whatever the order of the
additions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexsample.antidiagonal import UNIT_BITS as _UNIT_BITS
from flexsample.antidiagonal import BlockEstimate
from flexsample.config import SampleConfig

#: The longest row a program holds (int64 units in registers): 8192 key blocks = 1M tokens at
#: kv_block 128. Longer rows take the PyTorch path.
MAX_KV_BLOCKS = 8192
UNIT_BITS = tl.constexpr(_UNIT_BITS)
#: The bisection's range [1, 2^UNIT_BITS] and its steps (each halves it).
UNIT_END = tl.constexpr(1 << _UNIT_BITS)
STEPS = tl.constexpr(_UNIT_BITS)


@triton.jit
def _cut(units, other, covered, bar):
    """The chosen blocks `[BLOCK]` (bool): the other blocks of the shortest descending prefix
    (ties: lower index first) whose running sum, from `covered`, stays below `bar` before each.
    v0, the least unit value whose blocks (every other block of v0 units or more) keep the sum
    below the bar, by bisection; then blocks of v0 - 1 units by index while it stays below."""
    lo = tl.full([], 1, tl.int64)
    hi = tl.full([], UNIT_END, tl.int64)
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        above = covered + tl.sum(tl.where(other & (units >= mid), units, 0), 0)
        fits = above.to(tl.float64) < bar
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid + 1)
    before = covered + tl.sum(tl.where(other & (units >= hi), units, 0), 0)
    tie = other & (units == hi - 1)
    rank = (tl.cumsum(tie.to(tl.int64), 0) - 1) * (hi - 1)
    return other & ((units >= hi) | (tie & ((before + rank).to(tl.float64) < bar)))


@triton.jit
def _select_lists_kernel(
    EST,
    PEAK,
    KEEP,
    KV_NUM,
    KV_IDX,
    FULL_NUM,
    FULL_IDX,
    num_q,
    num_kv,
    seq_len,
    first_block,
    local_blocks,
    dense_tail,
    ALPHA,
    PEAK_BAR,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    USE_PEAK: tl.constexpr,
):
    qb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) * num_q + qb
    base = row * num_kv
    j = tl.arange(0, BLOCK)
    first = (first_block + qb) * Q_BLOCK
    last = tl.minimum(first + Q_BLOCK, seq_len) - 1
    causal = (j < num_kv) & (j <= last // KV_BLOCK)
    forced = causal & ((j >= first // KV_BLOCK - local_blocks) | (j == 0))
    forced = tl.where(last >= seq_len - dense_tail, causal, forced)
    if USE_PEAK:
        peak = tl.load(PEAK + base + j, mask=causal, other=0.0).to(tl.float64)
        forced = forced | (causal & (peak >= tl.load(PEAK_BAR)))
    other = causal & ~forced
    mass = tl.load(EST + base + j, mask=causal, other=0.0).to(tl.float64)
    # Units: mass * 2^(32 - e), e the row's frexp exponent (top < 2^e); a power-of-two scale
    # built from its bits is exact, and so is the truncation to int64.
    top = tl.max(mass, 0)
    exp = ((top.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
    biased = tl.where(top > 0, 1023 + UNIT_BITS - exp, 1023 + UNIT_BITS).to(tl.int64)
    scale = (biased << 52).to(tl.float64, bitcast=True)
    units = (mass * scale).to(tl.int64)
    total = tl.sum(units, 0)
    covered = tl.sum(tl.where(forced, units, 0), 0)
    bar = tl.where(total > 0, tl.load(ALPHA) * total.to(tl.float64), float("inf"))
    if KEEP_ALL:
        chosen = other
    else:
        chosen = _cut(units, other, covered, bar)
    keep = forced | chosen
    tl.store(KEEP + base + j, keep.to(tl.int8), mask=j < num_kv)
    full = keep & ((j + 1) * KV_BLOCK - 1 <= first)
    partial = keep & ~full
    num_full = tl.sum(full.to(tl.int32), 0)
    num_partial = tl.sum(partial.to(tl.int32), 0)
    # Disjoint slots: kept indices in ascending order, then zeros.
    tl.store(FULL_IDX + base + tl.cumsum(full.to(tl.int32), 0) - 1, j, mask=full)
    tl.store(KV_IDX + base + tl.cumsum(partial.to(tl.int32), 0) - 1, j, mask=partial)
    tail = j < num_kv
    tl.store(FULL_IDX + base + j, tl.zeros_like(j), mask=tail & (j >= num_full))
    tl.store(KV_IDX + base + j, tl.zeros_like(j), mask=tail & (j >= num_partial))
    tl.store(FULL_NUM + row, num_full)
    tl.store(KV_NUM + row, num_partial)


def triton_select_lists(
    estimate: BlockEstimate, seq_len: int, config: SampleConfig, first_block: int = 0
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Estimate (`[B, H, nQ, nKV]` float32 mass and peak) of query blocks `first_block`.. ->
    (keep `[B, H, nQ, nKV]` bool, (kv_num `[B, H, nQ]`, kv_idx `[B, H, nQ, nKV]`, full_num,
    full_idx) int32): `select_blocks` and `keep_lists`' result. nKV <= `MAX_KV_BLOCKS`."""
    est = estimate.mass
    batch, heads, num_q, num_kv = est.shape
    if num_kv > MAX_KV_BLOCKS:
        raise ValueError(f"{num_kv} key blocks: the kernel holds at most {MAX_KV_BLOCKS}")
    shape = (batch, heads, num_q)
    opts = {"dtype": torch.int32, "device": est.device}
    keep = torch.empty(est.shape, dtype=torch.bool, device=est.device)
    kv_num, full_num = torch.empty(shape, **opts), torch.empty(shape, **opts)
    kv_idx, full_idx = torch.empty(est.shape, **opts), torch.empty(est.shape, **opts)
    block = max(16, triton.next_power_of_2(num_kv))
    peak_bar = config.peak_bar(seq_len)
    as_float64 = {"dtype": torch.float64, "device": est.device}
    _select_lists_kernel[(num_q, batch * heads)](
        est.float().contiguous(),
        estimate.peak.float().contiguous(),
        keep.view(torch.int8),
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        num_q,
        num_kv,
        seq_len,
        first_block,
        config.local_blocks,
        config.dense_tail,
        # float64 from memory: a scalar float argument would arrive as float32, and the bar
        # alpha * total (and the peak bar) would then differ from the PyTorch path's.
        torch.full((1,), config.alpha, **as_float64),
        torch.full((1,), 0.0 if peak_bar is None else peak_bar, **as_float64),
        Q_BLOCK=config.q_block,
        KV_BLOCK=config.kv_block,
        BLOCK=block,
        KEEP_ALL=config.alpha >= 1.0,
        USE_PEAK=peak_bar is not None,
        num_warps=max(4, min(16, block // 256)),
    )
    return keep, (kv_num, kv_idx, full_num, full_idx)
