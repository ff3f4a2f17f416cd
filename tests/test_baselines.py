"""Comparison patterns at equal density, and the coverage bars of the accuracy study (CPU):
the stripes estimator (SampleAttention, alpha 0.95) against the column baselines, and the
default config against window + sink and the block oracle."""

import pytest
import torch

from flexsample import SampleConfig, sample_block_mask
from flexsample.baselines import oracle_blocks, oracle_columns, vertical_slash, window_sink
from flexsample.block_mask import keep_block_mask, kept_blocks
from flexsample.metrics import block_density, density, true_cra
from flexsample.synthetic import structured_qkv

CONFIG = SampleConfig(estimator="stripes", alpha=0.95, min_seq_len=0, q_block=64, kv_block=64)
LENGTH = 4096


@pytest.fixture(scope="module")
def case():
    x = structured_qkv(1, 8, 2, LENGTH, 64)
    block_mask = sample_block_mask(x.q, x.k, CONFIG)
    target = density(block_mask)
    patterns = {
        "flexsample": kept_blocks(block_mask),
        "window+sink": window_sink(target, LENGTH, CONFIG),
        "oracle": oracle_columns(x.q, x.k, target, CONFIG),
        "vertical-slash": vertical_slash(x.q, x.k, target, CONFIG),
    }
    cra = {name: true_cra(x.q, x.k, keep, CONFIG).mean(-1)[0] for name, keep in patterns.items()}
    return target, patterns, cra


def test_baselines_reach_the_target_density_causally_with_the_diagonal(case):
    target, patterns, _ = case
    num = patterns["flexsample"].shape[-1]
    diagonal = torch.eye(num, dtype=torch.bool)
    upper = torch.ones(num, num, dtype=torch.bool).triu(1)
    for name in ("window+sink", "oracle", "vertical-slash"):
        keep = patterns[name]
        got = block_density(keep, LENGTH, LENGTH, 64, 64)
        assert (got >= target - 1e-6).all(), name
        assert (got <= target + 0.05).all(), (name, got - target)  # not far above it
        assert keep[..., diagonal].all() and not keep[..., upper].any(), name


def test_window_sink_is_the_sink_and_a_band():
    keep = window_sink(torch.tensor([[0.3]]), LENGTH, CONFIG)[0, 0]
    width = int(keep[-1].sum()) - 1  # last row: sink + band
    assert keep[:, 0].all()
    assert keep[-1, -width:].all() and not keep[-1, 1:-width].any()


def test_keep_block_mask_round_trips():
    keep = window_sink(torch.tensor([[0.2, 0.5]]), 1000, CONFIG)
    assert torch.equal(kept_blocks(keep_block_mask(keep, 1000, CONFIG)), keep)


def test_coverage_bars_at_the_default_alpha(case):
    _, _, cra = case
    alpha = CONFIG.alpha
    assert cra["flexsample"].mean() >= alpha - 0.01, cra["flexsample"]
    assert cra["flexsample"].min() >= alpha - 0.05, cra["flexsample"]
    assert cra["flexsample"].mean() > cra["window+sink"].mean()
    assert cra["flexsample"].mean() >= cra["oracle"].mean() - 0.02
    assert cra["oracle"].mean() >= cra["flexsample"].mean() - 1e-6  # it is a ceiling


def test_default_config_covers_alpha_above_window_sink_near_the_block_oracle():
    """The default estimator on the same inputs: true CRA mean at alpha or above, above
    window + sink at equal density, within 0.05 of the block oracle (the ceiling), and the
    worst head within 0.05 of alpha."""
    x = structured_qkv(1, 8, 2, LENGTH, 64)
    config = SampleConfig(min_seq_len=0, q_block=64, kv_block=64)
    block_mask = sample_block_mask(x.q, x.k, config)
    target = density(block_mask)
    patterns = {
        "default": kept_blocks(block_mask),
        "window+sink": window_sink(target, LENGTH, config),
        "oracle": oracle_blocks(x.q, x.k, target, config),
    }
    cra = {name: true_cra(x.q, x.k, keep, config).mean(-1)[0] for name, keep in patterns.items()}
    assert cra["default"].mean() >= config.alpha and cra["default"].min() >= config.alpha - 0.05
    assert cra["default"].mean() > cra["window+sink"].mean() + 0.05, cra
    assert cra["oracle"].mean() >= cra["default"].mean() - 0.05, cra


def test_baselines_need_square_blocks():
    with pytest.raises(ValueError, match="q_block == kv_block"):
        window_sink(torch.tensor([[0.3]]), 512, SampleConfig(q_block=64, kv_block=128))
