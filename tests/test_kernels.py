"""Triton kernels (sampling, block lists) vs their specs: interpreter on CPU, real sizes on
the GPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample.block_mask import build_block_mask, kept_blocks, torch_block_lists
from flexsample.kernels import sampling
from flexsample.kernels.block_lists import triton_block_lists
from flexsample.kernels.sampling import triton_tile_scores
from flexsample.layout import make_layout
from flexsample.reference import reference_block_scores, reference_tile_scores
from flexsample.scores import reduce_tiles, tile_rows, torch_tile_scores
from flexsample.selection import select_stripes

from strategies import configs, qkv, well_separated
from tolerance import assert_scores_close, rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(config, seq_len, device=DEVICE, kernels=True):
    return make_layout(config, seq_len, torch.device(device), kernels=kernels)


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh buffers hold NaN (floats) or a sentinel (ints), so an unwritten output shows."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -12345)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@given(
    qkv(max_len=200, head_dims=(16, 24, 64)),
    configs(score_backend="triton", tile_alpha=None),
    st.sampled_from([1, 2, 3, sampling.SPLIT_BLOCKS]),
)
def test_kernel_scores_match_reference(inputs, config, blocks):
    q, k, _ = (x.to(DEVICE) for x in inputs)
    scale = q.shape[-1] ** -0.5
    layout = _layout(config, q.shape[2])
    got_tiles = triton_tile_scores(q, k, layout, scale, split_blocks=blocks)
    assert_scores_close(got_tiles, reference_tile_scores(q, k, config, scale))
    got_scores, got_covered = reduce_tiles(*got_tiles, layout)
    expected_scores, expected_covered = reference_block_scores(q, k, config, scale)
    if well_separated(expected_scores, expected_covered, config.alpha, 1e-4):
        assert torch.equal(
            select_stripes(got_scores, got_covered, config),
            select_stripes(expected_scores, expected_covered, config),
        )


@given(st.integers(1, 40), st.sampled_from([1, 5, 16]))
def test_kernel_handles_sequences_shorter_than_a_block(seq_len, sample_block):
    config = SampleConfig(min_seq_len=0, sample_block=sample_block, score_backend="triton")
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, 4, seq_len, 32, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, seq_len, 32, generator=gen).to(DEVICE)
    got = triton_tile_scores(q, k, _layout(config, seq_len), 0.2)
    assert_scores_close(got, reference_tile_scores(q, k, config, 0.2))


def test_scores_do_not_depend_on_strides():
    torch.manual_seed(0)
    config = SampleConfig(min_seq_len=0, q_block=32, kv_block=32, score_backend="triton")
    q = torch.randn(1, 100, 4, 32).to(DEVICE).transpose(1, 2)  # [B, S, H, D] memory layout
    k = torch.randn(1, 100, 2, 32).to(DEVICE).transpose(1, 2)
    layout = _layout(config, 100)
    got = triton_tile_scores(q, k, layout, 0.2)
    expected = triton_tile_scores(q.contiguous(), k.contiguous(), layout, 0.2)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 700),
    st.sampled_from([16, 32, 64, 128]),
    st.sampled_from([16, 32, 64, 128]),
    st.floats(0.0, 0.5),
    st.floats(0.0, 1.0),
    st.integers(0, 2**16),
)
def test_block_lists_kernel_equals_torch_path(
    poisoned, batch, heads, seq_len, q_block, kv_block, window_ratio, stripe_share, seed
):
    config = SampleConfig(q_block=q_block, kv_block=kv_block, window_ratio=window_ratio)
    num_kv = -(-seq_len // kv_block)
    gen = torch.Generator().manual_seed(seed)
    stripes = (torch.rand(batch, heads, num_kv, generator=gen) < stripe_share).to(DEVICE)
    layout = _layout(config, seq_len)
    got = triton_block_lists(stripes, layout.win_lo, layout.win_hi, q_block, kv_block)
    expected = torch_block_lists(stripes, layout)
    for name, g, e in zip(("kv_num", "kv_idx", "full_num", "full_idx"), got, expected, strict=True):
        assert g.dtype == e.dtype == torch.int32, name
        assert torch.equal(g, e), name


def test_block_mask_is_the_same_on_both_paths():
    seq_len = 3000
    gen = torch.Generator().manual_seed(1)
    stripes = (torch.rand(2, 3, -(-seq_len // 64), generator=gen) < 0.3).to(DEVICE)
    config = SampleConfig(q_block=64, kv_block=64)
    masks = [build_block_mask(stripes, _layout(config, seq_len, kernels=b)) for b in (False, True)]
    assert torch.equal(kept_blocks(masks[0]), kept_blocks(masks[1]))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(masks[0], name), getattr(masks[1], name)), name


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        sample_block_mask(q, q, SampleConfig(score_backend="triton", min_seq_len=0))


def test_planted_misplaced_block_fails_the_score_check():
    """The score comparison sees one block's mass written into its neighbour."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2048, 64, generator=gen).bfloat16().to(DEVICE)
    k = torch.randn(1, 2, 2048, 64, generator=gen).bfloat16().to(DEVICE)
    config = SampleConfig(min_seq_len=0)
    scores, covered = triton_tile_scores(q, k, _layout(config, 2048), 0.125)
    expected = reference_tile_scores(q, k, config, 0.125)
    assert_scores_close((scores, covered), expected)
    moved = scores.clone()
    moved[..., 3] += moved[..., 2]
    moved[..., 2] = 0
    with pytest.raises(AssertionError, match="scores: relative RMS error"):
        assert_scores_close((moved, covered), expected)


