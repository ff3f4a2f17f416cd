"""Stage 1 block scores: the chunked PyTorch path, and the choice between it and the kernel.

Both paths return what `reference.reference_tile_scores` defines. The PyTorch path runs two
passes over keys in chunks (row log-sum-exp, then normalised block sums), so memory stays
O(B·Hq·n·chunk + B·Hq·nKV) and never S×S.
"""

from __future__ import annotations

import torch

from flexsample.layout import Layout

#: Elements of one [B, Hq, n, chunk] logits tile of the PyTorch path: 16M fp32 = 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def tile_scores(
    q: torch.Tensor, k: torch.Tensor, layout: Layout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 per sampled tile: the attention mass of the tile's rows summed over its rows,
    outside the window per KV block `[B, Hq, tiles, nKV]` and inside it `[B, Hq, tiles]`
    (float32; divided by `tile_rows(layout)` each tile's covered + scores sum to 1).

    q `[B, Hq, S, D]`, k `[B, Hkv, S, D]` with Hq a multiple of Hkv (no copy of k for GQA);
    the Triton kernel where `layout.kernels`, else the PyTorch path.
    """
    if layout.kernels:
        from flexsample.kernels.sampling import triton_tile_scores

        return triton_tile_scores(q, k, layout, scale)
    return torch_tile_scores(q, k, layout, scale)


def tile_rows(layout: Layout) -> torch.Tensor:
    """Real sampled rows of each tile `[tiles]` (float32; tiles are never empty)."""
    return (layout.rows >= 0).sum(-1).float()


def block_scores(
    q: torch.Tensor, k: torch.Tensor, layout: Layout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores `[B, Hq, nKV]` and covered window mass `[B, Hq]` (float32): the mean over
    all sampled rows of `tile_scores` (ALGORITHM §2), so `covered + scores.sum(-1) == 1`."""
    return reduce_tiles(*tile_scores(q, k, layout, scale), layout)


def reduce_tiles(
    tile_mass: torch.Tensor, tile_covered: torch.Tensor, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile sums `[B, H, tiles, nKV]`, `[B, H, tiles]` -> means over all sampled rows."""
    n_rows = tile_rows(layout).sum()
    return tile_mass.sum(-2) / n_rows, tile_covered.sum(-1) / n_rows


def torch_tile_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    scale: float,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path of `tile_scores`, chunked over keys (`chunk_elements` logits a step)."""
    config = layout.config
    batch, heads, seq_len, dim = q.shape
    kv_heads, group = k.shape[1], heads // k.shape[1]
    # The padded tile table (pads are -1) keeps shapes static under torch.compile: pad rows
    # are computed on row 0 and weighted out; the row count is a tensor, so there is no sync.
    table = layout.rows.flatten()
    rows = table.clamp(min=0).long()
    n = rows.numel()
    real = (table >= 0).repeat(group).float()
    # Group query heads by their KV head: [B, Hkv, group * n, D] against k's [B, Hkv, chunk, D].
    qs = q[:, :, rows].float().reshape(batch, kv_heads, group * n, dim) * scale
    row_of = rows.repeat(group)  # sampled row of each grouped query

    kvb = config.kv_block
    num_kv_blocks = layout.num_kv_blocks
    chunk = max(1, chunk_elements // max(1, batch * heads * n * kvb)) * kvb

    def chunk_logits(start: int) -> torch.Tensor:
        keys = torch.arange(start, min(start + chunk, seq_len), device=q.device)
        logits = qs @ k[:, :, start : start + chunk].float().transpose(-1, -2)
        return logits.masked_fill(keys[None, :] > row_of[:, None], float("-inf"))

    row_max = torch.full((batch, kv_heads, group * n), float("-inf"), device=q.device)
    row_sum = torch.zeros_like(row_max)
    for start in range(0, seq_len, chunk):
        logits = chunk_logits(start)
        new_max = torch.maximum(row_max, logits.amax(-1))
        row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(
            logits - new_max[..., None]
        ).sum(-1)
        row_max = new_max
    lse = row_max + torch.log(row_sum)

    lo, hi = layout.win_lo, layout.win_hi
    row_block = row_of // config.q_block
    row_lo, row_hi = lo[row_block], hi[row_block]
    covered = torch.zeros_like(row_max)
    tiles, sample_block = layout.rows.shape
    scores = torch.zeros(batch, kv_heads, group, tiles, num_kv_blocks, device=q.device)
    for start in range(0, seq_len, chunk):
        logits = chunk_logits(start)
        probs = torch.exp(logits - lse[..., None]) * real[:, None]
        pad = (-probs.shape[-1]) % kvb
        blocks = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (-1, kvb)).sum(-1)
        block_idx = torch.arange(start // kvb, start // kvb + blocks.shape[-1], device=q.device)
        in_window = (block_idx[None, :] >= row_lo[:, None]) & (
            block_idx[None, :] <= row_hi[:, None]
        )
        covered += (blocks * in_window).sum(-1)
        outside = (blocks * ~in_window).unflatten(2, (group, tiles, sample_block)).sum(4)
        scores[..., block_idx] += outside
    scores = scores.reshape(batch, heads, tiles, num_kv_blocks)
    covered = covered.unflatten(2, (group, tiles, sample_block)).sum(4).reshape(batch, heads, tiles)
    return scores, covered
