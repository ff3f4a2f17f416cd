"""Window ∪ stripes -> `BlockMask`, on-device, and the block/token views of a BlockMask.

Vectorised tensor code only (cumsum, gather): no loop over heads or blocks and no host sync,
so it runs inside `torch.compile(fullgraph=True)`. The block indices come from the mask's
structure (a sorted stripe list and a window range), not from a sort or a scan over
`[B, H, nQ, nKV]` (ALGORITHM §4).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexsample.config import SampleConfig
from flexsample.layout import Layout


def sampled_causal_mask_mod(stripes: torch.Tensor, win_lo: torch.Tensor, config: SampleConfig):
    """mask_mod of a SampleAttention mask: causal, and the key's block is a stripe or at or
    after the query block's window start `win_lo[nQ]` (the causal rule bounds it above).

    The block lists already skip dropped blocks in the fused kernel (which calls this only on
    partial, i.e. diagonal, blocks); flex_attention's unfused path reads only the mask_mod, so
    the block rule here is what makes both paths compute the same function.
    """

    def sampled_causal(b, h, q_idx, kv_idx):
        kv_block = kv_idx // config.kv_block
        kept = (kv_block >= win_lo[q_idx // config.q_block]) | stripes[b, h, kv_block]
        return (q_idx >= kv_idx) & kept

    return sampled_causal


def build_block_mask(
    stripes: torch.Tensor, layout: Layout, *, compute_q_blocks: bool = False
) -> BlockMask:
    """Window ∪ stripes `[B, H, nKV]` -> causal `BlockMask` (step 4), from the structure.

    The block lists come from the Triton kernel where `layout.kernels`, else from
    `torch_block_lists`.
    """
    config = layout.config
    if layout.kernels:
        from flexsample.kernels.block_lists import triton_block_lists

        lists = triton_block_lists(
            stripes, layout.win_lo, layout.win_hi, config.q_block, config.kv_block
        )
    else:
        lists = torch_block_lists(stripes, layout)
    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=(config.q_block, config.kv_block),
        mask_mod=sampled_causal_mask_mod(stripes, layout.win_lo, config),
        seq_lengths=(layout.seq_len, layout.seq_len),
        compute_q_blocks=compute_q_blocks,
    )


def with_causal_mask_mod(block_mask: BlockMask) -> BlockMask:
    """The same block lists under a plain causal `mask_mod` that captures nothing.

    Exact for flexsample's own masks only: their partial blocks are the diagonal ones, where
    the sampled rule is the causal one. Flex's fused kernels read the mask_mod only on partial
    blocks, so there the kernel skips the sampled rule's gathers, and the compiled flex has no
    captured tensors to guard on.
    """
    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=_causal,
        seq_lengths=block_mask.seq_lengths,
        compute_q_blocks=False,  # forward only; its vmap fails under the op's dispatch guard
    )


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def torch_block_lists(
    stripes: torch.Tensor, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stripes `[B, H, nKV]` (bool) and window bounds `[nQ]` -> (kv_num `[B, H, nQ]`, kv_idx
    `[B, H, nQ, nKV]`, full_num, full_idx), int32: the partial and full block lists.

    Query block qb keeps the stripes below its window start `lo` (all full blocks: they end
    before qb's first row) and the window `[lo, hi]`, whose blocks up to `last_full` (the last
    block ending before qb's first row) are full and the rest partial. So the full indices are
    a gather from the ascending stripe list followed by a range, and the partial ones a range.
    """
    config, lo, hi = layout.config, layout.win_lo, layout.win_hi
    num_kv = stripes.shape[-1]
    device = stripes.device
    first_row = torch.arange(len(lo), device=device) * config.q_block
    last_full = torch.maximum((first_row + 1) // config.kv_block - 1, lo - 1)
    slot = torch.arange(num_kv, device=device)

    before = torch.nn.functional.pad(torch.cumsum(stripes, -1), (1, 0))
    below = before[..., lo]  # [B, H, nQ]: stripes below each window start
    from_window = (lo[:, None] + slot - below[..., None]).clamp(0, num_kv - 1)
    full_idx = torch.where(slot < below[..., None], _ascending(stripes)[:, :, None, :], from_window)
    full_num = below + (torch.minimum(hi, last_full) - lo + 1)
    partial_first = torch.maximum(lo, last_full + 1)
    kv_num = (hi - partial_first + 1).expand_as(full_num)
    kv_idx = (partial_first[:, None] + slot).clamp(max=num_kv - 1).expand_as(full_idx)
    return tuple(x.to(torch.int32) for x in (kv_num, kv_idx, full_num, full_idx))


def keep_block_mask(
    keep: torch.Tensor,
    seq_len: int,
    config: SampleConfig,
    *,
    compute_q_blocks: bool = True,
    rows: torch.Tensor | None = None,
    lists: tuple[torch.Tensor, ...] | None = None,
) -> BlockMask:
    """Any causal block keep matrix `[B, H, nQ, nKV]` -> `BlockMask`, on-device with no host
    sync: the antidiagonal estimator's masks and comparison masks (SampleAttention's own masks
    use `build_block_mask`). Blocks ending before the query block's first row are full, the
    rest partial, so with q_block == kv_block the partial blocks are the diagonal ones.
    `rows` `[L]` (int64): the global row of each query row, whose blocks start on block
    boundaries (a context-parallel shard; Q_LEN = L, KV_LEN = seq_len); None: rows 0..S-1.
    `lists`: `keep_lists` of `keep`, where the caller has them (the selection kernel)."""
    num_q = keep.shape[-2]
    if rows is None:
        q_len = seq_len
    else:
        q_len = rows.shape[0]
    if lists is None:
        if rows is None:
            first_row = torch.arange(num_q, device=keep.device) * config.q_block
        else:
            first_row = rows[:: config.q_block][:num_q]
        lists = keep_lists(keep, first_row, config.kv_block)

    def kept_causal(b, h, q_idx, kv_idx):
        row = q_idx if rows is None else rows[q_idx]
        return (row >= kv_idx) & keep[b, h, q_idx // config.q_block, kv_idx // config.kv_block]

    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=(config.q_block, config.kv_block),
        mask_mod=kept_causal,
        seq_lengths=(q_len, seq_len),
        compute_q_blocks=compute_q_blocks,
    )


def keep_lists(
    keep: torch.Tensor, first_row: torch.Tensor, kv_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep matrix `[B, H, nQ, nKV]` and each query block's first row `[nQ]` -> (kv_num
    `[B, H, nQ]`, kv_idx `[B, H, nQ, nKV]`, full_num, full_idx), int32: a kept block is full if
    it ends before the query block's first row, else partial; indices ascending, then zeros."""
    last_key = (torch.arange(keep.shape[-1], device=keep.device) + 1) * kv_block - 1
    full = keep & (last_key <= first_row[:, None])
    partial = keep & ~full
    return (
        partial.sum(-1, dtype=torch.int32),
        _ascending(partial).to(torch.int32),
        full.sum(-1, dtype=torch.int32),
        _ascending(full).to(torch.int32),
    )


def _ascending(selected: torch.Tensor) -> torch.Tensor:
    """Bool `[..., n]` -> its selected indices in ascending order, then zeros: `[..., n]`."""
    n = selected.shape[-1]
    slot = torch.where(selected, torch.cumsum(selected, -1) - 1, n)
    out = torch.zeros(*selected.shape[:-1], n + 1, dtype=torch.long, device=selected.device)
    out.scatter_(-1, slot, torch.arange(n, device=selected.device).expand_as(slot))
    return out[..., :n]


def kept_blocks(block_mask: BlockMask) -> torch.Tensor:
    """Keep matrix `[B, H, nQ, nKV]` (bool) of a BlockMask, partial and full blocks together."""
    num_kv = block_mask.kv_indices.shape[-1]
    keep = torch.zeros(
        *block_mask.kv_num_blocks.shape,
        num_kv + 1,
        dtype=torch.bool,
        device=block_mask.kv_indices.device,
    )
    pairs = [(block_mask.kv_num_blocks, block_mask.kv_indices)]
    if block_mask.full_kv_num_blocks is not None:
        pairs.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    for counts, indices in pairs:
        valid = torch.arange(num_kv, device=indices.device) < counts[..., None]
        keep.scatter_(-1, torch.where(valid, indices, num_kv).long(), True)
    return keep[..., :num_kv]


def token_mask(block_mask: BlockMask) -> torch.Tensor:
    """Token-level mask `[B, H, S, S]` (bool) of a causal block mask: kept block and j <= i."""
    seq_q, seq_kv = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    keep = kept_blocks(block_mask)
    rows = torch.arange(seq_q, device=keep.device)
    keys = torch.arange(seq_kv, device=keep.device)
    return keep[:, :, rows // q_block][..., keys // kv_block] & (keys[None, :] <= rows[:, None])
