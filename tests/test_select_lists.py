"""The selection kernel (`kernels/select_lists.py`) vs its spec, `select_blocks` + `keep_lists`,
bit for bit: the interpreter on CPU, real sizes on the GPU; and both against the reference."""

from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig
from flexsample.antidiagonal import BlockEstimate, select_blocks, selected_lists
from flexsample.block_mask import keep_lists
from flexsample.kernels import select_lists as kernels
from flexsample.kernels.select_lists import triton_select_lists
from flexsample.reference import reference_antidiagonal_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIST_NAMES = ("kv_num", "kv_idx", "full_num", "full_idx")


@st.composite
def estimates(draw):
    """(estimate of query blocks first.. (`[B, H, nQ, nKV]` float32 mass and peak), seq_len,
    config, first): smooth values, heavy-tailed ones, few distinct levels (ties), all-zero and
    tiny rows; peaks up to the mass, some exactly at `peak_bar`."""
    q_block = draw(st.sampled_from([16, 32, 64, 128]))
    kv_block = draw(st.sampled_from([16, 32, 64, 128]))
    seq_len = draw(st.integers(1, 1500))
    num_q, num_kv = -(-seq_len // q_block), -(-seq_len // kv_block)
    first = draw(st.integers(0, num_q - 1))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), num_q - first, num_kv)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["uniform", "heavy", "levels", "zero rows", "tiny"]))
    if kind == "uniform":
        est = torch.rand(shape, generator=gen)
    elif kind == "heavy":
        est = torch.randn(shape, generator=gen).mul(4).exp()
    elif kind in ("levels", "zero rows"):  # exact ties; with alpha 0.5 / 0.75, sums that hit
        est = torch.randint(0, 4, shape, generator=gen).float() / 8  # the bar exactly
        if kind == "zero rows":
            est *= torch.rand(*shape[:-1], 1, generator=gen) < 0.5
    else:
        est = torch.rand(shape, generator=gen) * 1e-38
    config = SampleConfig(
        estimator="antidiagonal",
        q_block=q_block,
        kv_block=kv_block,
        alpha=draw(st.sampled_from([0.3, 0.5, 0.75, 0.8, 0.9, 0.95, 1.0])),
        local_blocks=draw(st.integers(0, 2)),
        row_threshold=draw(st.sampled_from([None, 0.5, 2.0, 7.5])),
        dense_tail=draw(st.sampled_from([0, 0, 1, 64, 200])),
    )
    peak = (est * torch.rand(shape, generator=gen)).clamp(max=1.0)
    bar = config.peak_bar(seq_len)
    if bar is not None and bar <= 1:  # ties with the bar, at its float32 rounding
        at_bar = torch.rand(shape, generator=gen) < 0.1
        peak = torch.where(at_bar, torch.tensor(bar, dtype=torch.float32), peak)
    return BlockEstimate(est, peak), seq_len, config, first


def _on(estimate: BlockEstimate, device) -> BlockEstimate:
    return BlockEstimate(*(x.to(device) for x in estimate))


def _zero_peak(est: torch.Tensor) -> BlockEstimate:
    return BlockEstimate(est, torch.zeros_like(est))


def _torch_lists(estimate, seq_len, config, first):
    keep = select_blocks(estimate, seq_len, config, first)
    rows = torch.arange(first, first + keep.shape[-2]) * config.q_block
    return keep, keep_lists(keep, rows.to(keep.device), config.kv_block)


def _kernel_lists(estimate, seq_len, config, first):
    return triton_select_lists(estimate, seq_len, config, first)


def _assert_equal(got, want):
    assert torch.equal(got[0], want[0]), "keep"
    for name, g, w in zip(LIST_NAMES, got[1], want[1], strict=True):
        assert g.dtype == w.dtype == torch.int32, name
        assert torch.equal(g, w), name


@given(estimates())
def test_kernel_equals_the_pytorch_path(case):
    est, seq_len, config, first = case
    est = _on(est, DEVICE)
    _assert_equal(
        _kernel_lists(est, seq_len, config, first), _torch_lists(est, seq_len, config, first)
    )


