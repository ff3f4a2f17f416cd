"""Is an SDPA `attn_mask` exactly the causal mask?

transformers builds an explicit mask instead of `is_causal=True` when it is traced (5.17
does so for every causal model under torch.compile), so a compiled graph may pass a causal
mask that is indistinguishable from a padding mask until run time. The op checks the real
tensor, row chunk by row chunk so that no second S×S tensor is allocated, and remembers the
answer for the tensor object it saw (all layers of one forward share it).
"""

from __future__ import annotations

import weakref

import torch

#: Elements compared per step; bounds the temporaries of a check to a few hundred MiB.
_CHUNK_ELEMENTS = 1 << 26

_last: tuple[weakref.ref, int, bool] | None = None


def _blocked_values(dtype: torch.dtype) -> tuple[float, ...]:
    return (float("-inf"), torch.finfo(dtype).min)


def is_causal_mask(mask: torch.Tensor) -> bool:
    """True when `mask` (`[..., S, S]`, bool or float additive) is exactly causal.

    Bool masks must be True on and below the diagonal and False above it; float masks must be
    0 on and below and `-inf` or the dtype's lowest value above. Every leading position (batch,
    head) is checked, so a padded batch is never taken for causal.
    """
    global _last
    if _last is not None:
        ref, version, answer = _last
        if ref() is mask and version == mask._version:
            return answer
    answer = _check(mask)
    _last = (weakref.ref(mask), mask._version, answer)
    return answer


def _check(mask: torch.Tensor) -> bool:
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    length = mask.shape[-1]
    if length == 0:
        return True
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (length * max(1, mask[..., 0, 0].numel())))
    columns = torch.arange(length, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    for start in range(0, length, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, length), device=mask.device)
        causal = columns <= rows[:, None]
        chunk = mask[..., start : start + rows_per_chunk, :]
        if mask.dtype == torch.bool:
            ok &= (chunk == causal).all()
        else:
            low, lowest = _blocked_values(mask.dtype)
            blocked = (chunk == low) | (chunk == lowest)
            ok &= torch.where(causal, chunk == 0, blocked).all()
    return bool(ok)
