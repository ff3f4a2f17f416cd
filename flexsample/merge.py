"""Attention over disjoint key sets, merged into attention over their union by log-sum-exp.

Used where one causal row range is computed as several dense calls: the cuDNN dense
context-parallel baseline (square + rectangle) and the dense tail's split keys (`tail.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_by_lse(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts `(out [n, ..., L, Dv], lse [n, ..., L])`, each holding `n >= 1` attentions of the
    same rows over disjoint keys (natural log-sum-exp of the scaled logits) -> (out `[..., L,
    Dv]` in the first part's dtype, lse `[..., L]` in fp32 or wider). Every row needs a finite
    lse in some part. Weighted in fp32 (fp64 for fp64 inputs)."""
    lses = [lse.to(torch.promote_types(lse.dtype, torch.float32)) for _, lse in parts]
    total = torch.logsumexp(torch.cat(lses), 0)
    merged = None
    for (out, _), lse in zip(parts, lses, strict=True):
        weight = (lse - total).exp_().unsqueeze(-1)
        term = out[0] * weight[0] if out.shape[0] == 1 else (out * weight).sum(0)
        merged = term if merged is None else merged.add_(term)
    return merged.to(parts[0][0].dtype), total
