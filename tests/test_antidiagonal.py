"""The antidiagonal estimator (ALGORITHM §9): estimate vs the dense reference, selection
invariants, the BlockMask and attention it gives, and what it finds that stripes miss."""

import dataclasses
import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexsample.antidiagonal as antidiagonal
from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample.antidiagonal import BlockEstimate, antidiagonal_scores, select_blocks
from flexsample.block_mask import kept_blocks
from flexsample.metrics import block_density, block_mass, causal_probs, true_cra
from flexsample.op import config_to_str
from flexsample.reference import (
    reference_antidiagonal_scores,
    reference_antidiagonal_select,
    reference_token_mask,
)
from flexsample.synthetic import structured_qkv

from contracts import LargestOutput, assert_block_mask_contract
from strategies import configs, qkv
from tolerance import ANTIDIAG_REL_RMS, assert_output_close, causal_mask, rel_rms


@st.composite
def antidiagonal_configs(draw, **fixed) -> SampleConfig:
    fields = {
        "estimator": "antidiagonal",
        "tile_alpha": None,
        "stride": draw(st.sampled_from([1, 2, 4, 8, 16])),
        "local_blocks": draw(st.sampled_from([0, 1, 3])),
        "cell_score": draw(st.sampled_from(["max", "mean"])),
        "row_threshold": draw(st.sampled_from([None, 0.5, 2.0, 7.5])),
        "dense_tail": draw(st.sampled_from([0, 1, 64, 200])),
        "group_estimate": draw(st.booleans()),
    }
    return draw(configs(**(fields | fixed)))


def _xattention_order(stride, num_strided, device=None):
    """XAttention's antidiagonal on every strided row (i - j odd only, for even s)."""
    return (stride - 1 - torch.arange(stride, device=device)).expand(num_strided, stride)


def _main_diagonal(stride, num_strided, device=None):
    return torch.arange(stride, device=device).expand(num_strided, stride)


@given(qkv(), antidiagonal_configs(), st.sampled_from([1, 1 << 27]))
def test_estimate_matches_the_reference(inputs, config, chunk_elements):
    q, k, _ = inputs
    scale = q.shape[-1] ** -0.5
    got = antidiagonal_scores(q, k, config, scale, chunk_elements=chunk_elements)
    want = reference_antidiagonal_scores(q, k, config, scale)
    bound = ANTIDIAG_REL_RMS[config.cell_score][q.dtype]
    for name in BlockEstimate._fields:
        err = rel_rms(getattr(got, name), getattr(want, name))
        assert err <= bound, f"{name}: relative RMS error {err:.3g}"
    mass, peak = got
    assert mass.dtype == peak.dtype == torch.float32 and (peak >= 0).all()
    # One strided row's share is at most 1 and at most the sum over the block's rows.
    assert (peak <= 1 + 1e-5).all() and (peak <= mass * (1 + 1e-5) + 1e-7).all()
    seq_len, s = q.shape[2], config.stride
    if seq_len >= s:  # each strided row with a real row sums to one over its key blocks
        first = torch.arange(mass.shape[-2]) * config.q_block
        rows = torch.clamp(seq_len - first, max=config.q_block)
        torch.testing.assert_close(mass.sum(-1), (rows / s).ceil().expand_as(mass[..., 0]))


