"""Measurement: true CRA against a dense computation of the same quantity."""

import torch
from hypothesis import given

from flexsample.metrics import true_cra
from flexsample.reference import (
    reference_block_keep,
    reference_block_scores,
    reference_mask,
    reference_select,
)

from strategies import configs, qkv


@given(qkv(dtypes=(torch.float32,)), configs(tile_alpha=None))
def test_true_cra_matches_token_mask(inputs, config):
    q, k, _ = inputs
    seq_len = q.shape[2]
    scores, covered = reference_block_scores(q, k, config)
    keep = reference_block_keep(reference_select(scores, covered, config), seq_len, config)
    mask = reference_mask(q, k, config)
    kv = k.repeat_interleave(q.shape[1] // k.shape[1], 1).double()
    logits = q.double() @ kv.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    expected = (probs * mask).sum(-1).float()
    torch.testing.assert_close(true_cra(q, k, keep, config), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(true_cra(q, k, torch.ones_like(keep), config) > 1 - 1e-5)
