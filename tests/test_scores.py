import torch
from hypothesis import given

from flexsample.layout import make_layout
from flexsample.reference import reference_tile_scores
from flexsample.scores import block_scores, tile_scores, torch_tile_scores

from strategies import configs, qkv
from tolerance import assert_scores_close


def _layout(q, config):
    return make_layout(config, q.shape[2], q.device)


@given(qkv(), configs())
def test_torch_scores_match_reference(inputs, config):
    q, k, _ = inputs
    scale = q.shape[-1] ** -0.5
    expected = reference_tile_scores(q, k, config, scale)
    assert_scores_close(torch_tile_scores(q, k, _layout(q, config), scale), expected)


@given(qkv(dtypes=(torch.float32,)), configs())
def test_chunking_does_not_change_scores(inputs, config):
    q, k, _ = inputs
    layout = _layout(q, config)
    whole = torch_tile_scores(q, k, layout, 0.3)
    chunked = torch_tile_scores(q, k, layout, 0.3, chunk_elements=1)  # one KV block a chunk
    assert_scores_close(chunked, whole, bound=1e-6)


def test_dispatch_uses_torch_on_cpu():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 50, 16), torch.randn(1, 1, 50, 16)
    from flexsample import SampleConfig

    config = SampleConfig(min_seq_len=0, q_block=16, kv_block=16)
    layout = _layout(q, config)
    assert not layout.kernels
    torch.testing.assert_close(
        tile_scores(q, k, layout, 0.25), torch_tile_scores(q, k, layout, 0.25)
    )
    scores, covered = block_scores(q, k, layout, 0.25)
    torch.testing.assert_close(covered + scores.sum(-1), torch.ones_like(covered))
