"""e4m3 operands of the antidiagonal estimate (`flexsample/fp8.py`, `SampleConfig.estimate_fp8`):
the scales and rounding, and every path scoring the same rounded values (the PyTorch path on
CPU, the kernel in the interpreter reading e4m3, the kernel on the GPU)."""

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig, fp8
from flexsample.antidiagonal import antidiagonal_scores, torch_antidiagonal_scores
from flexsample.kernels.antidiagonal import triton_antidiagonal_scores
from flexsample.reference import reference_antidiagonal_scores
from flexsample.synthetic import structured_qkv

from strategies import qkv
from tolerance import (
    ANTIDIAG_KERNEL_REL_RMS,
    ANTIDIAG_REL_RMS,
    DTYPES,
    FP8_TENSOR_CORE_REL_RMS,
    rel_rms,
)

CONFIG = SampleConfig(estimator="antidiagonal", stride=4, q_block=16, kv_block=16, alpha=0.9)


def _rounded(x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded as the estimate reads it (under `scales`, default its heads'), in float64."""
    scales = fp8.head_scales(x) if scales is None else scales
    return fp8.dequantize(fp8.quantize(x, scales), scales, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scales_put_each_head_top_in_range(dtype):
    """Per (batch, head): a power of two, the head's largest |value| scaled into [128, 256);
    heads 2^-20 apart get their own scales; an all-zero head gets 2^8."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 8, generator=gen)
    x = (x * torch.tensor([2.0**-20, 1.0, 300.0]).view(1, 3, 1, 1)).to(dtype)
    x[1, 1] = 0
    scales = fp8.head_scales(x)
    assert scales.dtype == torch.float32 and scales.shape == (2, 3)
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all(), "not powers of two"
    top = (x.float() * scales[:, :, None, None]).abs().amax((2, 3))
    top[1, 1] = 128  # the zero head
    assert ((top >= 128) & (top < 256)).all(), top
    assert scales[1, 1] == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_is_e4m3_and_exact_back_in_the_input_dtype(dtype):
    """Each value moves by at most half an e4m3 step (2^-4 relative, normal range); converted
    back to bf16 / fp32 the values are exact; steps of rows give the same tensor."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 4, 301, 16, generator=gen) * 3).to(dtype)
    scales = fp8.head_scales(x)
    x8 = fp8.quantize(x, scales)
    assert x8.dtype == fp8.FP8 and x8.shape == x.shape
    back = fp8.dequantize(x8, scales, dtype)
    exact = x8.double() / scales.double()[:, :, None, None]
    assert torch.equal(back.double(), exact)
    scaled = x.double() * scales.double()[:, :, None, None]
    normal = scaled.abs() >= 2.0**-6
    err = (x8.double() - scaled).abs()
    assert (err[normal] <= scaled.abs()[normal] * 2.0**-4).all()
    with mock.patch.object(fp8, "STEP_ELEMENTS", 2 * 4 * 16 * 7):
        assert torch.equal(fp8.quantize(x, scales).view(torch.uint8), x8.view(torch.uint8))


@given(
    qkv(max_len=120, head_dims=(16, 32)),
    st.sampled_from([1, 4, 16]),
    st.sampled_from(["max", "mean"]),
)
def test_pytorch_path_scores_the_rounded_inputs(inputs, stride, cell_score):
    """antidiagonal_scores with estimate_fp8 (PyTorch path) = the reference on q and k rounded
    to e4m3 (random shapes: odd lengths, GQA, batch > 1, every dtype)."""
    q, k, _ = inputs
    config = dataclasses.replace(
        CONFIG, stride=stride, cell_score=cell_score, estimate_fp8=True, score_backend="torch"
    )
    scale = q.shape[-1] ** -0.5
    got = antidiagonal_scores(q, k, config, scale)
    want = reference_antidiagonal_scores(_rounded(q), _rounded(k), config, scale)
    for name, g, w in zip(got._fields, got, want, strict=True):
        assert rel_rms(g, w) <= ANTIDIAG_REL_RMS[cell_score][q.dtype], name


@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_kernel_dispatch_reads_e4m3_where_the_gpu_can(cell_score):
    """antidiagonal_scores' e4m3 kernel path (what sm_89+ GPUs run; here the interpreter, with
    the quantize kernel's PyTorch twin): per-head scales folded for GQA 3 and batch 2, a chunk
    of q rows with the whole sequence's scales (context parallel) = the reference on the
    rounded inputs; and the kernel is handed e4m3 tensors."""
    from flexsample.kernels import antidiagonal as kernels

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 150, 16, generator=gen) * torch.linspace(0.1, 30, 6).view(1, 6, 1, 1)
    k = torch.randn(2, 2, 150, 16, generator=gen) * torch.tensor([0.2, 7.0]).view(1, 2, 1, 1)
    config = dataclasses.replace(
        CONFIG, cell_score=cell_score, estimate_fp8=True, score_backend="triton"
    )
    want = reference_antidiagonal_scores(_rounded(q), _rounded(k), config, 0.25)
    seen = []
    real_kernel = kernels.triton_antidiagonal_scores

    def spy(q, k, *args, **kwargs):
        seen.append((q.dtype, k.dtype))
        return real_kernel(q, k, *args, **kwargs)

    def twin(x, scales):
        return fp8.quantize(x, scales)

    with (
        mock.patch.object(fp8, "tensor_cores", return_value=True),
        mock.patch("flexsample.kernels.fp8.triton_quantize", twin),
        mock.patch.object(kernels, "triton_antidiagonal_scores", spy),
    ):
        got = antidiagonal_scores(q, k, config, 0.25)
        # Query blocks 4..8 from a chunk holding rows 48..149, under the whole q's scales.
        chunk = antidiagonal_scores(
            q[:, :, 48:], k, config, 0.25, q_blocks=(4, 9), q_row0=48, q_scales=fp8.head_scales(q)
        )
    assert seen == [(fp8.FP8, fp8.FP8)] * 2
    for g, w in zip(got, want, strict=True):
        assert rel_rms(g, w) <= ANTIDIAG_KERNEL_REL_RMS
    for g, w in zip(chunk, want, strict=True):
        assert rel_rms(g, w[:, :, 4:9]) <= ANTIDIAG_KERNEL_REL_RMS


def test_fp8_scores_differ_from_the_unrounded_ones():
    """The option reaches the estimate: on inputs whose rounding matters the two estimates
    differ by far more than the bound (a silently ignored flag would not)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 200, 16, generator=gen) * 4
    k = torch.randn(1, 1, 200, 16, generator=gen) * 4
    config = dataclasses.replace(CONFIG, score_backend="torch")
    plain = antidiagonal_scores(q, k, config, 0.25)
    rounded = antidiagonal_scores(q, k, dataclasses.replace(config, estimate_fp8=True), 0.25)
    assert rel_rms(rounded.mass, plain.mass) > 100 * ANTIDIAG_REL_RMS["max"][torch.float32]


@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_kernel_reads_e4m3_with_head_scales(cell_score):
    """The kernel (interpreter on CPU) on e4m3 q and k with the heads' scales = the reference
    on the rounded values: odd length, GQA 3, batch 2, heads of different magnitude (so each
    head's scale differs); ignoring head_scale fails. Both cell scores: the kernel applies
    head_scale to either."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 133, 16, generator=gen) * torch.linspace(0.01, 20, 6).view(1, 6, 1, 1)
    k = torch.randn(2, 2, 133, 16, generator=gen) * torch.tensor([0.1, 9.0]).view(1, 2, 1, 1)
    config = dataclasses.replace(CONFIG, cell_score=cell_score)
    qs, ks = fp8.head_scales(q), fp8.head_scales(k)
    q8, k8 = fp8.quantize(q, qs), fp8.quantize(k, ks)
    head_scale = 1.0 / (qs * ks.repeat_interleave(3, 1))
    want = reference_antidiagonal_scores(_rounded(q), _rounded(k), config, 0.25)
    launch = {"chunk_elements": 1 << 20, "block_m": 32, "block_n": 16, "block_k": 16}
    if not torch.cuda.is_available():
        launch["splits"] = 2
    got = triton_antidiagonal_scores(q8, k8, config, 0.25, head_scale=head_scale, **launch)
    assert rel_rms(got.mass, want.mass) <= ANTIDIAG_KERNEL_REL_RMS
    assert rel_rms(got.peak, want.peak) <= ANTIDIAG_KERNEL_REL_RMS
    unscaled = triton_antidiagonal_scores(q8, k8, config, 0.25, **launch)
    assert rel_rms(unscaled.mass, want.mass) > 100 * ANTIDIAG_KERNEL_REL_RMS


@pytest.mark.parametrize("dim", [16, 24])
def test_quantize_kernel_indexes_like_the_pytorch_ops(dim):
    """The one-pass kernel (interpreter on CPU) on a transposed view (HF's layout), an odd
    length and a head dim that is not a power of two, with values exact in e4m3 (so the
    interpreter's conversion, which does not round as the GPU does, cannot differ): the same
    bytes as the PyTorch ops."""
    from flexsample.kernels.fp8 import triton_quantize

    gen = torch.Generator().manual_seed(5)
    exact = torch.randint(-16, 17, (2, 77, 3, dim), generator=gen).float() / 8  # 4 bits
    x = exact.to(torch.bfloat16).transpose(1, 2)  # [B, H, L, D], rows H*D apart
    scales = torch.tensor([[2.0, 4.0, 8.0], [1.0, 0.5, 16.0]])
    got = triton_quantize(x, scales)
    want = fp8.quantize(x, scales)
    assert got.is_contiguous() and got.dtype == fp8.FP8
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    swapped = triton_quantize(x, scales.flip(1))
    assert not torch.equal(swapped.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_quantize_kernel_equals_the_pytorch_ops():
    """On the GPU: random bf16 and fp16 values (every rounding case), a transposed view: the
    kernel's bytes equal the PyTorch ops'."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 1000, 8, 128, device="cuda", generator=gen).to(dtype).transpose(1, 2)
        scales = fp8.head_scales(x)
        got = fp8.quantize(x, scales, kernel=True)
        want = fp8.quantize(x, scales)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


@pytest.mark.gpu
@pytest.mark.parametrize("cell_score", ["max", "mean"])
@pytest.mark.parametrize("dim", [128, 16])
def test_gpu_estimate_with_fp8_matches_the_rounded_pytorch_path(cell_score, dim):
    """Llama-3-8B attention shape (32 / 8 heads, D 128; and D 16, below Triton's smallest
    8-bit dot), S = 16K + 77, bf16: the CUDA estimate with estimate_fp8 (e4m3 dots on sm_89+) =
    the PyTorch path on the rounded inputs, within the tensor cores' accumulation
    (FP8_TENSOR_CORE_REL_RMS; exact on older GPUs)."""
    x = structured_qkv(1, 32, 8, 16384 + 77, dim, dtype=torch.bfloat16, device="cuda")
    config = SampleConfig(cell_score=cell_score, estimate_fp8=True)
    got = antidiagonal_scores(x.q, x.k, config, dim**-0.5)
    rounded = [
        fp8.dequantize(fp8.quantize(t, s), s, torch.float32)
        for t, s in ((x.q, fp8.head_scales(x.q)), (x.k, fp8.head_scales(x.k)))
    ]
    want = torch_antidiagonal_scores(*rounded, config, dim**-0.5)
    bound = FP8_TENSOR_CORE_REL_RMS if fp8.tensor_cores(x.q.device) else ANTIDIAG_KERNEL_REL_RMS
    for name, g, w in zip(got._fields, got, want, strict=True):
        assert rel_rms(g, w) <= bound, name


@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_group_estimate_rounds_each_group_under_its_coarsest_scale(cell_score):
    """`group_estimate` with fp8 (PyTorch path): every query head of a group is rounded under
    the group's smallest scale (its largest |q|), the one scale that holds every row its
    strided rows read, = the reference on q and k so rounded. Heads 10x apart within a group:
    the largest head's values would saturate at 448 under a finer scale."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 200, 16, generator=gen) * torch.tensor([0.1, 1, 10] * 2).view(1, 6, 1, 1)
    k = torch.randn(2, 2, 200, 16, generator=gen)
    config = dataclasses.replace(
        CONFIG,
        cell_score=cell_score,
        estimate_fp8=True,
        group_estimate=True,
        score_backend="torch",
    )
    got = antidiagonal_scores(q, k, config, 0.25)
    group_scales = fp8.head_scales(q).unflatten(1, (2, 3)).amin(-1).repeat_interleave(3, 1)
    want = reference_antidiagonal_scores(_rounded(q, group_scales), _rounded(k), config, 0.25)
    assert got.mass.shape == (2, 2, 13, 13)
    for name, g, w in zip(got._fields, got, want, strict=True):
        assert rel_rms(g, w) <= ANTIDIAG_REL_RMS[cell_score][torch.float32], name