# --- GPU: real sizes --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seq_len", [4096, 32768 - 77])
def test_gpu_kernel_matches_torch_path_at_real_sizes(dtype, seq_len):
    torch.manual_seed(0)
    config = SampleConfig(min_seq_len=0)
    q = torch.randn(1, 32, seq_len, 128, device="cuda", dtype=dtype) * 2
    k = torch.randn(1, 8, seq_len, 128, device="cuda", dtype=dtype)
    layout = _layout(config, seq_len)
    got = triton_tile_scores(q, k, layout, 128**-0.5)
    expected = torch_tile_scores(q, k, layout, 128**-0.5)
    assert_scores_close(got, expected, bound=1e-4)
    rows = tile_rows(layout)  # each tile's mass sums to its row count
    torch.testing.assert_close(
        (got[1] + got[0].sum(-1)) / rows, torch.ones_like(got[1]), atol=1e-3, rtol=0
    )


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [65536, 131072 - 77])
def test_gpu_block_lists_kernel_equals_torch_path_at_real_sizes(seq_len):
    config = SampleConfig()
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    stripes = torch.rand(1, 32, -(-seq_len // 128), device="cuda", generator=gen) < 0.1
    layout = _layout(config, seq_len)
    got = triton_block_lists(stripes, layout.win_lo, layout.win_hi, config.q_block, config.kv_block)
    for g, e in zip(got, torch_block_lists(stripes, layout), strict=True):
        assert torch.equal(g, e)


@pytest.mark.gpu
def test_gpu_sample_attention_compiles_fullgraph_without_recompiles():
    from torch._dynamo.utils import counters

    config = SampleConfig(min_seq_len=0)
    inputs, expected = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        q = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        inputs.append((q, k, v))
        expected.append(sample_attention(q, k, v, config, enable_gqa=True))
    # Counted after the eager calls: their own compiled flex_attention is a Dynamo graph too.
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(
        lambda q, k, v: sample_attention(q, k, v, config, enable_gqa=True), fullgraph=True
    )
    for (q, k, v), eager in zip(inputs, expected, strict=True):
        assert rel_rms(fn(q, k, v), eager) < 1e-2
    assert counters["stats"]["unique_graphs"] == 1