def test_a_wrong_peak_fails_the_estimate_check():
    """The peak check can fail: the mean over the block's strided rows (what the mass gives)
    and the sum are both far from the largest row's share."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 250, 32, generator=gen) * 2, torch.randn(1, 2, 250, 32, generator=gen)
    config = SampleConfig(estimator="antidiagonal", stride=8, q_block=32, kv_block=32)
    mass, peak = reference_antidiagonal_scores(q, k, config, 32**-0.5)
    bound = ANTIDIAG_REL_RMS["max"][torch.float32]
    assert rel_rms(antidiagonal_scores(q, k, config, 32**-0.5).peak, peak) <= bound
    for wrong in (mass / 4, mass):
        assert rel_rms(wrong, peak) > 30 * bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "bug, patch",
    [
        ("XAttention's antidiagonal on every row", ("strided_order", _xattention_order)),
        ("main diagonal", ("strided_order", _main_diagonal)),
        (
            "no causal mask",
            ("_future", lambda m0, m1, keys, device: torch.zeros(m1 - m0, keys - m0, dtype=bool)),
        ),
    ],
)
@pytest.mark.parametrize("cell_score", ["max", "mean"])
def test_planted_bugs_fail_the_estimate_check(dtype, bug, patch, cell_score):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 250, 32, generator=gen) * 2).to(dtype)
    k = torch.randn(1, 2, 250, 32, generator=gen).to(dtype)
    config = SampleConfig(
        estimator="antidiagonal", stride=8, q_block=32, kv_block=32, cell_score=cell_score
    )
    bound = ANTIDIAG_REL_RMS[cell_score][dtype]
    want = reference_antidiagonal_scores(q, k, config, 32**-0.5).mass
    assert rel_rms(antidiagonal_scores(q, k, config, 32**-0.5).mass, want) <= bound
    with mock.patch.object(antidiagonal, *patch):
        err = rel_rms(antidiagonal_scores(q, k, config, 32**-0.5).mass, want)
    assert err > 3 * bound, f"{bug}: {err:.3g}"


def test_stride_one_is_the_exact_block_mass():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 77, 16, generator=gen), torch.randn(2, 2, 77, 16, generator=gen)
    config = SampleConfig(estimator="antidiagonal", stride=1, q_block=16, kv_block=32)
    got = antidiagonal_scores(q, k, config, 0.25)
    torch.testing.assert_close(got.mass, block_mass(q, k, config, 0.25))
    # The peak: the largest of the block's rows' exact masses in the key block.
    probs = torch.cat([p for _, p in causal_probs(q, k, 0.25)], 2)
    per_row = torch.nn.functional.pad(probs, (0, 96 - 77)).unflatten(-1, (3, 32)).sum(-1)
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, 80 - 77))  # rows past S: no mass
    torch.testing.assert_close(got.peak, per_row.unflatten(2, (5, 16)).amax(3))


@given(qkv(dtypes=(torch.float32,)), antidiagonal_configs())
def test_selection_matches_reference_and_reaches_alpha_minimally(inputs, config):
    q, k, _ = inputs
    seq_len = q.shape[2]
    estimate = reference_antidiagonal_scores(q, k, config)
    keep = select_blocks(estimate, seq_len, config)
    assert torch.equal(keep, reference_antidiagonal_select(estimate, seq_len, config))
    est = estimate.mass
    flagged = torch.zeros_like(keep)
    if config.row_threshold is not None:
        flagged = estimate.peak.double() >= config.peak_bar(seq_len)
    for qb in range(est.shape[-2]):
        first = qb * config.q_block
        last_causal = (min(first + config.q_block, seq_len) - 1) // config.kv_block
        local = max(0, first // config.kv_block - config.local_blocks)
        forced = list(range(local, last_causal + 1))
        row, kept = est[..., qb, :].double(), keep[..., qb, :]
        if min(first + config.q_block, seq_len) > seq_len - config.dense_tail:
            forced = list(range(last_causal + 1))
        assert kept[..., forced + [0]].all(), "diagonal, local core, sink and dense tail kept"
        assert not kept[..., last_causal + 1 :].any(), "causal"
        causal = slice(0, last_causal + 1)
        assert kept[..., causal][flagged[..., qb, causal]].all(), "a strided row's peak kept"
        total = row[..., : last_causal + 1].sum(-1)
        mass = (row * kept).sum(-1)
        if config.alpha >= 1.0:
            assert kept[..., : last_causal + 1].all()
            continue
        assert (mass >= config.alpha * total - 1e-9).all(), "kept estimate reaches alpha"
        # Minimality: dropping the smallest chosen (not forced) block falls below alpha.
        chosen = kept & ~flagged[..., qb, :]
        chosen[..., forced + [0]] = False
        smallest = torch.where(chosen, row, math.inf).amin(-1)
        has = chosen.any(-1)
        assert (mass - smallest < config.alpha * total + 1e-9)[has].all(), "minimal"


@given(qkv(), antidiagonal_configs())
def test_block_mask_contract_and_exact_attention(inputs, config):
    q, k, v = inputs
    seq_len = q.shape[2]
    block_mask = sample_block_mask(q, k, config)
    keep = select_blocks(antidiagonal_scores(q, k, config, q.shape[-1] ** -0.5), seq_len, config)
    keep = keep.repeat_interleave(q.shape[1] // keep.shape[1], 1)  # group_estimate: per KV head
    assert_block_mask_contract(block_mask, keep, config)
    mask = reference_token_mask(keep, seq_len, config)
    assert_output_close(sample_attention(q, k, v, config, enable_gqa=True), q, k, v, mask)


@given(qkv(), antidiagonal_configs(alpha=1.0))
def test_alpha_one_equals_sdpa(inputs, config):
    q, k, v = inputs
    out = sample_attention(q, k, v, config, enable_gqa=True)
    assert_output_close(out, q, k, v, causal_mask(q))


@given(qkv(), antidiagonal_configs(dense_tail=64))
def test_the_dense_tail_rows_are_exact(inputs, config):
    """The last `dense_tail` rows see every causal key: they equal causal attention."""
    q, k, v = inputs
    out = sample_attention(q, k, v, config, enable_gqa=True)
    tail = slice(max(0, q.shape[2] - config.dense_tail), None)
    mask = causal_mask(q)[:, :, tail]
    assert_output_close(out[:, :, tail], q[:, :, tail], k, v, mask)


def _needle_qkv(seq_len: int = 2048, needle: int = 500):
    """q/k/v where every row attends to key 0 (the sink) but the last, which puts nearly all
    its attention on key `needle`; the antidiagonal pairs that key with another row of its
    cell, so the estimate sees only the sink."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, seq_len, 32, generator=gen) * 0.1
    k = torch.randn(1, 1, seq_len, 32, generator=gen) * 0.1
    k[..., 0, 0] = 8.0
    q[..., 0] += 8.0
    k[..., needle, 1] = 12.0
    q[..., -1, 1] = 12.0
    return q, k, torch.randn(1, 1, seq_len, 32, generator=gen)


