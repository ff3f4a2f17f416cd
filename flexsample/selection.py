"""Stage 2: the stripes of each head, from the stage-1 scores (ALGORITHM §3).

Vectorised (sort, cumsum, scatter): no loop over heads and no host sync, so it runs inside
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch

from flexsample.config import SampleConfig


def select_stripes(
    scores: torch.Tensor,
    covered: torch.Tensor,
    config: SampleConfig,
    tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stripe blocks `[B, H, nKV]` (bool) from the mean scores `[B, H, nKV]` and covered mass
    `[B, H]`: the shortest prefix of blocks by descending score (ties: lower index first) with
    `covered + kept >= alpha`; alpha = 1 keeps all; `max_stripe_ratio` caps the count.

    With `config.tile_alpha`, also every sampled tile's own shortest prefix reaching
    `tile_alpha` of the tile's mass (the paper's CRA as a minimum over sampled rows, at tile
    granularity): `tiles` = (per-tile mass `[B, H, tiles, nKV]`, window mass `[B, H, tiles]`,
    rows per tile `[tiles]`) from `scores.tile_scores`.
    """
    cap = (
        None if config.max_stripe_ratio is None else int(config.max_stripe_ratio * scores.shape[-1])
    )
    stripes = shortest_prefix(scores, covered, config.alpha, cap)
    if config.tile_alpha is None:
        return stripes
    if tiles is None:
        raise ValueError("config.tile_alpha needs the per-tile scores (scores.tile_scores)")
    mass, window, rows = tiles
    per_tile = shortest_prefix(mass / rows[:, None], window / rows, config.tile_alpha)
    return stripes | per_tile.any(-2)


def shortest_prefix(
    scores: torch.Tensor,
    covered: torch.Tensor,
    alpha: float | torch.Tensor,
    cap: int | None = None,
) -> torch.Tensor:
    """Blocks `[..., nKV]` of the shortest descending-score prefix with covered + kept >= alpha,
    at most `cap` of them. Float scores: shares of the row, alpha a float (>= 1 keeps all).
    Integer scores (exact units, `antidiagonal.estimate_units`): alpha is the bar `[..., 1]`
    (float64) that the int64 running sum must reach."""
    if not scores.is_floating_point() and not isinstance(alpha, torch.Tensor):
        raise TypeError("integer scores are units: pass the bar alpha * total as a tensor")
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    running = torch.cat([covered[..., None], sorted_scores[..., :-1]], -1)
    # Floats: a float64 running sum, covered first: the reference's exact sequence of
    # additions, so decisions at the alpha boundary match it. Integers: exact in any order.
    if running.is_floating_point():
        running = running.double()
    keep_sorted = torch.cumsum(running, -1) < alpha  # mass kept before each block
    if not isinstance(alpha, torch.Tensor) and alpha >= 1.0:
        keep_sorted = torch.ones_like(keep_sorted)
    if cap is not None:
        keep_sorted &= torch.arange(scores.shape[-1], device=scores.device) < cap
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
