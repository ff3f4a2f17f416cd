import torch
import torch.nn.functional as F
from hypothesis import given

from flexsample import SampleConfig
from flexsample.reference import (
    masked_attention,
    reference_attention,
    reference_block_scores,
    reference_mask,
    reference_select,
)

from strategies import configs, qkv
from tolerance import assert_output_close, causal_mask


@given(qkv(dtypes=(torch.float32,)), configs())
def test_scores_and_covered_sum_to_one(inputs, config):
    q, k, _ = inputs
    scores, covered = reference_block_scores(q, k, config)
    assert torch.all(scores >= 0) and torch.all(covered >= 0)
    torch.testing.assert_close(covered + scores.sum(-1), torch.ones_like(covered))


@given(qkv(dtypes=(torch.float32,)), configs(tile_alpha=None))
def test_selection_reaches_alpha_minimally(inputs, config):
    q, k, _ = inputs
    scores, covered = reference_block_scores(q, k, config)
    stripes = reference_select(scores, covered, config)
    kept = covered.double() + (scores.double() * stripes).sum(-1)
    if config.alpha < 1.0:
        assert torch.all(kept >= config.alpha - 1e-5)
        # Dropping the lowest-scoring stripe falls below alpha (up to summation-order rounding:
        # hypothesis finds alphas like 1 - 1e-16).
        lowest = torch.where(stripes, scores.double(), float("inf")).amin(-1)
        has_stripes = stripes.any(-1)
        assert torch.all((kept - lowest < config.alpha + 1e-9)[has_stripes])
    else:
        assert stripes.all()


@given(qkv(), configs(alpha=1.0))
def test_alpha_one_is_dense_causal(inputs, config):
    q, k, v = inputs
    assert_output_close(reference_attention(q, k, v, config), q, k, v, causal_mask(q))


def test_masked_attention_matches_sdpa_with_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    mask = torch.rand(1, 2, 40, 40) < 0.5
    mask |= torch.eye(40, dtype=torch.bool)
    out = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_mask_is_head_specific():
    torch.manual_seed(0)
    config = SampleConfig(alpha=0.9, window_ratio=0.0, q_block=16, kv_block=16, min_seq_len=0)
    k = torch.randn(1, 1, 128, 16)
    q = torch.randn(1, 2, 128, 16) * 0.1  # head 1: near-uniform attention
    q[0, 0] = k[0, 0, 20] * 4  # head 0: every query locks onto key 20 (KV block 1)
    mask = reference_mask(q, k, config)
    assert mask[0, 0, 100:, 16:32].all()
    assert mask[0, 0].sum() < mask[0, 1].sum() / 2
