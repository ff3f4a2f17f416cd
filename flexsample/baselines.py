"""Simpler sparse patterns at a given density, to compare SampleAttention against.

Each returns a block keep matrix `[B, Hq, nQ, nKV]` (causal, diagonal blocks always kept so
that every row has a key) whose density per head is the smallest its pattern can reach at or
above the target, so the comparison never favours flexsample:
- `window_sink`: key block 0 plus the nearest w block diagonals (StreamingLLM, Xiao et al.
  2023);
- `oracle_columns`: SampleAttention's window, then the key blocks of largest exact column
  mass over all rows; it needs the full attention, so it is the ceiling of stage 2 (what
  the sampled estimate could select at best), not a method;
- `vertical_slash`: key blocks and block diagonals ranked by the attention of the last 64
  queries (MInference's vertical-slash estimate, Jiang et al. 2024), merged by score.
A pattern is a rank for every key block (a column) and every block diagonal; keeping the c
best ranked candidates grows the mask monotonically, so c is found by bisection per head.
"""

from __future__ import annotations

import torch

from flexsample.config import SampleConfig
from flexsample.metrics import block_density, block_mass, causal_probs, column_mass

_NEVER = torch.iinfo(torch.int64).max // 2


def _blocks(seq_len: int, config: SampleConfig) -> tuple[int, int]:
    if config.q_block != config.kv_block:
        raise ValueError(
            f"baselines need q_block == kv_block, got {config.q_block} and {config.kv_block}"
        )
    num = -(-seq_len // config.kv_block)
    return num, num


def _keep(column_rank: torch.Tensor, diagonal_rank: torch.Tensor, count: torch.Tensor):
    """Causal blocks whose column or diagonal is among the `count` [B, H] best, plus the
    diagonal; ranks are `[B, H, nKV]` and `[B, H, nQ]` (diagonal d = query block - key block)."""
    num_q, num_kv = diagonal_rank.shape[-1], column_rank.shape[-1]
    offset = torch.arange(num_q, device=count.device)[:, None] - torch.arange(
        num_kv, device=count.device
    )
    causal = offset >= 0
    limit = count[..., None, None]
    by_column = column_rank[..., None, :] < limit
    by_diagonal = diagonal_rank[..., offset.clamp(min=0)] < limit
    return causal & ((offset == 0) | by_column | by_diagonal)


def _grow_to(
    column_rank: torch.Tensor,
    diagonal_rank: torch.Tensor,
    target: torch.Tensor,
    seq_len: int,
    config: SampleConfig,
) -> torch.Tensor:
    """The keep matrix of the fewest best candidates whose density reaches `target` [B, H]."""
    lo = torch.zeros_like(target, dtype=torch.long)
    hi = torch.full_like(lo, column_rank.shape[-1] + diagonal_rank.shape[-1])

    def dens(count: torch.Tensor) -> torch.Tensor:
        keep = _keep(column_rank, diagonal_rank, count)
        return block_density(keep, seq_len, seq_len, config.q_block, config.kv_block)

    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        enough = dens(mid) >= target
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return _keep(column_rank, diagonal_rank, hi)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of the last dim, 0 for the largest (ties by position)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def window_sink(target: torch.Tensor, seq_len: int, config: SampleConfig) -> torch.Tensor:
    """Sink block + local block diagonals reaching density `target` `[B, Hq]`."""
    num_q, num_kv = _blocks(seq_len, config)
    shape = (*target.shape, num_kv)
    column_rank = torch.full(shape, _NEVER, dtype=torch.long, device=target.device)
    column_rank[..., 0] = 0
    diagonal_rank = torch.arange(num_q, device=target.device).expand(*target.shape, num_q)
    return _grow_to(column_rank, diagonal_rank, target, seq_len, config)


def oracle_columns(
    q: torch.Tensor,
    k: torch.Tensor,
    target: torch.Tensor,
    config: SampleConfig,
    scale: float | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """The window's block diagonals, then the key blocks of largest exact column mass
    (`column_mass`, computed unless given), reaching `target` `[B, Hq]`."""
    num_q, _ = _blocks(q.shape[2], config)
    window = -(-config.window_tokens(q.shape[2]) // config.kv_block)
    diagonal = torch.arange(num_q, device=q.device)
    diagonal_rank = torch.where(diagonal < window, diagonal, _NEVER).expand(*target.shape, num_q)
    mass = column_mass(q, k, config, scale) if mass is None else mass
    column_rank = window + _rank(mass)
    return _grow_to(column_rank, diagonal_rank, target, q.shape[2], config)


def vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    target: torch.Tensor,
    config: SampleConfig,
    scale: float | None = None,
    last_queries: int = 64,
) -> torch.Tensor:
    """MInference's estimate: columns and diagonals by the last `last_queries` rows' mass."""
    seq_len = q.shape[2]
    num_q, num_kv = _blocks(seq_len, config)
    rows = torch.arange(max(0, seq_len - last_queries), seq_len, device=q.device)
    probs = torch.cat([chunk for _, chunk in causal_probs(q, k, scale, rows)], -2)
    keys = torch.arange(seq_len, device=q.device)
    vertical = torch.zeros(*q.shape[:2], num_kv, device=q.device)
    vertical.index_add_(-1, keys // config.kv_block, probs.sum(-2))
    # Token diagonal t = i - j, pooled into block diagonals of kv_block tokens.
    diagonal_of = ((rows[:, None] - keys[None, :]).clamp(min=0) // config.kv_block).flatten()
    slash = torch.zeros(*q.shape[:2], num_q, device=q.device)
    slash.index_add_(-1, diagonal_of, probs.flatten(-2))
    rank = _rank(torch.cat([vertical, slash], -1))
    return _grow_to(rank[..., :num_kv], rank[..., num_kv:], target, seq_len, config)


def oracle_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    target: torch.Tensor,
    config: SampleConfig,
    scale: float | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diagonal blocks, then the causal blocks of largest exact attention mass
    (`block_mass`, computed unless given), the shortest such prefix per head whose density
    reaches `target` `[B, Hq]`: keep `[B, Hq, nQ, nKV]`. The ceiling of any block mask that
    ranks blocks by their mass (it needs the full attention, so it is not a method)."""
    seq_len = q.shape[2]
    num_q, num_kv = _blocks(seq_len, config)
    mass = block_mass(q, k, config, scale) if mass is None else mass
    offset = torch.arange(num_q, device=q.device)[:, None] - torch.arange(num_kv, device=q.device)
    diagonal = (offset == 0).expand_as(mass)
    candidate = offset > 0
    # Blocks below the diagonal are whole: rows(qb) x kv_block causal pairs each.
    rows = (seq_len - torch.arange(num_q, device=q.device) * config.q_block).clamp(
        max=config.q_block
    )
    pairs = (rows[:, None] * config.kv_block * candidate).double().flatten()
    total = seq_len * (seq_len + 1) / 2
    base = block_density(diagonal, seq_len, seq_len, config.q_block, config.kv_block).double()
    score = mass.masked_fill(~candidate, float("-inf")).flatten(-2)
    order = score.argsort(dim=-1, descending=True, stable=True)
    kept_before = torch.cumsum(pairs[order], -1) - pairs[order]  # density kept before each
    keep_sorted = (base[..., None] + kept_before / total < target[..., None].double()) & (
        candidate.flatten()[order]
    )
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.unflatten(-1, (num_q, num_kv)) | diagonal
