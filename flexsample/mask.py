"""Scores -> stage-2 selection -> window ∪ stripes -> `BlockMask`, all on-device.

Vectorised tensor code only (sort, cumsum, scatter): no loop over heads or blocks and no host
sync, so it runs inside `torch.compile(fullgraph=True)`. Indices are built from the keep matrix
with a cumsum-scatter instead of an argsort (DESIGN §7: the sort costs more).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexsample.config import SampleConfig


def sampled_causal_mask_mod(keep: torch.Tensor, config: SampleConfig):
    """mask_mod of a keep matrix `[B, H, nQ, nKV]`: causal and inside a kept block.

    The block lists already skip dropped blocks in the fused kernel (which calls this only on
    partial, i.e. diagonal, blocks); flex_attention's unfused path reads only the mask_mod, so
    the block lookup is what makes both paths compute the same function.
    """

    def sampled_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & keep[b, h, q_idx // config.q_block, kv_idx // config.kv_block]

    return sampled_causal


def select_stripes(
    scores: torch.Tensor, covered: torch.Tensor, config: SampleConfig
) -> torch.Tensor:
    """Stripe blocks `[B, H, nKV]` (bool): the shortest prefix of blocks by descending score
    (ties: lower index first) with `covered + kept >= alpha`; alpha = 1 keeps all."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    # float64 running sum: decisions at the alpha boundary match the reference's exactly.
    running = torch.cat([covered[..., None], sorted_scores[..., :-1]], -1).double()
    keep_sorted = torch.cumsum(running, -1) < config.alpha  # mass kept before each block
    if config.alpha >= 1.0:
        keep_sorted = torch.ones_like(keep_sorted)
    if config.max_stripe_ratio is not None:
        cap = int(config.max_stripe_ratio * scores.shape[-1])
        keep_sorted &= torch.arange(scores.shape[-1], device=scores.device) < cap
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def block_keep(stripes: torch.Tensor, seq_len: int, config: SampleConfig) -> torch.Tensor:
    """Kept blocks `[B, H, nQ, nKV]`: window blocks ∪ stripes, within each block's causal limit."""
    lo, hi = config.window_blocks(seq_len, stripes.device)
    kv = torch.arange(stripes.shape[-1], device=stripes.device)
    in_window = (kv >= lo[:, None]) & (kv <= hi[:, None])
    causal = kv <= hi[:, None]
    return in_window | (stripes[:, :, None, :] & causal)


def _full_blocks(seq_len: int, config: SampleConfig, device: torch.device) -> torch.Tensor:
    """`[nQ, nKV]`: blocks whose every key precedes the block's first query (no mask_mod work)."""
    q_first = torch.arange(math.ceil(seq_len / config.q_block), device=device) * config.q_block
    kv_last = (
        torch.arange(math.ceil(seq_len / config.kv_block), device=device) + 1
    ) * config.kv_block - 1
    return kv_last[None, :] <= q_first[:, None]


def _to_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[..., nKV]` -> (counts `[...]`, ascending indices `[..., nKV]`), int32, no sort."""
    num_kv = selected.shape[-1]
    counts = selected.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(selected, -1, dtype=torch.int32) - 1
    slot = torch.where(selected, slot, num_kv)  # unselected entries land in a spill column
    kv = torch.arange(num_kv, device=selected.device, dtype=torch.int32).expand_as(slot)
    indices = torch.zeros(
        *selected.shape[:-1], num_kv + 1, dtype=torch.int32, device=selected.device
    )
    indices.scatter_(-1, slot.long(), kv)
    return counts, indices[..., :num_kv]


def keep_to_block_mask(
    keep: torch.Tensor, seq_len: int, config: SampleConfig, *, compute_q_blocks: bool = False
) -> BlockMask:
    """Wrap a keep matrix `[B, H, nQ, nKV]` as a causal `BlockMask` with full/partial split."""
    full = _full_blocks(seq_len, config, keep.device)
    kv_num, kv_idx = _to_indices(keep & ~full)
    full_num, full_idx = _to_indices(keep & full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(config.q_block, config.kv_block),
        mask_mod=sampled_causal_mask_mod(keep, config),
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=compute_q_blocks,
    )


def build_block_mask(
    scores: torch.Tensor,
    covered: torch.Tensor,
    seq_len: int,
    config: SampleConfig,
    *,
    compute_q_blocks: bool = False,
) -> BlockMask:
    """Stage 2 and step 4: block scores `[B, H, nKV]` and covered `[B, H]` -> `BlockMask`."""
    keep = block_keep(select_stripes(scores, covered, config), seq_len, config)
    return keep_to_block_mask(keep, seq_len, config, compute_q_blocks=compute_q_blocks)


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


def _causal_pairs_upto(x: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Pairs (i, j) with i <= x, first <= j <= last, j <= i (float64, broadcasting)."""
    width = last - first + 1
    inside = torch.clamp(torch.minimum(x, last) - first + 1, min=0)
    return inside * (inside + 1) / 2 + torch.clamp(x - last, min=0) * width


def density(block_mask: BlockMask) -> torch.Tensor:
    """Kept share of the causal (query, key) pairs, per batch and head: `[B, H]` float32."""
    seq_q, seq_kv = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    keep = kept_blocks(block_mask)
    opts = {"device": keep.device, "dtype": torch.float64}
    row_first = torch.arange(keep.shape[-2], **opts)[:, None] * q_block
    row_last = torch.clamp(row_first + q_block - 1, max=seq_q - 1)
    key_first = torch.arange(keep.shape[-1], **opts)[None, :] * kv_block
    key_last = torch.clamp(key_first + kv_block - 1, max=seq_kv - 1)
    pairs = _causal_pairs_upto(row_last, key_first, key_last) - _causal_pairs_upto(
        row_first - 1, key_first, key_last
    )
    total = seq_q * (seq_q + 1) / 2
    return ((keep.double() * pairs).sum((-1, -2)) / total).float()
