"""Pure-PyTorch oracle of SampleAttention (ALGORITHM §2-§5, steps 1-5) and of the antidiagonal
estimator (§9): the spec, not the fast path.

Everything here favours clarity: it materialises `[n, S]` and `[S, S]` tensors and loops over
heads, so use it only at test sizes. Every fast path is tested against these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexsample.antidiagonal import BlockEstimate
from flexsample.config import SampleConfig


def expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """k or v `[B, Hkv, S, D]` repeated to `[B, Hq, S, D]` (GQA groups are contiguous)."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def reference_tile_scores(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on the sampled rows, exactly, summed over each tile's rows.

    q `[B, Hq, S, D]`, k `[B, Hkv, S, D]` -> (scores `[B, Hq, tiles, nKV]`: each row's softmax
    mass in each KV block outside the row's window; covered `[B, Hq, tiles]`: the mass inside
    it), float32 sums over the tile's real rows: a tile's covered + scores sum to its row count.
    """
    scores, covered = _tile_sums(q, k, config, scale)
    return scores.float(), covered.float()


def _tile_sums(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_tile_scores` in float64."""
    seq_len = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    table = config.sampled_rows(seq_len, q.device)
    rows = table.clamp(min=0).flatten().long()
    real = (table >= 0).flatten().double()
    k = expand_kv(k, q.shape[1]).double()
    logits = torch.einsum("bhnd,bhsd->bhns", q[:, :, rows].double(), k) * scale
    keys = torch.arange(seq_len, device=q.device)
    logits = logits.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    probs = logits.softmax(-1) * real[:, None]  # [B, H, n, S]; pad rows weigh nothing

    lo, hi = config.window_blocks(seq_len, q.device)
    key_block = keys // config.kv_block
    row_block = rows // config.q_block
    in_window = (key_block[None, :] >= lo[row_block][:, None]) & (
        key_block[None, :] <= hi[row_block][:, None]
    )  # [n, S]
    per_tile = (*probs.shape[:2], *table.shape)
    covered = (probs * in_window).sum(-1).reshape(per_tile).sum(-1)
    num_kv_blocks = math.ceil(seq_len / config.kv_block)
    scores = torch.zeros(*probs.shape[:3], num_kv_blocks, dtype=torch.float64, device=q.device)
    scores.index_add_(3, key_block, probs * ~in_window)
    return scores.reshape(*per_tile, num_kv_blocks).sum(3), covered


