"""Tolerances that can fail: scale-free errors, and output bounds calibrated on a
low-precision run of the reference (as flash-attention's tests do)."""

import torch

from flexsample.reference import expand_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: Block scores and covered mass, relative RMS error against the float64 reference. Both
#: paths read the same rounded inputs and accumulate in fp32 (PyTorch path: 1.2e-7 measured in
#: every dtype), so the bound is dtype-free; moving one block's mass to another block of a
#: 32K-token head (256 blocks) is a relative RMS error of ~0.09.
SCORE_REL_RMS = 1e-5
#: Antidiagonal estimate `[B, Hq, nQ, nKV]`, relative RMS error against the float64 reference,
#: by `cell_score` and dtype. "mean": the fast path rounds the logits to the input dtype (its
#: matmul's output; fp32 accumulation) and Q' to scale / s; measured worst over 150 random
#: shapes (tests.strategies.qkv, strides 1-16): fp32 1.4e-7, fp16 1.3e-4, bf16 7.5e-4. "max":
#: fp32 operands and logits (a whole logit rounded to bf16 was 4.1e-3), measured worst 2.2e-7
#: in every dtype. A wrong antidiagonal or a missing causal mask is 3e-2 or more on the
#: planted inputs of tests/test_antidiagonal.py.
ANTIDIAG_REL_RMS = {
    "mean": {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 3e-3},
    "max": {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5},
}
#: The antidiagonal kernels against the float64 reference: they read the rounded inputs and
#: keep every logit in fp32 (fp32 accumulation of exact products), so the bound is dtype-free;
#: measured worst ~2e-7 in the interpreter. The planted bugs of
#: tests/test_antidiagonal_kernel.py are 1e-3 or more.
ANTIDIAG_KERNEL_REL_RMS = 1e-5
#: The estimate with `estimate_fp8` on a GPU with fp8 tensor cores against the PyTorch path on
#: the same e4m3-rounded inputs (relative RMS error): the products are exact, but the tensor
#: cores sum e4m3 dots in less than fp32 between promotions (FP8_IMPRECISE_ACC; measured 2.2e-3
#: with "max", 3.8e-4 with "mean", H100, Llama-3-8B shape at 16K + 77, structured inputs).
#: A wrong antidiagonal or a missing causal mask is 3e-2 or more.
FP8_TENSOR_CORE_REL_RMS = 1e-2
#: Floor of the output bound: fp32 summation-order noise of a correct kernel.
OUTPUT_FLOOR = 1e-5


def rel_rms(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| over all elements, in float64."""
    expected = expected.double()
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_scores_close(got, expected, bound: float = SCORE_REL_RMS) -> None:
    """(scores, covered) pairs agree to `bound` in relative RMS error, each."""
    for name, g, e in zip(("scores", "covered"), got, expected, strict=True):
        err = rel_rms(g, e)
        assert err <= bound, f"{name}: relative RMS error {err:.3g} > {bound:.3g}"


def low_precision_attention(q, k, v, mask, scale=None) -> torch.Tensor:
    """The reference's attention computed in q's dtype throughout (what a correct kernel's
    rounding may add is about this much): `[B, Hq, S, Dv]`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    logits = (q @ k.transpose(-1, -2)) * scale
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return probs @ v


def assert_output_close(got, q, k, v, mask, scale=None) -> None:
    """`got` is attention under token `mask` `[B, Hq, S, S]` to within twice the error of the
    reference computed in the inputs' dtype (plus a floor), both against float64."""
    from flexsample.reference import masked_attention

    exact = masked_attention(q.double(), k.double(), v.double(), mask, scale)
    bound = 2 * rel_rms(low_precision_attention(q, k, v, mask, scale), exact) + OUTPUT_FLOOR
    err = rel_rms(got, exact)
    assert err <= bound, f"output relative RMS error {err:.3g} > bound {bound:.3g}"


def causal_mask(q: torch.Tensor) -> torch.Tensor:
    """The causal token mask `[1, 1, S, S]` of q's length."""
    idx = torch.arange(q.shape[2], device=q.device)
    return (idx[None, :] <= idx[:, None])[None, None]
