"""Triton kernel: is a `[B, H, S, S]` SDPA mask exactly causal? One read of the mask.

The mask is as large as attention's score matrix (16 GiB of bool at 128K), and under
torch.compile every layer may get its own copy, so the check must run at memory speed: each
program reads a band of rows once, compares each entry with `col <= row` (bool masks) or with
0 / blocked values (additive float masks) and writes one mismatch flag; no temporaries.
Broadcast (stride 0) batch or head dims are read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_R, _BLOCK_C = 32, 256


@triton.jit
def _mismatch_kernel(
    M,
    BAD,
    stride_b,
    stride_h,
    stride_r,
    stride_c,
    heads,
    seq_len,
    lowest,
    IS_BOOL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    band = tl.program_id(0)
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    rows = band * BLOCK_R + tl.arange(0, BLOCK_R)
    base = M + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    row_ptr = base + rows[:, None].to(tl.int64) * stride_r
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for start in range(0, seq_len, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < seq_len) & (cols[None, :] < seq_len)
        x = tl.load(row_ptr + cols[None, :].to(tl.int64) * stride_c, mask=inside, other=0)
        causal = cols[None, :] <= rows[:, None]
        if IS_BOOL:
            wrong = (x != 0) != causal
        else:
            x = x.to(tl.float32)
            blocked = (x == float("-inf")) | (x == lowest)
            wrong = tl.where(causal, x != 0, ~blocked)
        bad = tl.maximum(bad, (wrong & inside).to(tl.int32))
    tl.store(BAD + tl.program_id(1) * tl.num_programs(0) + band, tl.max(tl.max(bad, 1), 0))


def triton_is_causal(mask: torch.Tensor) -> bool:
    """`is_causal_mask` for a square bool or float mask of 2 to 4 dims (caller checks that)."""
    full = mask[(None,) * (4 - mask.dim())]
    batch, heads, seq_len, _ = full.shape
    stride_b, stride_h, stride_r, stride_c = full.stride()
    # A broadcast dim holds one copy: check it once.
    batch, heads = (1 if stride_b == 0 else batch), (1 if stride_h == 0 else heads)
    if full.dtype == torch.bool:
        full, lowest = full.view(torch.uint8), 0.0
    else:
        lowest = float(torch.finfo(full.dtype).min)
    bands = triton.cdiv(seq_len, _BLOCK_R)
    bad = torch.empty(batch * heads * bands, dtype=torch.int32, device=mask.device)
    _mismatch_kernel[(bands, batch * heads)](
        full,
        bad,
        stride_b,
        stride_h,
        stride_r,
        stride_c,
        heads,
        seq_len,
        lowest,
        IS_BOOL=mask.dtype == torch.bool,
        BLOCK_R=_BLOCK_R,
        BLOCK_C=_BLOCK_C,
        num_warps=8,
    )
    return not bool(bad.any())
