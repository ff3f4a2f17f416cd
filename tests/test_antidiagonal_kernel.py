"""The antidiagonal estimate's Triton kernels (ALGORITHM §9) vs the reference: the interpreter
on CPU (small shapes), the PyTorch path on the GPU at a Llama-3-8B shape."""

import dataclasses
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig
from flexsample.antidiagonal import (
    CHUNK_ELEMENTS,
    BlockEstimate,
    antidiagonal_scores,
)
from flexsample.kernels import antidiagonal as kernels
from flexsample.kernels.antidiagonal import triton_antidiagonal_scores
from flexsample.reference import reference_antidiagonal_scores

from strategies import qkv
from tolerance import ANTIDIAG_KERNEL_REL_RMS, rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scores(q, k, config, scale, **launch):
    return triton_antidiagonal_scores(
        q, k, config, scale, **({"chunk_elements": CHUNK_ELEMENTS} | launch)
    )


def _check(got, q, k, config, scale):
    """`got` (mass and peak) matches the reference; each strided row with a real row sums to
    one; zeros above the diagonal; a peak is a share, at most 1."""
    want = reference_antidiagonal_scores(q, k, config, scale)
    for name in BlockEstimate._fields:
        err = rel_rms(getattr(got, name), getattr(want, name))
        assert err <= ANTIDIAG_KERNEL_REL_RMS, f"{name}: relative RMS error {err:.3g}"
    mass, peak = got
    seq_len, s = q.shape[2], config.stride
    first = torch.arange(mass.shape[-2], device=q.device) * config.q_block
    rows = torch.clamp(seq_len - first, max=config.q_block)
    if seq_len >= s:
        torch.testing.assert_close(mass.sum(-1), (rows / s).ceil().expand_as(mass[..., 0]))
    last_block = (first + rows - 1) // config.kv_block
    future = torch.arange(mass.shape[-1], device=q.device) > last_block[:, None]
    for x in got:
        assert (x[..., future] == 0).all() and (x >= 0).all()
    assert (peak <= 1 + 1e-5).all()


def _rows(estimate: BlockEstimate, first: int, end: int) -> BlockEstimate:
    return BlockEstimate(*(x[:, :, first:end] for x in estimate))


@given(
    qkv(max_len=160, head_dims=(16, 24, 64)),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.sampled_from([16, 32, 64, 128]),
    st.sampled_from([16, 32, 64, 128]),
    st.sampled_from([1, CHUNK_ELEMENTS]),
    st.sampled_from(["max", "mean"]),
    st.sampled_from([0, 2, 5]),
)
def test_kernel_matches_reference(
    inputs, stride, q_block, kv_block, chunk_elements, cell_score, splits
):
    """Default tiles; chunk_elements 1 launches one query block or row tile at a time; splits
    > 0 splits the key tiles of every row tile among that many programs (some shares empty)."""
    q, k, _ = (x.to(DEVICE) for x in inputs)
    stride = min(stride, q_block, kv_block)
    config = SampleConfig(
        estimator="antidiagonal",
        stride=stride,
        q_block=q_block,
        kv_block=kv_block,
        cell_score=cell_score,
    )
    scale = q.shape[-1] ** -0.5
    got = _scores(q, k, config, scale, chunk_elements=chunk_elements, splits=splits)
    _check(got, q, k, config, scale)


@pytest.mark.parametrize("cell_score", ["max", "mean"])
@pytest.mark.parametrize(
    "seq_len, stride, q_block, kv_block, dim",
    [(77, 1, 16, 64, 24), (150, 4, 32, 16, 32), (201, 16, 16, 128, 16)],
)
def test_small_tiles_match_reference(seq_len, stride, q_block, kv_block, dim, cell_score):
    """Tiles small enough for several row and key tiles, dot steps per segment (D > BLOCK_K,
    masked when D is not a multiple), launches, key blocks wider than a key tile, and keys
    split among 3 programs (uneven shares, empty ones for the first tiles; the tests below
    run these tiles unsplit)."""
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(2, 6, seq_len, dim, generator=gen).to(DEVICE)
    k = torch.randn(2, 2, seq_len, dim, generator=gen).to(DEVICE)
    config = SampleConfig(
        estimator="antidiagonal",
        stride=stride,
        q_block=q_block,
        kv_block=kv_block,
        cell_score=cell_score,
    )
    launch = {"block_m": 32, "block_n": 16, "block_k": 16, "chunk_elements": 1, "splits": 3}
    _check(_scores(q, k, config, 0.3, **launch), q, k, config, 0.3)


