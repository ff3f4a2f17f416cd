"""How attention and masks are measured: exact attention rows, coverage (CRA), density.

One address for every measurement the tests and benchmarks report (ALGORITHM §6). Nothing
here is part of the algorithm; the reference and the fast paths never import it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexsample.block_mask import kept_blocks
from flexsample.config import SampleConfig
from flexsample.reference import expand_kv


def causal_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, rows: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exact causal softmax rows, chunk by chunk: yields (row indices `[c]`, probs
    `[B, Hq, c, S]` float32). Memory is O(chunk * S), never S×S."""
    batch, heads, seq_len, _ = q.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = expand_kv(k, heads).float()
    keys = torch.arange(seq_len, device=q.device)
    rows = keys if rows is None else rows.to(q.device)
    budget = 1 << (28 if q.is_cuda else 24)  # logits elements per chunk: 1 GiB / 64 MiB
    chunk = max(1, budget // (batch * heads * seq_len))
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        logits = q[:, :, part].float() @ k.transpose(-1, -2) * scale
        yield part, logits.masked_fill(keys[None, :] > part[:, None], float("-inf")).softmax(-1)


def true_cra(
    q: torch.Tensor,
    k: torch.Tensor,
    keep: torch.Tensor,
    config: SampleConfig,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of each row's full causal attention mass inside the kept blocks: `[B, Hq, S]`,
    or `[B, Hq, len(rows)]` for the given query rows only (a cheaper estimate at large S).

    keep `[B, Hq, nQ, nKV]` is a block keep matrix (e.g. `mask.kept_blocks(block_mask)`).
    The paper's CRA is the minimum of this over rows; report min, low percentiles and mean.
    """
    key_block = torch.arange(k.shape[2], device=q.device) // config.kv_block
    shares = [
        (probs * keep[:, :, part // config.q_block][..., key_block]).sum(-1)
        for part, probs in causal_probs(q, k, scale, rows)
    ]
    return torch.cat(shares, -1)


def column_mass(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> torch.Tensor:
    """Exact causal attention mass per key block summed over all rows: `[B, Hq, nKV]`."""
    key_block = torch.arange(k.shape[2], device=q.device) // config.kv_block
    num_kv = -(-k.shape[2] // config.kv_block)
    mass = torch.zeros(*q.shape[:2], num_kv, device=q.device)
    for _, probs in causal_probs(q, k, scale):
        mass.index_add_(-1, key_block, probs.sum(-2))
    return mass


def block_mass(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> torch.Tensor:
    """Exact causal attention mass of every (query block, key block): `[B, Hq, nQ, nKV]`, the
    sum over the query block's rows of each row's probability mass in the key block. Chunk
    by chunk (`causal_probs`), never S×S."""
    seq_len = k.shape[2]
    num_q, num_kv = -(-q.shape[2] // config.q_block), -(-seq_len // config.kv_block)
    mass = torch.zeros(*q.shape[:2], num_q, num_kv, device=q.device)
    for rows, probs in causal_probs(q, k, scale):
        pad = num_kv * config.kv_block - seq_len
        per_block = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (num_kv, -1)).sum(-1)
        mass.index_add_(-2, rows // config.q_block, per_block)
    return mass


def _causal_pairs_upto(x: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Pairs (i, j) with i <= x, first <= j <= last, j <= i (float64, broadcasting)."""
    width = last - first + 1
    inside = torch.clamp(torch.minimum(x, last) - first + 1, min=0)
    return inside * (inside + 1) / 2 + torch.clamp(x - last, min=0) * width


def density(block_mask: BlockMask) -> torch.Tensor:
    """Kept share of the causal (query, key) pairs, per batch and head: `[B, H]` float32."""
    seq_q, seq_kv = block_mask.seq_lengths
    return block_density(kept_blocks(block_mask), seq_q, seq_kv, *block_mask.BLOCK_SIZE)


def block_density(
    keep: torch.Tensor, seq_q: int, seq_kv: int, q_block: int, kv_block: int
) -> torch.Tensor:
    """Kept share of the causal pairs of a block keep matrix `[..., nQ, nKV]`: `[...]` float32."""
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
