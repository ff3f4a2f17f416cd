import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig
from flexsample.block_mask import build_block_mask, kept_blocks
from flexsample.layout import make_layout
from flexsample.reference import (
    reference_block_keep,
    reference_block_scores,
    reference_select,
)
from flexsample.selection import select_stripes

from contracts import assert_block_mask_contract
from strategies import configs, qkv


@st.composite
def random_scores(draw):
    """Scores [B, H, nKV] and covered [B, H] that sum to one, with exact ties sometimes."""
    batch, heads, blocks = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 40)),
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    raw = torch.rand(batch, heads, blocks + 1, generator=gen) ** draw(st.sampled_from([1, 4, 12]))
    if draw(st.booleans()):
        raw = (raw * 4).round() + 0.5  # ties
    raw = raw / raw.sum(-1, keepdim=True)
    return raw[..., 1:].contiguous(), raw[..., 0].contiguous()


@given(random_scores(), configs(tile_alpha=None))
def test_selection_matches_reference(scores_covered, config):
    scores, covered = scores_covered
    expected = reference_select(scores, covered, config)
    assert torch.equal(select_stripes(scores, covered, config), expected)


@st.composite
def random_tiles(draw, scores_covered):
    """Per-tile sums consistent with no particular mean: (mass, window, rows)."""
    scores, _ = scores_covered
    tiles = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    raw = torch.rand(*scores.shape[:2], tiles, scores.shape[-1] + 1, generator=gen) ** 6
    rows = torch.randint(1, 17, (tiles,), generator=gen).float()
    raw = raw / raw.sum(-1, keepdim=True) * rows[:, None]
    return raw[..., 1:].contiguous(), raw[..., 0].contiguous(), rows


@given(st.data(), random_scores(), st.sampled_from([0.3, 0.8, 0.95, 1.0]))
def test_tile_rule_matches_reference_and_reaches_tile_alpha(data, scores_covered, tile_alpha):
    scores, covered = scores_covered
    tiles = data.draw(random_tiles(scores_covered))
    config = SampleConfig(estimator="stripes", alpha=0.9, tile_alpha=tile_alpha)
    stripes = select_stripes(scores, covered, config, tiles)
    assert torch.equal(stripes, reference_select(scores, covered, config, tiles))
    assert torch.all(
        stripes >= select_stripes(scores, covered, SampleConfig(estimator="stripes", alpha=0.9))
    )
    mass, window, rows = tiles
    kept = (window + (mass * stripes[:, :, None]).sum(-1)) / rows
    assert torch.all(kept >= min(tile_alpha, 1.0) - 1e-5)


def test_tile_rule_needs_tile_scores():
    scores, covered = torch.rand(1, 1, 4), torch.rand(1, 1)
    with pytest.raises(ValueError, match="tile_alpha needs the per-tile scores"):
        select_stripes(scores, covered, SampleConfig(estimator="stripes", tile_alpha=0.9))


@given(random_scores(), st.floats(0.0, 1.0))
def test_stripe_cap(scores_covered, cap):
    scores, covered = scores_covered
    config = SampleConfig(estimator="stripes", alpha=1.0, max_stripe_ratio=cap)
    stripes = select_stripes(scores, covered, config)
    assert torch.all(stripes.sum(-1) == int(cap * scores.shape[-1]))
    assert torch.equal(stripes, reference_select(scores, covered, config))


@given(qkv(dtypes=(torch.float32,)), configs(tile_alpha=None))
def test_block_mask_invariants(inputs, config):
    q, k, _ = inputs
    seq_len = q.shape[2]
    scores, covered = reference_block_scores(q, k, config)
    stripes = select_stripes(scores, covered, config)
    block_mask = build_block_mask(stripes, make_layout(config, seq_len, q.device))
    keep = kept_blocks(block_mask)
    assert_block_mask_contract(block_mask, reference_block_keep(stripes, seq_len, config), config)
    # Window (with the diagonal) always kept.
    lo, hi = config.window_blocks(seq_len)
    kv = torch.arange(keep.shape[-1])
    assert torch.all(keep[..., (kv >= lo[:, None]) & (kv <= hi[:, None])])


@given(
    qkv(dtypes=(torch.float32,)), configs(tile_alpha=None), st.floats(0.0, 0.5), st.floats(0.0, 0.5)
)
def test_larger_alpha_or_window_never_removes_a_block(inputs, config, d_alpha, d_window):
    q, k, _ = inputs
    seq_len = q.shape[2]

    def keep(cfg):
        scores, covered = reference_block_scores(q, k, cfg)
        layout = make_layout(cfg, seq_len, q.device)
        return kept_blocks(build_block_mask(select_stripes(scores, covered, cfg), layout))

    base = keep(config)
    more_alpha = SampleConfig(**{**config.__dict__, "alpha": min(1.0, config.alpha + d_alpha)})
    wider = SampleConfig(
        **{**config.__dict__, "window_ratio": min(1.0, config.window_ratio + d_window)}
    )
    assert torch.all(keep(more_alpha) >= base)
    # The original design also listed "a larger window_ratio never removes a block"; that is
    # false for the algorithm it defines (a wider window covers more mass, so fewer stripes
    # reach alpha, and a stripe used far from the diagonal can go; ALGORITHM §8). What holds:
    # every block of the narrower window stays, and the sampled rows still keep >= alpha.
    no_stripes = SampleConfig(**{**wider.__dict__, "alpha": 1e-9})
    base_window = keep(SampleConfig(**{**config.__dict__, "alpha": 1e-9}))
    assert torch.all(keep(wider) >= base_window)
    assert torch.all(keep(no_stripes) >= base_window)
    scores, covered = reference_block_scores(q, k, wider)
    kept = covered + (scores * select_stripes(scores, covered, wider)).sum(-1)
    assert torch.all(kept >= min(wider.alpha, 1.0) - 1e-5)


@pytest.mark.slow
def test_mask_build_compiles_fullgraph_without_recompiles():
    config = SampleConfig(q_block=16, kv_block=16, min_seq_len=0)
    torch._dynamo.reset()

    def build(scores, covered):
        layout = make_layout(config, 200, torch.device("cpu"), kernels=False)
        return kept_blocks(build_block_mask(select_stripes(scores, covered, config), layout))

    compiled = torch.compile(build, fullgraph=True)
    from torch._dynamo.utils import counters

    counters.clear()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        raw = torch.rand(2, 3, 14, generator=gen) ** 8
        raw = raw / raw.sum(-1, keepdim=True)
        scores, covered = raw[..., 1:], raw[..., 0]
        expected = reference_block_keep(reference_select(scores, covered, config), 200, config)
        assert torch.equal(compiled(scores, covered), expected)
    assert counters["stats"]["unique_graphs"] == 1