def test_the_dense_tail_keeps_a_needle_the_estimate_misses():
    q, k, v = _needle_qkv()
    config = SampleConfig(estimator="antidiagonal", q_block=64, kv_block=64, min_seq_len=0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[..., -1, :]
    err = {
        tail: rel_rms(
            sample_attention(q, k, v, dataclasses.replace(config, dense_tail=tail))[..., -1, :],
            exact,
        )
        for tail in (0, config.dense_tail)
    }
    missed = sample_block_mask(q, k, dataclasses.replace(config, dense_tail=0))
    assert not kept_blocks(missed)[0, 0, -1, 500 // 64], "the estimate alone misses the needle"
    assert err[0] > 0.5, f"without the tail the last row is wrong: {err}"
    assert err[config.dense_tail] < 1e-5, f"with it the last row is exact: {err}"


def test_the_op_runs_the_antidiagonal_mask():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 300, 32, generator=gen)
    k, v = (torch.randn(1, 2, 300, 32, generator=gen) for _ in range(2))
    config = SampleConfig(
        estimator="antidiagonal", alpha=0.8, q_block=32, kv_block=32, min_seq_len=0
    )
    out = torch.ops.flexsample.sample_attention(q, k, v, None, None, True, config_to_str(config))
    torch.testing.assert_close(out, sample_attention(q, k, v, config, enable_gqa=True))


def test_estimate_has_no_strided_square_tensor():
    """Temporaries are O(chunk × S/s) or O(S·D) (the gathered copy of q): no op makes
    heads × (S/s)² elements."""
    seq_len, heads, s = 4096, 2, 8
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, heads, seq_len, 8, generator=gen) for _ in range(2))
    config = SampleConfig(estimator="antidiagonal", stride=s, q_block=64, kv_block=64)
    strided = seq_len // s
    chunk = heads * (64 // s) * strided  # one query block of strided rows against every key
    with LargestOutput() as mode:
        chunked = antidiagonal_scores(q, k, config, 0.25, chunk_elements=chunk)
    assert mode.largest <= max(q.numel(), chunk) < heads * strided**2 // 4, mode.largest
    torch.testing.assert_close(chunked, antidiagonal_scores(q, k, config, 0.25))


def _copying_heads(seq_len=2048, dim=128, segment=256, logit=24.0):
    """q `[1, 2, S, D]`, k `[1, 1, S, D]`: from row 2 * `segment` on, head h copies segment by
    segment from one earlier position at least `segment` back (a slash line), at offsets of
    parity h."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, seq_len, dim, generator=gen)
    q = torch.randn(1, 2, seq_len, dim, generator=gen) * 0.3
    for head in range(2):
        for start in range(2 * segment, seq_len, segment):
            offset = int(torch.randint(segment, start, (1,), generator=gen)) // 2 * 2 + head
            source = k[0, 0, start - offset : start + segment - offset]
            q[0, head, start : start + segment] = (
                logit * math.sqrt(dim) * source / source.pow(2).sum(-1, keepdim=True)
            )
    return q, k


@pytest.mark.parametrize("cell_score, alpha", [("max", 0.5), ("mean", 0.3)])
def test_copy_lines_are_found_where_stripes_miss_them_at_equal_density(cell_score, alpha):
    q, k = _copying_heads()
    seq_len, block = q.shape[2], 64
    rows = torch.arange(512, seq_len)  # the copying rows

    def measure(config):
        keep = kept_blocks(sample_block_mask(q, k, config))
        cra = true_cra(q, k, keep, config, rows=rows).mean(-1)[0]
        return block_density(keep, seq_len, seq_len, block, block)[0], cra

    base = SampleConfig(
        estimator="stripes", alpha=0.95, q_block=block, kv_block=block, min_seq_len=0
    )
    stripes_density, stripes_cra = measure(base)
    config = dataclasses.replace(
        base, estimator="antidiagonal", alpha=alpha, stride=8, cell_score=cell_score
    )
    density, cra = measure(config)
    assert (density <= stripes_density).all(), (density, stripes_density)
    assert (cra > 0.8).all() and (stripes_cra < 0.4).all(), (cra, stripes_cra)
    # XAttention's single antidiagonal never scores a line at an even offset (head 0): the
    # alternating antidiagonals do.
    config = dataclasses.replace(config, alpha=0.5)
    _, alternating = measure(config)
    with mock.patch.object(antidiagonal, "strided_order", _xattention_order):
        _, single = measure(config)
    assert alternating[0] > 0.9 and single[0] < 0.6 < single[1], (alternating, single)


def test_cell_max_keeps_the_heavy_keys_that_the_mean_damps():
    """Structured inputs (sink, stripes, bands; 4K, blocks of 64), alpha 0.95: an antidiagonal
    mean divides a heavy key's logit by s, so its block's estimate drowns in the band's; the
    antidiagonal's largest logit keeps it (ALGORITHM §9)."""
    inputs = structured_qkv(1, 8, 2, 4096, 64, seed=0)
    q, k = inputs.q, inputs.k

    def cra(cell_score):
        config = SampleConfig(
            estimator="antidiagonal",
            alpha=0.95,
            q_block=64,
            kv_block=64,
            cell_score=cell_score,
            row_threshold=None,  # the block-level estimate alone
        )
        keep = select_blocks(antidiagonal_scores(q, k, config, 64**-0.5), q.shape[2], config)
        return true_cra(q, k, keep, config)

    best, mean = cra("max"), cra("mean")
    assert best.mean() >= 0.94 and best.quantile(0.01) >= 0.8, (best.mean(), best.quantile(0.01))
    assert mean.mean() < 0.85 and mean.quantile(0.01) < 0.1, (mean.mean(), mean.quantile(0.01))


@pytest.mark.parametrize("group_estimate", [False, True])
@pytest.mark.parametrize("cell_score", ["max", "mean"])
@pytest.mark.parametrize("blocks", [(0, 16), (1, 3), (14, 16), (5, 6)])
def test_a_range_of_query_blocks_reads_only_their_rows(blocks, cell_score, group_estimate):
    """`q_blocks=(first, end)` (context parallelism's chunks): the full estimate's rows, with q
    NaN outside those blocks' rows; 1000 tokens = 15.6 blocks of 64. GQA 3 (4 strided rows a
    block): with `group_estimate` a chunk's rows read the head of their global row."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1000, 16, generator=gen) * 2
    k = torch.randn(2, 2, 1000, 16, generator=gen)
    config = SampleConfig(
        estimator="antidiagonal",
        q_block=64,
        kv_block=32,
        cell_score=cell_score,
        group_estimate=group_estimate,
    )
    first, end = blocks
    full = BlockEstimate(*(x[:, :, first:end] for x in antidiagonal_scores(q, k, config, 0.25)))
    masked = q.clone()
    masked[:, :, : first * 64] = float("nan")
    masked[:, :, end * 64 :] = float("nan")
    for chunk in (1, 1 << 27):
        got = antidiagonal_scores(q, k, config, 0.25, q_blocks=blocks, chunk_elements=chunk)
        torch.testing.assert_close(got, full)
        got = antidiagonal_scores(masked, k, config, 0.25, q_blocks=blocks, chunk_elements=chunk)
        torch.testing.assert_close(got, full)
    # Only the blocks' rows, in place: what a context-parallel rank holds.
    rows = q[:, :, first * 64 : end * 64]
    got = antidiagonal_scores(rows, k, config, 0.25, q_blocks=blocks, q_row0=first * 64)
    torch.testing.assert_close(got, full)
    with pytest.raises(ValueError, match="q holds rows"):
        antidiagonal_scores(rows[:, :, 1:], k, config, 0.25, q_blocks=blocks, q_row0=first * 64)
    with pytest.raises(ValueError, match=r"q_blocks=\(3, 3\) is not allowed"):
        antidiagonal_scores(q, k, config, 0.25, q_blocks=(3, 3))


def test_antidiagonal_options_are_checked():
    with pytest.raises(ValueError, match=r"tile_alpha=0.5 is not allowed with estimator="):
        SampleConfig(estimator="antidiagonal", tile_alpha=0.5)
    with pytest.raises(ValueError, match=r"max_stripe_ratio=0.1 is not allowed with estimator="):
        SampleConfig(estimator="antidiagonal", max_stripe_ratio=0.1)
    with pytest.raises(ValueError, match=r"cell_score='sum' is not allowed: use one of"):
        SampleConfig(estimator="antidiagonal", cell_score="sum")
    with pytest.raises(ValueError, match=r"stride=32 .* q_block=16 and kv_block=64, one of"):
        SampleConfig(stride=32, q_block=16, kv_block=64)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "7.5"):
        with pytest.raises(ValueError, match=r"row_threshold=.* use None or a finite number > 0"):
            SampleConfig(row_threshold=bad)
    assert SampleConfig(row_threshold=None).peak_bar(4096) is None
    assert SampleConfig(row_threshold=8, kv_block=64).peak_bar(4096) == 0.125


@pytest.mark.slow
def test_mask_build_compiles_fullgraph_without_recompiles():
    from torch._dynamo.utils import counters

    config = SampleConfig(estimator="antidiagonal", alpha=0.8, q_block=16, kv_block=16)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k: kept_blocks(sample_block_mask(q, k, config)), fullgraph=True
    )
    counters.clear()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        q, k = torch.randn(1, 4, 100, 16, generator=gen), torch.randn(1, 2, 100, 16, generator=gen)
        assert torch.equal(compiled(q, k), kept_blocks(sample_block_mask(q, k, config)))
    assert counters["stats"]["unique_graphs"] == 1


def test_row_peaks_lift_the_worst_rows_at_little_density():
    """Structured inputs (8K, 8 query / 2 KV heads, D 128, the default blocks and stride):
    a key block that one strided row needs is diluted 8x in the block-level mass; keeping
    the blocks of a row's peak lifts the worst 1% of rows far more than the density it adds
    (ALGORITHM §9, "Row peaks")."""
    inputs = structured_qkv(1, 8, 2, 8192, 128, seed=0)
    q, k = inputs.q, inputs.k
    rows = torch.arange(0, 8192, 4)

    def measure(row_threshold):
        config = SampleConfig(row_threshold=row_threshold, min_seq_len=0)
        keep = select_blocks(antidiagonal_scores(q, k, config, 128**-0.5), 8192, config)
        cra = true_cra(q, k, keep, config, rows=rows)
        return block_density(keep, 8192, 8192, 128, 128).mean(), cra.quantile(0.01)

    (plain, plain_p1), (peaks, peaks_p1) = measure(None), measure(7.5)
    assert peaks_p1 >= 0.8 and plain_p1 < 0.72, (plain_p1, peaks_p1)
    assert peaks < 1.1 * plain, (plain, peaks)


def _needle_head_inputs():
    """1 KV head, 4 query heads, 2048 tokens, D 32: heads 0, 1 and 3 attend about uniformly;
    every query of head 2 points at the keys of key block 5 (rows 640-767)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2048, 32, generator=gen) * 0.1
    k = torch.randn(1, 1, 2048, 32, generator=gen) * 0.1
    needle = torch.randn(32, generator=gen)
    needle /= needle.norm()
    k[0, 0, 640:768] += 4 * needle
    q[0, 2] += 4 * needle
    return q, k