@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_only_tiles_below_the_first_row_skip_the_masks(cell_score):
    """Logits -100 + key / 2: all negative, larger for later keys. An unmasked tile that reaches
    a program's rows scores a future key above every causal one, and in "max" an unmasked tile
    of the partial last strided row (S % s = 1) a segment past S (read as 0) above every real
    cell. Tiles of 16 keys, programs of 16 strided rows: the second program has one unmasked
    tile, the third (the partial row) none."""
    seq_len = 161
    q = torch.zeros(1, 4, seq_len, 16, device=DEVICE)
    k = torch.zeros(1, 2, seq_len, 16, device=DEVICE)
    q[..., :2] = 1.0
    k[..., 0] = -100.0
    k[..., 1] = torch.arange(seq_len, device=DEVICE) / 2
    config = SampleConfig(
        estimator="antidiagonal", stride=4, q_block=16, kv_block=16, cell_score=cell_score
    )
    launch = {"block_m": 32, "block_n": 16, "block_k": 16}
    _check(_scores(q, k, config, 0.1, **launch), q, k, config, 0.1)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_zero_and_negative_scales_match_the_reference(cell_score, scale):
    """SDPA takes any finite scale: "max" may scale the segments' max only when the scale is
    positive (a negative one turns the max into a min, a zero one makes -inf * 0 = NaN)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 203, 16, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, 203, 16, generator=gen).to(DEVICE)
    config = SampleConfig(
        estimator="antidiagonal", stride=4, q_block=16, kv_block=32, cell_score=cell_score
    )
    launch = {"block_m": 32, "block_n": 16, "block_k": 16}
    _check(_scores(q, k, config, scale, **launch), q, k, config, scale)


@pytest.mark.parametrize(
    "backend, kernel", [("torch", False), ("auto", DEVICE == "cuda"), ("triton", True)]
)
def test_the_estimate_takes_the_kernel_where_use_kernels(backend, kernel):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 90, 16, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, 90, 16, generator=gen).to(DEVICE)
    config = SampleConfig(estimator="antidiagonal", q_block=16, kv_block=32, score_backend=backend)
    result = torch.zeros(2, 1, 4, 6, 3, device=DEVICE)
    with mock.patch.object(kernels, "antidiagonal_block_scores", return_value=result) as spy:
        antidiagonal_scores(q, k, config, 0.25)
    assert spy.call_count == kernel


@pytest.mark.parametrize("cell_score", ["max", "mean"])
@pytest.mark.parametrize("stride, kv_block", [(4, 32), (1, 64)], ids=["1 sub", "4 subs"])
def test_a_range_of_query_blocks_reads_only_their_rows(cell_score, stride, kv_block):
    """The kernels with `q_blocks` (context parallelism's chunks): the full estimate's rows
    (checked against the reference; S = 301 ends in a partial strided row; key blocks of one
    and of four key-tile sub-blocks), with q NaN
    outside them, in several launches and tiles."""
    gen = torch.Generator().manual_seed(2)
    q = (torch.randn(1, 4, 301, 32, generator=gen) * 2).to(DEVICE)
    k = torch.randn(1, 2, 301, 32, generator=gen).to(DEVICE)
    config = SampleConfig(
        estimator="antidiagonal",
        stride=stride,
        q_block=16,
        kv_block=kv_block,
        cell_score=cell_score,
    )
    launch = {"block_m": 32, "block_n": 16, "block_k": 16, "chunk_elements": 1}
    full = _scores(q, k, config, 0.2, **launch)
    _check(full, q, k, config, 0.2)
    for first, end in [(1, 3), (17, 19), (5, 6)]:
        masked = q.clone()
        masked[:, :, : first * 16] = float("nan")
        masked[:, :, end * 16 :] = float("nan")
        got = _scores(masked, k, config, 0.2, q_blocks=(first, end), **launch)
        torch.testing.assert_close(got, _rows(full, first, end))
        rows = q[:, :, first * 16 : end * 16]  # only the blocks' rows, in place
        got = _scores(rows, k, config, 0.2, q_blocks=(first, end), q_row0=first * 16, **launch)
        torch.testing.assert_close(got, _rows(full, first, end))


def test_scores_do_not_depend_on_memory_layout():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 100, 4, 32, generator=gen).to(DEVICE).transpose(1, 2)  # [B, S, H, D]
    k = torch.randn(2, 100, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    config = SampleConfig(estimator="antidiagonal", q_block=32, kv_block=32)
    got = _scores(q, k, config, 0.2)
    torch.testing.assert_close(got, _scores(q.contiguous(), k.contiguous(), config, 0.2))


@triton.jit
def _xattention_order(m, a, STRIDE: tl.constexpr):
    return STRIDE - 1 - a + 0 * m


@triton.jit
def _no_causal_mask(acc, n, m, row_scale, diag_logit):
    return tl.where(n[None, :] == m[:, None], diag_logit[:, None], acc * row_scale[:, None])


@triton.jit
def _sum_over_s(m, seq_len, STRIDE: tl.constexpr):  # the mean's count is s everywhere
    return tl.full(m.shape, STRIDE, tl.int32), tl.full(m.shape, STRIDE, tl.int32)


@triton.jit
def _sub_max(logit, R: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    return tl.max(tl.reshape(logit, (R, BLOCK_N // SUB, SUB)), 2)


@pytest.mark.skipif(DEVICE == "cuda", reason="patches kernel helpers: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cell_score, patch",
    [
        ("mean", ("_order", _xattention_order)),
        ("mean", ("_tile_logits", _no_causal_mask)),
        ("mean", ("_cell_counts", _sum_over_s)),
        ("max", ("_order", _xattention_order)),
        ("max", ("_sub_lse", _sub_max)),
    ],
    ids=[
        "mean: XAttention's antidiagonal on every row",
        "mean: no causal mask",
        "mean: normaliser s",
        "max: XAttention's antidiagonal on every row",
        "max: max for log-sum-exp",
    ],
)
def test_planted_bugs_fail_the_kernel_check(dtype, cell_score, patch):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 250, 32, generator=gen) * 2).to(dtype)
    k = torch.randn(1, 2, 250, 32, generator=gen).to(dtype)
    config = SampleConfig(estimator="antidiagonal", q_block=32, kv_block=32, cell_score=cell_score)
    want = reference_antidiagonal_scores(q, k, config, 32**-0.5).mass
    assert rel_rms(_scores(q, k, config, 32**-0.5).mass, want) <= ANTIDIAG_KERNEL_REL_RMS
    with mock.patch.object(kernels, *patch):
        err = rel_rms(_scores(q, k, config, 32**-0.5).mass, want)
    assert err > 100 * ANTIDIAG_KERNEL_REL_RMS, f"{patch[0]}: {err:.3g}"


@triton.jit
def _rows_mean(share, R: tl.constexpr, J: tl.constexpr, SUBS: tl.constexpr):
    return tl.sum(tl.sum(tl.reshape(share, (R, J // SUBS, SUBS)), 2), 0) / R


@triton.jit
def _rows_sub_max(share, R: tl.constexpr, J: tl.constexpr, SUBS: tl.constexpr):
    return tl.max(tl.max(tl.reshape(share, (R, J // SUBS, SUBS)), 2), 0)


@pytest.mark.skipif(DEVICE == "cuda", reason="patches kernel helpers: interpreter only")
@pytest.mark.parametrize(
    "patch", [_rows_mean, _rows_sub_max], ids=["mean over rows", "max over sub-blocks"]
)
def test_planted_peak_bugs_fail_the_kernel_check(patch):
    """Key blocks of 4 sub-blocks (stride 1, kv_block 64, key tiles of 16)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 150, 16, generator=gen) * 2
    k = torch.randn(1, 2, 150, 16, generator=gen)
    config = SampleConfig(estimator="antidiagonal", stride=1, q_block=16, kv_block=64)
    launch = {"block_m": 32, "block_n": 16, "block_k": 16}
    want = reference_antidiagonal_scores(q, k, config, 0.25).peak
    assert rel_rms(_scores(q, k, config, 0.25, **launch).peak, want) <= ANTIDIAG_KERNEL_REL_RMS
    with mock.patch.object(kernels, "_rows_peak", patch):
        err = rel_rms(_scores(q, k, config, 0.25, **launch).peak, want)
    assert err > 100 * ANTIDIAG_KERNEL_REL_RMS, f"{patch.__name__}: {err:.3g}"