def reference_block_scores(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on the sampled rows, exactly: the mean over all sampled rows.

    q `[B, Hq, S, D]`, k `[B, Hkv, S, D]` -> (scores `[B, Hq, nKV]`, covered `[B, Hq]`), in
    float32, both divided by the number of sampled rows, so `covered + scores.sum(-1) == 1`.
    """
    scores, covered = _tile_sums(q, k, config, scale)
    n_rows = (config.sampled_rows(q.shape[2], q.device) >= 0).sum()
    return (scores.sum(2) / n_rows).float(), (covered.sum(2) / n_rows).float()


def reference_select(
    scores: torch.Tensor,
    covered: torch.Tensor,
    config: SampleConfig,
    tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stage 2, one head at a time: the stripe blocks `[B, H, nKV]` (bool).

    Keeps the highest-scoring blocks (ties: lower index first) until `covered + kept >= alpha`;
    alpha = 1 keeps every block. `max_stripe_ratio` caps the count at floor(ratio * nKV). With
    `tile_alpha`, adds each sampled tile's own such prefix at `tile_alpha`, from `tiles` =
    (per-tile mass `[B, H, tiles, nKV]`, window mass `[B, H, tiles]`, rows `[tiles]`).
    """
    batch, heads, num_blocks = scores.shape
    cap = (
        num_blocks if config.max_stripe_ratio is None else int(config.max_stripe_ratio * num_blocks)
    )
    stripes = torch.zeros_like(scores, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            stripes[b, h] = _prefix(scores[b, h], covered[b, h].item(), _bar(config.alpha), cap)
            if config.tile_alpha is None:
                continue
            mass, window, rows = tiles
            for t in range(len(rows)):
                share = mass[b, h, t] / rows[t]
                kept = (window[b, h, t] / rows[t]).item()
                stripes[b, h] |= _prefix(share, kept, _bar(config.tile_alpha), num_blocks)
    return stripes


def _bar(alpha: float) -> float:
    """The running sum that ends a prefix of shares: alpha, or never (alpha >= 1 keeps all)."""
    return alpha if alpha < 1.0 else math.inf


def _prefix(scores: torch.Tensor, kept: float, bar: float, cap: int) -> torch.Tensor:
    """One head: the blocks of the shortest descending-score prefix whose sum, from `kept`,
    reaches `bar`."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j].item(), j))
    chosen = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    for rank, j in enumerate(order):
        if rank >= cap or kept >= bar:
            break
        chosen[j] = True
        kept += scores[j].item()
    return chosen


def reference_block_keep(stripes: torch.Tensor, seq_len: int, config: SampleConfig) -> torch.Tensor:
    """Kept blocks `[B, H, nQ, nKV]`: window blocks ∪ stripes, each within the causal limit."""
    lo, hi = config.window_blocks(seq_len, stripes.device)
    batch, heads, num_kv = stripes.shape
    keep = torch.zeros(batch, heads, len(lo), num_kv, dtype=torch.bool, device=stripes.device)
    for qb in range(len(lo)):
        keep[:, :, qb, lo[qb] : hi[qb] + 1] = True
        keep[:, :, qb, : hi[qb] + 1] |= stripes[:, :, : hi[qb] + 1]
    return keep


def reference_token_mask(keep: torch.Tensor, seq_len: int, config: SampleConfig) -> torch.Tensor:
    """Token-level mask `[B, H, S, S]` of a block mask, with the causal rule applied."""
    idx = torch.arange(seq_len, device=keep.device)
    tokens = keep[:, :, idx // config.q_block][:, :, :, idx // config.kv_block]
    return tokens & (idx[None, :] <= idx[:, None])


def reference_mask(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> torch.Tensor:
    """Steps 1-4: the token-level SampleAttention mask `[B, Hq, S, S]`."""
    scores, covered = reference_block_scores(q, k, config, scale)
    rows = (config.sampled_rows(q.shape[2], q.device) >= 0).sum(-1).float()
    tiles = (*reference_tile_scores(q, k, config, scale), rows)
    stripes = reference_select(scores, covered, config, tiles)
    return reference_token_mask(
        reference_block_keep(stripes, q.shape[2], config), q.shape[2], config
    )


def reference_antidiagonal_scores(
    q: torch.Tensor, k: torch.Tensor, config: SampleConfig, scale: float | None = None
) -> BlockEstimate:
    """ALGORITHM §9, dense: the estimate (mass and peak, `[B, Hq, nQ, nKV]` float32 each) of
    q `[B, Hq, S, D]`, k `[B, Hkv, S, D]`, from the full `[S, S]` logits.

    Strided cell (m, n) covers rows m*s + r(m, a) and keys n*s + a for a < s, with
    r(m, a) = s-1-a for even m and (s-a) % s for odd m (one antidiagonal of the s x s cell).
    Its logit is the maximum (`cell_score="max"`) or the mean ("mean") of the scaled
    logits over its cells with row < S and key <= row, -inf without any; each strided row's
    softmax (zero if it has no finite logit) is summed over each key block's keys: the
    mass sums that over the query block's strided rows, the peak is its largest.
    `config.group_estimate` with GQA (G query heads per KV head): one estimate per KV head,
    `[B, Hkv, nQ, nKV]`, whose strided row m is query head m mod G's row m of its group.
    """
    batch, heads, seq_len, _ = q.shape
    s = config.stride
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), expand_kv(k, heads).double()) * scale
    num_strided = math.ceil(seq_len / s)
    m = torch.arange(num_strided, device=q.device)[:, None, None]
    n = torch.arange(num_strided, device=q.device)[None, :, None]
    a = torch.arange(s, device=q.device)
    row = m * s + torch.where(m % 2 == 0, s - 1 - a, (s - a) % s)  # [M, 1, s]
    key = n * s + a  # [1, M, s]
    valid = (row < seq_len) & (key <= row)  # [M, M, s]
    cells = logits[:, :, row.clamp(max=seq_len - 1), key.clamp(max=seq_len - 1)]
    if config.cell_score == "max":
        cell = torch.where(valid, cells, float("-inf")).amax(-1)
    else:
        count = valid.sum(-1)
        cell = torch.where(valid, cells, 0.0).sum(-1) / count.clamp(min=1)
        cell = cell.masked_fill(count == 0, float("-inf"))
    group = heads // k.shape[1]
    if config.group_estimate and group > 1:
        m = torch.arange(num_strided, device=q.device)
        cell = cell.unflatten(1, (-1, group))[:, :, m % group, m]
    probs = cell.softmax(-1).nan_to_num(0.0)
    first = torch.arange(num_strided, device=q.device) * s
    to_q = F.one_hot(first // config.q_block, math.ceil(seq_len / config.q_block)).double()
    to_kv = F.one_hot(first // config.kv_block, math.ceil(seq_len / config.kv_block)).double()
    row_block = torch.einsum("bhmn,nk->bhmk", probs, to_kv)  # each strided row's key blocks
    mass = torch.einsum("bhmk,mq->bhqk", row_block, to_q)
    owner = first // config.q_block
    peak = torch.stack([row_block[:, :, owner == qb].amax(2) for qb in range(to_q.shape[1])], 2)
    return BlockEstimate(mass.float(), peak.float())


def reference_antidiagonal_select(
    estimate: BlockEstimate, seq_len: int, config: SampleConfig
) -> torch.Tensor:
    """ALGORITHM §9 selection, one query block at a time: kept blocks `[B, H, nQ, nKV]` (bool).

    Query block qb keeps key block 0, the blocks from `first(qb) // kv_block - local_blocks`
    to the last causal one, every causal block if its last row is one of the last `dense_tail`
    and (with `row_threshold`) every causal block whose peak is at
    least `row_threshold * kv_block / S`, then other causal blocks by descending mass (ties:
    lower index first) until the kept mass reaches `alpha` of the row's causal total; alpha = 1
    or a row with no estimate keeps every causal block. Each estimate (as float32) counts in whole
    units of 2^-32 of 2^e, the row's largest being below 2^e (`math.frexp`), truncated:
    integer sums.
    """
    est = estimate.mass
    batch, heads, num_q, num_kv = est.shape
    keep = torch.zeros_like(est, dtype=torch.bool)
    for qb in range(num_q):
        first = qb * config.q_block
        last = min(first + config.q_block, seq_len) - 1
        causal = torch.arange(num_kv, device=est.device) <= last // config.kv_block
        forced = torch.zeros(num_kv, dtype=torch.bool, device=est.device)
        forced[0] = True
        forced[max(0, first // config.kv_block - config.local_blocks) :] = True
        if last >= seq_len - config.dense_tail:
            forced[:] = True
        forced &= causal
        for b in range(batch):
            for h in range(heads):
                flagged = forced.clone()
                if config.row_threshold is not None:
                    peak_bar = config.row_threshold * config.kv_block / seq_len
                    flagged |= causal & (estimate.peak[b, h, qb].double() >= peak_bar)
                row = torch.where(causal, est[b, h, qb].float().double(), 0.0).tolist()
                exp = math.frexp(max(row))[1] if max(row) > 0 else 0
                units = [int(math.ldexp(x, 32 - exp)) for x in row]
                total = sum(units)
                kept = sum(u for u, f in zip(units, flagged.tolist(), strict=True) if f)
                bar = config.alpha * total if config.alpha < 1.0 and total > 0 else math.inf
                others = [0 if f else u for u, f in zip(units, flagged.tolist(), strict=True)]
                chosen = _prefix(torch.tensor(others), kept, bar, num_kv)
                keep[b, h, qb] = (chosen.to(est.device) | flagged) & causal
    return keep


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention under a token mask `[B, Hq, S, S]`, in float64; returns q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv(k, q.shape[1]).double(), expand_kv(v, q.shape[1]).double()
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k) * scale
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bhjd->bhid", probs, v).to(q.dtype)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """Step 5: SampleAttention output `[B, Hq, S, Dv]` under the reference mask."""
    return masked_attention(q, k, v, reference_mask(q, k, config, scale), scale)
