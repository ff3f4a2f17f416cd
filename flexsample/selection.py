"""Stage 2: the stripes of each head, from the stage-1 scores (ALGORITHM §3).

Vectorised (sort, cumsum, scatter): no loop over heads and no host sync, so it runs inside
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch

from flexsample.config import SampleConfig


def select_stripes(
    scores: torch.Tensor, covered: torch.Tensor, config: SampleConfig
) -> torch.Tensor:
    """Stripe blocks `[B, H, nKV]` (bool): the shortest prefix of blocks by descending score
    (ties: lower index first) with `covered + kept >= alpha`; alpha = 1 keeps all."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    # float64 running sum, covered first: the reference's exact sequence of additions, so
    # decisions at the alpha boundary match it.
    running = torch.cat([covered[..., None], sorted_scores[..., :-1]], -1).double()
    keep_sorted = torch.cumsum(running, -1) < config.alpha  # mass kept before each block
    if config.alpha >= 1.0:
        keep_sorted = torch.ones_like(keep_sorted)
    if config.max_stripe_ratio is not None:
        cap = int(config.max_stripe_ratio * scores.shape[-1])
        keep_sorted &= torch.arange(scores.shape[-1], device=scores.device) < cap
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
