"""Float8 operands of the antidiagonal estimate (`SampleConfig.estimate_fp8`, ALGORITHM §9).

The estimate's cost is its Q'K'^T dots, and its kernel is bound by moving Q' and K' tiles
(`kernels/antidiagonal.py`): e4m3 operands halve those bytes and double the tensor cores' rate
on GPUs that have them (sm_89 and newer). Each (batch, head) of q and of k is scaled by a power
of two that brings its largest |value| into [2^7, 2^8) (e4m3's largest finite is 448), so the
scaling is exact and the cast to e4m3 is the only rounding; the estimate's logits are then
multiplied back by the two heads' scales. Every path scores the same rounded values: the
kernel reads the e4m3 tensors where the GPU has fp8 tensor cores, and the PyTorch path (CPU,
traced code) and older GPUs read them converted back to the input dtype, which holds them
exactly in bf16 and fp32 (e4m3 has 4 significant bits).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
#: A head's largest |value| is scaled into [2^(TOP - 1), 2^TOP).
TOP_EXPONENT = 8
#: Largest scale exponent: a head below 2^(TOP - MAX) (no real q or k) keeps finite scales, and
#: the product of a q and a k scale stays within fp32.
MAX_EXPONENT = 60
#: Elements scaled and cast per step (bounds the fp32 temporary: 256 MiB).
STEP_ELEMENTS = 1 << 26


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """x `[B, H, L, D]` -> `[B, H]` float32 powers of two: 2^(TOP_EXPONENT - e) where the head's
    largest |value| is m * 2^e, m in [0.5, 1) (2^TOP_EXPONENT for an all-zero head; at most
    2^MAX_EXPONENT)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(2, 3)).float()
    _, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), (TOP_EXPONENT - exponent).clamp(max=MAX_EXPONENT))


def quantize(x: torch.Tensor, scales: torch.Tensor, *, kernel: bool = False) -> torch.Tensor:
    """x `[B, H, L, D]` times its head's scale (`[B, H]`, `head_scales`) in e4m3, round to
    nearest even: `[B, H, L, D]` contiguous. `kernel` (CUDA, sm_89+): one Triton pass
    (`kernels/fp8.py`, the same values); else PyTorch ops in steps of `STEP_ELEMENTS`."""
    if kernel:
        from flexsample.kernels.fp8 import triton_quantize

        return triton_quantize(x, scales)
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    batch, heads, length, dim = x.shape
    rows = max(1, STEP_ELEMENTS // max(1, batch * heads * dim))
    factor = scales[:, :, None, None]
    for start in range(0, length, rows):
        out[:, :, start : start + rows] = (x[:, :, start : start + rows].float() * factor).to(FP8)
    return out


def dequantize(x8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize`'s values divided back by their head's scale, in `dtype`: `[B, H, L, D]`, in
    steps of `STEP_ELEMENTS`."""
    out = torch.empty(x8.shape, dtype=dtype, device=x8.device)
    batch, heads, length, dim = x8.shape
    rows = max(1, STEP_ELEMENTS // max(1, batch * heads * dim))
    factor = 1.0 / scales[:, :, None, None]  # powers of two: exact
    for start in range(0, length, rows):
        out[:, :, start : start + rows] = x8[:, :, start : start + rows].float() * factor
    return out


def tensor_cores(device: torch.device) -> bool:
    """Whether the estimate kernel's dots can read e4m3 on `device`: NVIDIA sm_89 or newer
    (`tl.float8e4nv`; not ROCm)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
