"""Triton kernel: `fp8.quantize` in one pass (read the input once, write e4m3 once).

The PyTorch ops (upcast, multiply, cast, copy into the output) moved ~13 GB at 128K on the
Llama-3-8B shape and made the fp8 estimate slower than the bf16 one (H100: mask build 15.4 ->
17.7 ms, bench/results/attention_fp8_torch_quant.md; with this kernel 15.2 -> 11.3 ms,
attention_fp8.md). Same values as the PyTorch ops, bit for bit, on
GPUs with fp8 conversions (sm_89+: round to nearest even) for finite inputs: `fp8.head_scales`
keeps every value at or below 2^8, far from e4m3's largest (448), where Triton saturates and
PyTorch gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Rows per program.
ROWS = 64


@triton.jit
def _quantize_kernel(
    X,
    SCALES,
    OUT,
    length,
    heads,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    ok = (rows < length)[:, None] & (d < DIM)[None, :]
    base = X + (bh // heads).to(tl.int64) * stride_xb + (bh % heads).to(tl.int64) * stride_xh
    x = tl.load(
        base + rows.to(tl.int64)[:, None] * stride_xs + d[None, :] * stride_xd, mask=ok, other=0.0
    )
    scaled = x.to(tl.float32) * tl.load(SCALES + bh)
    out = OUT + bh.to(tl.int64) * length * DIM + rows.to(tl.int64)[:, None] * DIM + d[None, :]
    tl.store(out, scaled.to(tl.float8e4nv), mask=ok)


def triton_quantize(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`fp8.quantize` on CUDA: x `[B, H, L, D]` (any strides), scales `[B, H]` -> e4m3
    `[B, H, L, D]` contiguous."""
    batch, heads, length, dim = x.shape
    out = torch.empty((batch, heads, length, dim), dtype=torch.float8_e4m3fn, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(length, ROWS), batch * heads)
    _quantize_kernel[grid](
        x,
        scales.float().contiguous(),
        out,
        length,
        heads,
        *x.stride(),
        DIM=dim,
        D_PAD=triton.next_power_of_2(dim),
        ROWS=ROWS,
    )
    return out