def test_group_estimate_shares_a_mask_that_keeps_what_one_head_needs():
    """`group_estimate`: one mask per KV head, identical over its query heads, and a key block
    that only one head of the group needs is kept, since that head scores its share of the
    strided rows. A planted bug (every strided row read from the group's first head) loses it."""
    q, k = _needle_head_inputs()
    config = SampleConfig(
        alpha=0.3, q_block=128, kv_block=128, min_seq_len=0, dense_tail=0, group_estimate=True
    )
    later = slice(7, None)  # query blocks past the needle's block and its local block

    def needle_kept():
        keep = kept_blocks(sample_block_mask(q, k, config))
        assert keep.shape == (1, 4, 16, 16)
        assert (keep == keep[:, :1]).all()  # one mask for the group
        return keep[0, :, later, 5]

    assert needle_kept().all()
    first_head = lambda q, group, stride, q_row0=0: q[:, ::group]  # noqa: E731
    with mock.patch.object(antidiagonal, "group_rows", first_head):
        assert not needle_kept().all()
    # The per-head estimate keeps it for head 2.
    per_head = dataclasses.replace(config, group_estimate=False)
    assert kept_blocks(sample_block_mask(q, k, per_head))[0, 2, later, 5].all()


def test_group_estimate_without_gqa_is_the_per_head_estimate():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 500, 16, generator=gen), torch.randn(2, 3, 500, 16, generator=gen)
    config = SampleConfig(q_block=32, kv_block=32, min_seq_len=0)
    grouped = dataclasses.replace(config, group_estimate=True)
    torch.testing.assert_close(
        antidiagonal_scores(q, k, grouped, 0.25), antidiagonal_scores(q, k, config, 0.25)
    )