@triton.jit
def _first_split_only(ROW_LSE, rows, ok, splits, split_rows):
    lse = tl.load(ROW_LSE + rows, mask=ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@pytest.mark.skipif(DEVICE == "cuda", reason="patches kernel helpers: interpreter only")
def test_planted_split_bug_fails_the_kernel_check():
    """Rows normalised by their first key split alone: the check fails once keys are split."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 150, 16, generator=gen) * 2
    k = torch.randn(1, 2, 150, 16, generator=gen)
    config = SampleConfig(estimator="antidiagonal", stride=1, q_block=16, kv_block=16)
    launch = {"block_m": 32, "block_n": 16, "block_k": 16, "splits": 3}
    want = reference_antidiagonal_scores(q, k, config, 0.25).mass
    assert rel_rms(_scores(q, k, config, 0.25, **launch).mass, want) <= ANTIDIAG_KERNEL_REL_RMS
    with mock.patch.object(kernels, "_row_lse", _first_split_only):
        err = rel_rms(_scores(q, k, config, 0.25, **launch).mass, want)
    assert err > 100 * ANTIDIAG_KERNEL_REL_RMS, f"first split only: {err:.3g}"


def test_key_splits_fill_the_gpu_and_keep_tiles_in_l2():
    """132 SMs. Launches of row tiles 1..L key tiles long (strided rows 0.. of S/16): splits
    fill a short launch, and long ones take LOCALITY_SPLITS where their tiles allow."""
    cuda = torch.device("cuda")
    assert kernels.LOCALITY_SPLITS == 4
    with mock.patch.object(
        torch.cuda, "get_device_properties", return_value=mock.Mock(multi_processor_count=132)
    ):
        assert kernels.key_splits(0, 128, 1, 16, cuda) == 4  # 32K, Hkv 2: 2 fill, 4 locality
        assert kernels.key_splits(0, 64, 1, 8, cuda) == 2  # 16K, Hkv 2: 4 wanted, 4 tiles each
        assert kernels.key_splits(0, 128, 1, 4, cuda) == 1  # 8K, Hkv 8: too short to split
        assert kernels.key_splits(0, 512, 1, 16, cuda) == 4  # 32K, Hkv 8: full, 4 locality
        assert kernels.key_splits(0, 4096, 1, 256, cuda) == 4  # 512K, Hkv 8
        assert kernels.key_splits(0, 8, 1, 64, cuda) == 16  # 128K, B 1, Hkv 1 (4 key tiles each)
    assert kernels.key_splits(5, 64, 1, 3, cuda) == 3
    assert kernels.key_splits(0, 4, 1, 64, torch.device("cpu")) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("group_estimate", [False, True])
@pytest.mark.parametrize("cell_score", ["max", "mean"])
@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (6, 2)])
def test_kernel_matches_the_pytorch_path_at_llama_shape(
    stride, cell_score, heads, kv_heads, group_estimate
):
    """B 1, Hq 32, Hkv 8 (and the real-text model's 6 / 2, whose launches split the keys), D
    128, S = 16K + 77 (odd: a partial strided row and query block), bf16: the kernel against
    the PyTorch path on the same inputs in fp32 (fp32 logits, as the kernel keeps them; with
    "mean" the bf16 path rounds each logit), within the kernel's bound; per query head and
    per KV head (`group_estimate`)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    seq_len = 16384 + 77
    q = torch.randn(1, heads, seq_len, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq_len, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k[:, :, torch.randint(0, seq_len, (64,), device="cuda", generator=gen)] *= 4  # heavy keys
    config = SampleConfig(
        stride=stride, alpha=0.9, cell_score=cell_score, group_estimate=group_estimate
    )
    scale = 128**-0.5
    got = antidiagonal_scores(q, k, config, scale)  # auto on CUDA: the kernel
    torch_path = dataclasses.replace(config, score_backend="torch")
    want = antidiagonal_scores(q.float(), k.float(), torch_path, scale)
    assert got.mass.shape[1] == (kv_heads if group_estimate else heads)
    for name in BlockEstimate._fields:
        err = rel_rms(getattr(got, name), getattr(want, name))
        assert err <= ANTIDIAG_KERNEL_REL_RMS, f"{name}: relative RMS error {err:.3g}"
    torch.testing.assert_close(
        got.mass.sum(-1)[..., :-1], torch.full_like(got.mass[..., :-1, 0], 128 / stride)
    )
