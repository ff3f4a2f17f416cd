import torch
from hypothesis import given

import flexsample.scores as scores_module
from flexsample.reference import reference_block_scores
from flexsample.scores import block_scores, torch_block_scores

from strategies import configs, qkv
from tolerance import SCORE_ATOL


@given(qkv(), configs())
def test_torch_scores_match_reference(inputs, config):
    q, k, _ = inputs
    scale = q.shape[-1] ** -0.5
    expected_scores, expected_covered = reference_block_scores(q, k, config, scale)
    got_scores, got_covered = torch_block_scores(q, k, config, scale)
    atol = SCORE_ATOL[q.dtype]
    torch.testing.assert_close(got_scores, expected_scores, atol=atol, rtol=0)
    torch.testing.assert_close(got_covered, expected_covered, atol=atol, rtol=0)


@given(qkv(dtypes=(torch.float32,)), configs())
def test_chunking_does_not_change_scores(inputs, config):
    q, k, _ = inputs
    whole = torch_block_scores(q, k, config, 0.3)
    original = scores_module._CHUNK_ELEMENTS
    scores_module._CHUNK_ELEMENTS = 1  # one KV block per chunk
    try:
        chunked = torch_block_scores(q, k, config, 0.3)
    finally:
        scores_module._CHUNK_ELEMENTS = original
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_dispatch_uses_torch_on_cpu():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 50, 16), torch.randn(1, 1, 50, 16)
    from flexsample import SampleConfig

    config = SampleConfig(min_seq_len=0, q_block=16, kv_block=16)
    torch.testing.assert_close(
        block_scores(q, k, config, 0.25), torch_block_scores(q, k, config, 0.25)
    )