@given(estimates())
def test_pytorch_path_equals_the_reference(case):
    """Query blocks `first`.. selected alone equal the reference's rows of the whole mask
    (it selects from query block 0; the blocks before `first` get other rows)."""
    est, seq_len, config, first = case
    gen = torch.Generator().manual_seed(first)
    before = torch.rand(*est.mass.shape[:2], first, est.mass.shape[-1], generator=gen)
    whole = BlockEstimate(*(torch.cat([before, x], 2) for x in est))
    want = reference_antidiagonal_select(whole, seq_len, config)
    assert torch.equal(select_blocks(est, seq_len, config, first), want[:, :, first:])


def test_selected_lists_takes_the_kernel_where_use_kernels():
    est = _zero_peak(torch.rand(1, 2, 8, 8, device=DEVICE))
    for backend, calls in (("torch", 0), ("triton", 1)):
        config = SampleConfig(
            estimator="antidiagonal", q_block=16, kv_block=16, score_backend=backend
        )
        with mock.patch.object(kernels, "triton_select_lists", wraps=triton_select_lists) as spy:
            selected_lists(est, 128, config)
        assert spy.call_count == calls, backend


@triton.jit
def _cut_without_tie_order(units, other, covered, bar):
    """Planted bug: the bisection's cut, but every block at the tie value is kept."""
    lo = tl.full([], 1, tl.int64)
    hi = tl.full([], kernels.UNIT_END, tl.int64)
    for _ in range(kernels.STEPS):
        mid = (lo + hi) // 2
        above = covered + tl.sum(tl.where(other & (units >= mid), units, 0), 0)
        fits = above.to(tl.float64) < bar
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid + 1)
    return other & (units >= hi - 1)


@pytest.mark.skipif(DEVICE == "cuda", reason="patches a kernel helper: interpreter only")
def test_planted_tie_bug_fails_the_check():
    est = _zero_peak(torch.full((1, 1, 8, 8), 0.25, device=DEVICE))  # every block ties
    config = SampleConfig(
        estimator="antidiagonal", q_block=16, kv_block=16, local_blocks=0, dense_tail=0, alpha=0.5
    )
    want = _torch_lists(est, 128, config, 0)
    _assert_equal(_kernel_lists(est, 128, config, 0), want)
    with mock.patch.object(kernels, "_cut", _cut_without_tie_order):
        with pytest.raises(AssertionError, match="keep"):
            _assert_equal(_kernel_lists(est, 128, config, 0), want)


def test_alpha_reaches_the_kernel_in_float64():
    """Query block 2 keeps block 1 only if the forced mass R = 2^31 + 2^28 - 512 units is below
    0.9 * (R + 2^28): true for alpha = 0.9 in float64, false for float32's 0.89999998."""
    est = torch.zeros(1, 1, 3, 3)
    est[0, 0, 2] = torch.tensor([0.5, 0.0625, (2**28 - 512) / 2**32])
    est[0, 0, :2, :2] = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    config = SampleConfig(
        estimator="antidiagonal", q_block=16, kv_block=16, local_blocks=0, dense_tail=0, alpha=0.9
    )
    est = _zero_peak(est.to(DEVICE))
    got = _kernel_lists(est, 48, config, 0)
    assert got[0][0, 0, 2].tolist() == [True, True, True]
    _assert_equal(got, _torch_lists(est, 48, config, 0))


@pytest.mark.parametrize(
    "row",
    [[0.0, 0.375, 0.25, 0.0], [0.0, 0.25, 0.25, 0.0]],
    ids=[
        # Units of a row's top blocks sit just under 2^32: an exponent off by one would put
        # both blocks above the bisection's range and keep both.
        "top of the unit range",
        # The second tied block starts at exactly the bar (0.25 of the row's 0.5): the prefix
        # stops before the bar is reached, not after.
        "running sum meets the bar exactly",
    ],
)
def test_pinned_rows_at_alpha_one_half_keep_one_block(row):
    est = torch.zeros(1, 1, 4, 4)
    est[0, 0, 3] = torch.tensor(row)
    config = SampleConfig(
        estimator="antidiagonal", q_block=16, kv_block=16, local_blocks=0, dense_tail=0, alpha=0.5
    )
    est = _zero_peak(est)
    got = _kernel_lists(_on(est, DEVICE), 64, config, 0)
    assert got[0][0, 0, 3].tolist() == [True, True, False, True]
    _assert_equal(got, _torch_lists(_on(est, DEVICE), 64, config, 0))
    assert torch.equal(reference_antidiagonal_select(est, 64, config), got[0].cpu())


