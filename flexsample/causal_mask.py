"""The causal mask: is an SDPA `attn_mask` exactly causal, and building the S×S mask where a
dense path needs it (end-aligned, optionally combined with a door's key mask, `key_mask.py`).

transformers builds an explicit mask instead of `is_causal=True` when it is traced (5.17
does so for every causal model under torch.compile), so a compiled graph may pass a causal
mask that is indistinguishable from a padding mask until run time. The op checks the real
tensor on every call (on CUDA with a Triton kernel at memory speed, elsewhere row chunk by
row chunk so that no second S×S tensor is allocated). Nothing is remembered across calls for
such a mask: it is the caller's tensor, an in-place write through `.numpy()` or `.data`
does not bump its version counter, so no cache key can prove that it is unchanged (the
check costs 7.65 ms per layer at 128K on the H200, bench/results/op_path.md). The door's
key masks avoid this: it makes them itself.
"""

from __future__ import annotations

import torch

#: Elements compared per step off CUDA; bounds the temporaries of a check to a few hundred MiB.
CHUNK_ELEMENTS = 1 << 26


def _blocked_values(dtype: torch.dtype) -> tuple[float, ...]:
    return (float("-inf"), torch.finfo(dtype).min)


def is_causal_mask(
    mask: torch.Tensor, *, kernel: str = "auto", chunk_elements: int = CHUNK_ELEMENTS
) -> bool:
    """True when `mask` (`[..., S, S]`, bool or float additive) is exactly causal.

    Bool masks must be True on and below the diagonal and False above it; float masks must be
    0 on and below and `-inf` or the dtype's lowest value above. Every leading position (batch,
    head) is checked, so a padded batch is never taken for causal.

    `kernel` "auto" reads CUDA masks of up to 4 dims with the Triton kernel (every entry, in one
    read) and others with `chunk_elements`-sized PyTorch steps; "triton" forces the kernel
    (tests run it on CPU in Triton's interpreter). The PyTorch check compares row and column
    counts of kept entries only, two reductions and no comparison tensor: a 0/1 matrix whose
    row counts are 1, 2, ..., S and column counts S, S-1, ..., 1 (the conjugate partition) is
    unique (Gale-Ryser), so it is the causal one.
    """
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    length = mask.shape[-1]
    if length == 0:
        return True
    if kernel == "triton" or (kernel == "auto" and mask.is_cuda and mask.dim() <= 4):
        from flexsample.kernels.causal_check import triton_is_causal

        return triton_is_causal(mask)
    rows_per_chunk = max(1, chunk_elements // (length * max(1, mask[..., 0, 0].numel())))
    index = torch.arange(length, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    column_counts = torch.zeros(mask.shape[:-2] + (length,), dtype=torch.int64, device=mask.device)
    for start in range(0, length, rows_per_chunk):
        chunk = mask[..., start : start + rows_per_chunk, :]
        if mask.dtype == torch.bool:
            kept = chunk
        else:
            low, lowest = _blocked_values(mask.dtype)
            kept = chunk == 0
            ok &= (kept | (chunk == low) | (chunk == lowest)).all()
        ok &= (kept.sum(-1) == index[start : start + rows_per_chunk] + 1).all()
        column_counts += kept.sum(-2)
    ok &= (column_counts == length - index).all()
    return bool(ok)


def causal_padding_mask(
    seq_q: int,
    seq_kv: int,
    keys: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool `[B, 1, Sq, Skv]` (`[1, 1, Sq, Skv]` without `keys`): True where query row i may
    see key j, causal aligned to the END of the keys (j <= Skv - Sq + i) and, with a 2-D
    `keys` `[B, Skv]`, only where it allows: a bool padding mask keeps the keys
    where it is True (transformers' SDPA mask); integer sequence ids keep the keys of the
    query's own sequence (packed sequences; query i is key Skv - Sq + i).

    The one place a dense fallback builds an S×S mask from a causal rule, a padding mask or
    sequence ids; the sparse path never calls it.
    """
    device = keys.device if keys is not None else device
    rows = torch.arange(seq_q, device=device) + (seq_kv - seq_q)
    mask = (torch.arange(seq_kv, device=device) <= rows[:, None])[None, None]
    if keys is None:
        return mask
    if keys.dtype == torch.bool:
        return mask & keys[:, None, None, :]
    own = keys[:, seq_kv - seq_q :]
    return mask & (own[:, None, :, None] == keys[:, None, None, :])
