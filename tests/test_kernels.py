"""Triton sampling kernel vs the reference: interpreter on CPU, real sizes on the GPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig, sample_attention
from flexsample.kernels.sampling import triton_block_scores
from flexsample.mask import select_stripes
from flexsample.reference import reference_block_scores
from flexsample.scores import torch_block_scores

from strategies import configs, qkv, well_separated
from tolerance import OUTPUT_TOL, SCORE_ATOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@given(qkv(max_len=200, head_dims=(16, 24, 64)), configs(score_backend="triton"))
def test_kernel_scores_match_reference(inputs, config):
    q, k, _ = (x.to(DEVICE) for x in inputs)
    scale = q.shape[-1] ** -0.5
    expected_scores, expected_covered = reference_block_scores(q, k, config, scale)
    got_scores, got_covered = triton_block_scores(q, k, config, scale)
    atol = SCORE_ATOL[q.dtype]
    torch.testing.assert_close(got_scores, expected_scores, atol=atol, rtol=0)
    torch.testing.assert_close(got_covered, expected_covered, atol=atol, rtol=0)
    if well_separated(expected_scores, expected_covered, config.alpha, 2 * atol):
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
    got = triton_block_scores(q, k, config, 0.2)
    expected = reference_block_scores(q, k, config, 0.2)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_scores_do_not_depend_on_strides():
    torch.manual_seed(0)
    config = SampleConfig(min_seq_len=0, q_block=32, kv_block=32, score_backend="triton")
    q = torch.randn(1, 100, 4, 32).to(DEVICE).transpose(1, 2)  # [B, S, H, D] memory layout
    k = torch.randn(1, 100, 2, 32).to(DEVICE).transpose(1, 2)
    got = triton_block_scores(q, k, config, 0.2)
    expected = triton_block_scores(q.contiguous(), k.contiguous(), config, 0.2)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from flexsample.scores import block_scores

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        block_scores(q, q, SampleConfig(score_backend="triton"), 0.25)


# --- GPU: real sizes --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seq_len", [4096, 32768 - 77])
def test_gpu_kernel_matches_torch_path_at_real_sizes(dtype, seq_len):
    torch.manual_seed(0)
    config = SampleConfig(min_seq_len=0)
    q = torch.randn(1, 32, seq_len, 128, device="cuda", dtype=dtype) * 2
    k = torch.randn(1, 8, seq_len, 128, device="cuda", dtype=dtype)
    got = triton_block_scores(q, k, config, 128**-0.5)
    expected = torch_block_scores(q, k, config, 128**-0.5)
    torch.testing.assert_close(got, expected, atol=SCORE_ATOL[dtype], rtol=0)
    torch.testing.assert_close(got[1] + got[0].sum(-1), torch.ones_like(got[1]), atol=1e-3, rtol=0)


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
    atol, rtol = OUTPUT_TOL[torch.bfloat16]
    for (q, k, v), eager in zip(inputs, expected, strict=True):
        torch.testing.assert_close(fn(q, k, v), eager, atol=atol, rtol=rtol)
    assert counters["stats"]["unique_graphs"] == 1
