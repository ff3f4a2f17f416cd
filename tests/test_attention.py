import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import flexsample
import flexsample.attention as attention_module
from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample.block_mask import kept_blocks
from flexsample.reference import masked_attention, reference_block_scores, reference_mask

from contracts import LargestOutput
from strategies import configs, qkv, well_separated
from tolerance import assert_output_close, causal_mask


@given(qkv(), configs(alpha=1.0))
def test_alpha_one_equals_sdpa(inputs, config):
    q, k, v = inputs
    out = sample_attention(q, k, v, config, enable_gqa=True)
    assert_output_close(out, q, k, v, causal_mask(q))


@given(qkv(), configs(window_ratio=1.0))
def test_full_window_equals_sdpa(inputs, config):
    q, k, v = inputs
    out = sample_attention(q, k, v, config, enable_gqa=True)
    assert_output_close(out, q, k, v, causal_mask(q))


@given(qkv(), configs())
def test_sparse_path_is_exact_for_its_mask(inputs, config):
    q, k, v = inputs
    keep = kept_blocks(sample_block_mask(q, k, config))
    idx = torch.arange(q.shape[2])
    mask = keep[:, :, idx // config.q_block][..., idx // config.kv_block]
    mask &= idx[None, :] <= idx[:, None]
    scores, covered = reference_block_scores(q, k, config)
    if q.dtype == torch.float32 and well_separated(scores, covered, config.alpha, 1e-5):
        assert torch.equal(mask, reference_mask(q, k, config))
    assert_output_close(sample_attention(q, k, v, config, enable_gqa=True), q, k, v, mask)


def test_planted_wrong_block_fails_the_output_check():
    """The output bound is tight enough to see one misplaced block of the mask."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen).bfloat16() for _ in range(3))
    config = SampleConfig(min_seq_len=0, q_block=32, kv_block=32, alpha=0.9)
    keep = kept_blocks(sample_block_mask(q, k, config))
    idx = torch.arange(256)
    mask = keep[:, :, idx // 32][..., idx // 32] & (idx[None, :] <= idx[:, None])
    out = sample_attention(q, k, v, config)
    assert_output_close(out, q, k, v, mask)
    moved = mask.clone()
    moved[..., 200:224, 0:32] = ~moved[..., 200:224, 0:32]  # one block of one query block
    with pytest.raises(AssertionError, match="output relative RMS error"):
        assert_output_close(out, q, k, v, moved)


def test_custom_scale_is_used():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    config = SampleConfig(alpha=1.0, min_seq_len=0, q_block=16, kv_block=16)
    out = sample_attention(q, k, v, config, scale=0.7)
    assert_output_close(out, q, k, v, causal_mask(q), scale=0.7)


def test_block_mask_has_query_heads():
    q, k = torch.randn(2, 6, 100, 16), torch.randn(2, 2, 100, 16)
    config = SampleConfig(min_seq_len=0, q_block=32, kv_block=32)
    block_mask = sample_block_mask(q, k, config)
    assert block_mask.kv_num_blocks.shape == (2, 6, 4)
    assert block_mask.seq_lengths == (100, 100)


@pytest.mark.parametrize("trainable", ["qkv", "v"])
@pytest.mark.parametrize("estimator", ["antidiagonal", "stripes"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grads_equal_sdpa(device, estimator, trainable):
    """The sparse path is differentiable (alpha=1: every block, so gradients equal SDPA's),
    also when only v requires grad (flex's backward still reads the transposed lists)."""
    torch.manual_seed(0)
    flexsample.path_counts.clear()
    q, k, v = (torch.randn(1, 2, 64, 16, device=device) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    for name in trainable:
        inputs[name].requires_grad_(True)
    config = SampleConfig(estimator=estimator, alpha=1.0, min_seq_len=0, q_block=16, kv_block=16)
    sample_attention(q, k, v, config).sum().backward()
    grads = [inputs[name].grad.clone() for name in trainable]
    for name in trainable:
        inputs[name].grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    for got, name in zip(grads, trainable, strict=True):
        torch.testing.assert_close(got, inputs[name].grad, atol=1e-5, rtol=1e-5)
    assert flexsample.path_counts == {"sparse": 1}


def test_backward_through_a_sparse_mask_matches_the_reference():
    """alpha < 1: gradients of the sparse path are those of attention under its mask."""
    gen = torch.Generator().manual_seed(3)
    config = SampleConfig(
        estimator="stripes", min_seq_len=0, q_block=16, kv_block=16, alpha=0.8, window_ratio=0.1
    )
    q, k = torch.randn(2, 4, 150, 16, generator=gen) * 2, torch.randn(2, 2, 150, 16, generator=gen)
    v = torch.randn(2, 2, 150, 16, generator=gen)
    keep = kept_blocks(sample_block_mask(q, k, config))
    idx = torch.arange(150)
    mask = keep[:, :, idx // 16][..., idx // 16] & (idx[None, :] <= idx[:, None])
    assert mask.sum() < causal_mask(q).sum() * q.shape[0] * q.shape[1]  # really sparse
    grads = []
    for fn, dtype in ((sample_attention, torch.float32), (None, torch.float64)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        if fn is None:
            out = masked_attention(*leaves, mask)
        else:
            out = fn(*leaves, config, enable_gqa=True)
        (out * torch.linspace(-1, 1, 16, dtype=dtype)).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_non_finite_key_reaches_only_rows_that_see_it():
    """A NaN in key j stays out of rows i < j on the sparse path, as with SDPA."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(3))
    k[:, :, 60] = float("nan")
    config = SampleConfig(min_seq_len=0, q_block=16, kv_block=16, alpha=1.0)
    out = sample_attention(q, k, v, config)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isfinite(expected[:, :, :60]).all()
    torch.testing.assert_close(out[:, :, :60], expected[:, :, :60], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[:, :, 60:]).all()


def test_cpu_sparse_path_has_no_seq_by_seq_tensor():
    """Memory is O(chunk × S): no op of the CPU sparse path outputs S×S elements per head."""
    seq_len, heads = 2048, 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, 16, generator=gen) for _ in range(3))
    config = SampleConfig(min_seq_len=0, alpha=0.9)
    block_mask = sample_block_mask(q, k, config)
    with LargestOutput() as mode:
        chunked = attention_module.cpu_block_sparse_attention(
            q, k, v, block_mask, chunk_elements=heads * seq_len * 128
        )
    assert mode.largest <= heads * seq_len * 128 * 2, mode.largest  # never heads * S * S
    whole = attention_module.cpu_block_sparse_attention(q, k, v, block_mask, chunk_elements=1 << 40)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


# --- dense fallbacks (ALGORITHM §5) -------------------------------------------------------------


@pytest.fixture
def counts():
    flexsample.path_counts.clear()
    return flexsample.path_counts


def test_short_sequence_runs_dense(counts, caplog):
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    with caplog.at_level(logging.DEBUG, logger="flexsample"):
        out = sample_attention(q, k, v, SampleConfig(min_seq_len=64))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert counts == {"dense:short": 1}
    assert "dense attention (short)" in caplog.text


def test_default_min_seq_len_is_dense_below_it(counts):
    q, k, v = (torch.randn(1, 1, 300, 16) for _ in range(3))
    sample_attention(q, k, v)
    assert counts == {"dense:short": 1}


@pytest.mark.parametrize("q_len", [1, 7])
def test_query_shorter_than_keys_runs_dense_bottom_right_causal(counts, q_len):
    torch.manual_seed(0)
    q = torch.randn(1, 4, q_len, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    out = sample_attention(q, k, v, SampleConfig(min_seq_len=0), enable_gqa=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = q @ kk.transpose(-1, -2) / 4.0
    rows = torch.arange(40 - q_len, 40)[:, None]
    logits = logits.masked_fill(torch.arange(40)[None, :] > rows, float("-inf"))
    torch.testing.assert_close(out, logits.softmax(-1) @ vv, atol=1e-5, rtol=1e-5)
    assert counts == {"dense:q_len!=kv_len": 1}


def test_float64_runs_dense(counts):
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    out = sample_attention(q, k, v, SampleConfig(min_seq_len=0))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert counts == {"dense:dtype:float64": 1}


def test_device_without_kernel_runs_dense(counts):
    q, k, v = (torch.empty(1, 2, 50, 16, device="meta") for _ in range(3))
    out = sample_attention(q, k, v, SampleConfig(min_seq_len=0))
    assert out.shape == (1, 2, 50, 16) and out.device.type == "meta"
    assert counts == {"dense:device:meta": 1}


def test_sparse_path_is_counted(counts):
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    sample_attention(q, k, v, SampleConfig(min_seq_len=0, q_block=16, kv_block=16))
    assert counts == {"sparse": 1}


# --- invalid input (ALGORITHM §5) ---------------------------------------------------------------

_X = torch.randn(1, 2, 8, 16)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((_X.numpy(), _X, _X), {}, TypeError, "q must be a torch.Tensor"),
        ((_X, _X.int(), _X), {}, TypeError, "k must be a floating-point tensor"),
        ((_X, _X, _X.half()), {}, TypeError, "share one dtype"),
        ((_X[0], _X, _X), {}, ValueError, r"q must be 4-D \[B, H, S, D\], got shape \(2, 8, 16\)"),
        ((_X, torch.randn(2, 2, 8, 16), _X), {}, ValueError, "batch sizes differ"),
        (
            (_X, torch.randn(1, 2, 8, 32), _X),
            {},
            ValueError,
            "head dims differ: q has 16, k has 32",
        ),
        ((_X, _X, torch.randn(1, 2, 9, 16)), {}, ValueError, "v must match k"),
        (
            (torch.randn(1, 3, 8, 16), _X, _X),
            {"enable_gqa": True},
            ValueError,
            "query heads 3 must be a multiple of key/value heads 2",
        ),
        ((torch.randn(1, 4, 8, 16), _X, _X), {}, ValueError, "pass enable_gqa=True"),
        ((torch.randn(1, 2, 9, 16), _X, _X), {}, ValueError, "query length 9 exceeds key length 8"),
        (
            (_X[:, :, :0], _X[:, :, :0], _X[:, :, :0]),
            {},
            ValueError,
            "sequence lengths must be >= 1",
        ),
        ((torch.randn(1, 2, 8, 300),) * 3, {}, ValueError, "head dim 300 is not supported"),
        ((_X, _X, _X), {"scale": float("nan")}, ValueError, "scale must be a finite float"),
    ],
)
@pytest.mark.parametrize("min_seq_len", [0, 100], ids=["sparse", "dense"])
def test_invalid_input_raises_clear_error(args, kwargs, error, message, min_seq_len):
    config = SampleConfig(min_seq_len=min_seq_len, q_block=16, kv_block=16)
    with pytest.raises(error, match=message):
        sample_attention(*args, config, **kwargs)


@pytest.mark.parametrize("config", [{"alpha": 0.9}, "default", 0.9])
def test_config_that_is_not_a_sample_config_is_a_clear_error(config):
    with pytest.raises(TypeError, match="config must be a flexsample.SampleConfig or None"):
        sample_attention(_X, _X, _X, config)
    with pytest.raises(TypeError, match="config must be a flexsample.SampleConfig or None"):
        sample_block_mask(_X, _X, config)


def test_block_mask_rejects_non_prefill_and_float64():
    with pytest.raises(ValueError, match="equal lengths"):
        sample_block_mask(torch.randn(1, 2, 4, 16), _X)
    with pytest.raises(TypeError, match="no sparse kernel"):
        sample_block_mask(_X.double(), _X.double())