@pytest.mark.parametrize(
    "seq_len, peak, kept",
    [
        (64, 0.25, True),
        (64, 0.2499999850988388, False),
        # bar 16/49 rounds down in float32: its float32 value is below the bar (a float32 bar
        # would keep it), the next float32 is above.
        (49, 0.3265306055545807, False),
        (49, 0.32653063535690308, True),
    ],
)
def test_a_peak_at_the_bar_is_kept_and_one_below_is_not(seq_len, peak, kept):
    """row_threshold 1, blocks of 16: bar 16 / S; the sink and diagonal blocks reach alpha,
    so block 1 is kept for its peak only: at or above the float64 bar, not below it."""
    est = torch.zeros(1, 1, 4, 4)
    est[0, 0, 3] = torch.tensor([0.0, 0.25, 1.0, 2.0])
    peaks = torch.zeros_like(est)
    peaks[0, 0, 3, 1] = peak
    config = SampleConfig(
        estimator="antidiagonal",
        q_block=16,
        kv_block=16,
        local_blocks=0,
        dense_tail=0,
        alpha=0.5,
        row_threshold=1.0,
    )
    estimate = BlockEstimate(est, peaks)
    got = _kernel_lists(_on(estimate, DEVICE), seq_len, config, 0)
    assert got[0][0, 0, 3].tolist() == [True, kept, False, True]
    _assert_equal(got, _torch_lists(_on(estimate, DEVICE), seq_len, config, 0))
    assert torch.equal(reference_antidiagonal_select(estimate, seq_len, config), got[0].cpu())


def test_more_key_blocks_than_the_kernel_holds_is_a_clear_error():
    est = _zero_peak(torch.zeros(1, 1, 1, kernels.MAX_KV_BLOCKS + 1, device=DEVICE))
    with pytest.raises(ValueError, match="at most 8192"):
        _kernel_lists(est, 128 * est.mass.shape[-1], SampleConfig(estimator="antidiagonal"), 0)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [32768 - 77, 131072, 1048576])
def test_gpu_kernel_equals_the_pytorch_path_at_real_sizes(seq_len):
    """Hq 32 (8 at 1M), a softmax-shaped estimate: the rows sum to their strided rows, and each
    peak lies between the mean and the sum of the 8 rows' shares (some at the bar)."""
    _assert_equal(*_lists_at_real_size(seq_len, "cuda"))


def _lists_at_real_size(seq_len: int, device: str):
    config = SampleConfig()
    heads = 32 if seq_len <= 131072 else 8
    num_q = num_kv = -(-seq_len // 128)
    rows = 128 // config.stride
    gen = torch.Generator(device=device).manual_seed(seq_len)
    logits = torch.randn(1, heads, num_q, num_kv, device=device, generator=gen) * 3
    causal = torch.arange(num_kv, device=device) <= torch.arange(num_q, device=device)[:, None]
    est = logits.masked_fill(~causal, float("-inf")).softmax(-1) * rows
    spread = 1 + (rows - 1) * torch.rand(est.shape, device=device, generator=gen)
    peak = (est / rows * spread).clamp(max=1.0)
    at_bar = torch.rand(est.shape, device=device, generator=gen) < 0.01
    peak = torch.where(at_bar & causal, config.peak_bar(seq_len), peak).float()
    estimate = BlockEstimate(est, peak)
    return _kernel_lists(estimate, seq_len, config, 0), _torch_lists(estimate, seq_len, config, 0)


def test_real_size_case_runs_in_the_interpreter():
    """The GPU test's case at a small size (the interpreter), so its set-up runs in CI."""
    got, want = _lists_at_real_size(1000, "cpu")
    _assert_equal(got, want)
    assert got[0].sum() > want[0].shape[-2]  # more than the diagonal blocks kept
