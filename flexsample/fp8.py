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
    factor = scales[:, :, None, None]
    return _in_steps(x, FP8, lambda rows: (rows.float() * factor).to(FP8))


def dequantize(x8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize`'s values divided back by their head's scale, in `dtype`: `[B, H, L, D]`, in
    steps of `STEP_ELEMENTS`."""
    factor = 1.0 / scales[:, :, None, None]  # powers of two: exact
    return _in_steps(x8, dtype, lambda rows: rows.float() * factor)


def operands(
    q: torch.Tensor, k: torch.Tensor, q_scales: torch.Tensor | None = None, *, kernel: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[B, Hq, L, D]` and k `[B, Hkv, S, D]` -> (e4m3 q, e4m3 k, q's scales `[B, Hq]`, k's
    `[B, Hkv]`); `q_scales`: q's, where q is a chunk of the sequence (else `head_scales(q)`);
    `kernel` as in `quantize`."""
    q_scales = head_scales(q) if q_scales is None else q_scales
    k_scales = head_scales(k)
    return (
        quantize(q, q_scales, kernel=kernel),
        quantize(k, k_scales, kernel=kernel),
        q_scales,
        k_scales,
    )


def logit_factor(q_scales: torch.Tensor, k_scales: torch.Tensor) -> torch.Tensor:
    """`[B, Hq]`: what undoes the scales in a query head's logits (its KV head's k scale: GQA
    groups of Hq / Hkv consecutive heads)."""
    group = q_scales.shape[1] // k_scales.shape[1]
    return 1.0 / (q_scales * k_scales.repeat_interleave(group, 1))


def _in_steps(x: torch.Tensor, dtype: torch.dtype, convert) -> torch.Tensor:
    """`convert` of x `[B, H, L, D]`'s rows, `STEP_ELEMENTS` at a time, into a new `dtype`
    tensor."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    batch, heads, length, dim = x.shape
    rows = max(1, STEP_ELEMENTS // max(1, batch * heads * dim))
    for start in range(0, length, rows):
        out[:, :, start : start + rows] = convert(x[:, :, start : start + rows])
    return out


def tensor_cores(device: torch.device) -> bool:
    """Whether the estimate kernel's dots can read e4m3 on `device`: NVIDIA sm_89 or newer
    (`tl.float8e4nv`; not ROCm)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
