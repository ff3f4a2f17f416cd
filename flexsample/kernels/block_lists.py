"""Triton kernel: window ∪ stripes -> the four block lists of a causal `BlockMask`, one launch.

`mask.torch_block_lists` is the spec (same outputs, bit for bit). It is about 45 small eager
ops (cumsum, gather, where, clamps, casts over `[B, H, nQ, nKV]`), whose launch cost is a
roughly length-independent ~0.9 ms on the H100: 6% of the sparse attention at 64K, more than
the mask build can afford there (bench/results/mask_build.md). Here one program writes one
(batch, head, query block) row: the stripes below the row's window start, in ascending order
(a running count and `tl.cumsum` give each its slot), then the window range after them, and
the partial-block range. Slots are disjoint, so no two stores of a program overlap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_lists_kernel(
    STRIPES,
    LO,
    HI,
    KV_NUM,
    KV_IDX,
    FULL_NUM,
    FULL_IDX,
    num_q,
    num_kv,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(LO + qb)
    hi = tl.load(HI + qb)
    # The last KV block that ends before the query block's first row (full, not partial).
    last_full = tl.maximum((qb * Q_BLOCK + 1) // KV_BLOCK - 1, lo - 1)
    row = bh.to(tl.int64) * num_q + qb
    out = row * num_kv
    below = tl.zeros([], tl.int32)
    for start in range(0, lo, BLOCK):
        j = start + tl.arange(0, BLOCK)
        stripe = tl.load(STRIPES + bh.to(tl.int64) * num_kv + j, mask=j < lo, other=0) != 0
        slot = below + tl.cumsum(stripe.to(tl.int32), 0) - 1
        tl.store(FULL_IDX + out + slot, j, mask=stripe)
        below += tl.sum(stripe.to(tl.int32), 0)
    partial_first = tl.maximum(lo, last_full + 1)
    for start in range(0, num_kv, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        inside = slot < num_kv
        window = tl.minimum(lo + slot - below, num_kv - 1)
        tl.store(FULL_IDX + out + slot, window, mask=inside & (slot >= below))
        tl.store(KV_IDX + out + slot, tl.minimum(partial_first + slot, num_kv - 1), mask=inside)
    tl.store(FULL_NUM + row, below + tl.minimum(hi, last_full) - lo + 1)
    tl.store(KV_NUM + row, hi - partial_first + 1)


def triton_block_lists(
    stripes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q_block: int, kv_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stripes `[B, H, nKV]` (bool), window bounds `[nQ]` -> (kv_num `[B, H, nQ]`, kv_idx
    `[B, H, nQ, nKV]`, full_num, full_idx), int32: `mask.torch_block_lists`'s result."""
    batch, heads, num_kv = stripes.shape
    num_q = lo.shape[0]
    shape = (batch, heads, num_q)
    opts = {"dtype": torch.int32, "device": stripes.device}
    kv_num, full_num = torch.empty(shape, **opts), torch.empty(shape, **opts)
    kv_idx, full_idx = torch.empty(*shape, num_kv, **opts), torch.empty(*shape, num_kv, **opts)
    _block_lists_kernel[(num_q, batch * heads)](
        stripes.contiguous().view(torch.uint8),
        lo.to(torch.int32),
        hi.to(torch.int32),
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        num_q,
        num_kv,
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        BLOCK=min(1024, max(16, triton.next_power_of_2(num_kv))),
    )
    return kv_num, kv_idx, full_num, full_idx
