"""Context parallelism (`flexsample.distributed`): the zigzag layout, the shard's stage-1 sums
and block lists in one process, and the whole op on 2 gloo processes against single-process
`sample_attention` (same config, really sparse)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import flexsample
from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample import distributed as cp
from flexsample.block_mask import build_block_mask, kept_blocks, token_mask, torch_block_lists
from flexsample.layout import make_layout
from flexsample.scores import block_scores
from flexsample.selection import select_stripes
from flexsample.synthetic import structured_qkv

from gloo_ranks import run_on_ranks

# --- the layout, in one process ------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [113, 130, 1000, 1023, 4097])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_chunks_are_whole_blocks_and_balanced(seq_len, world):
    block = 16
    chunks = cp.zigzag_chunks(seq_len, world, block)
    assert len(chunks) == 2 * world
    assert chunks[0][0] == 0 and chunks[-1][1] == seq_len
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))  # contiguous
    assert all(start % block == 0 for start, _ in chunks)  # every boundary is a block boundary
    blocks = [-(-(end - start) // block) for start, end in chunks]
    assert max(blocks) - min(blocks) <= 1
    lengths = [cp.shard_layout(seq_len, r, world, block).length for r in range(world)]
    assert sum(lengths) == seq_len and max(lengths) - min(lengths) <= 2 * block


def test_shard_holds_chunks_r_and_mirror():
    shard = cp.shard_layout(1000, 1, 2, 32)
    chunks = cp.zigzag_chunks(1000, 2, 32)
    assert shard.chunks == (chunks[1], chunks[2])
    assert shard.q_blocks().tolist() == list(range(chunks[1][0] // 32, -(-chunks[2][1] // 32)))


@pytest.mark.parametrize("seq_len, world", [(1000, 2), (517, 3), (4096, 4)])
def test_shard_and_unshard_round_trip(seq_len, world):
    x = torch.arange(2 * seq_len).reshape(1, 2, seq_len, 1)
    shards = [cp.shard_sequence(x, r, world, block=16) for r in range(world)]
    assert torch.equal(cp.unshard_sequence(shards, block=16), x)
    first, second = cp.shard_layout(seq_len, 0, world, 16).chunks
    assert torch.equal(
        shards[0][0, 0, :, 0], torch.cat([torch.arange(*first), torch.arange(*second)])
    )


def test_too_short_to_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="too short to shard over 2 ranks"):
        cp.zigzag_chunks(40, 2, 16)  # 3 blocks for 4 chunks


def test_global_rows_view_puts_the_chunk_at_its_rows():
    chunk = torch.randn(2, 3, 40, 8)
    view = cp._at_global_rows(chunk, 64, 200)
    assert view.shape == (2, 3, 200, 8)
    assert torch.equal(view[:, :, 64:104], chunk)
    assert torch.isfinite(view).all()


def _inputs(seq_len, batch=2, heads=4, kv_heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen) * 2
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    k[:, :, torch.randint(0, seq_len, (4,), generator=gen)] *= 3  # a few heavy keys
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    return q, k, v


def _math_attend(q, k, v, causal, scale):
    """A float64 attention with its natural log-sum-exp, in `prefix_attention`'s `attend` form."""
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    if causal:
        above = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        logits = logits.masked_fill(above, -math.inf)
    out = torch.softmax(logits, -1) @ v.double()
    return out.to(q.dtype), logits.logsumexp(-1).float()


@pytest.mark.parametrize("first, rows", [(0, 37), (64, 64), (100, 37), (1, 150), (190, 1)])
def test_prefix_attention_merges_square_and_rectangle(first, rows):
    """The cuDNN dense CP baseline's decomposition: rows `first..first+L-1` over the causal
    square of their own keys and the rectangle of all earlier keys, merged by log-sum-exp,
    equal causal attention's rows (here with a float64 stand-in for cuDNN)."""
    q, k, v = _inputs(first + rows + 9, heads=4, kv_heads=4, dim=16, seed=first + rows)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, first : first + rows]
    scale = 16**-0.5
    got = cp.prefix_attention(q[:, :, first : first + rows], k, v, first, scale, _math_attend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if first:
        # Planted bug: merging with the raw weights of the square alone (no rectangle) fails.
        def square_only(q_, k_, v_, causal, scale_):
            out, lse = _math_attend(q_, k_, v_, causal, scale_)
            return (out, lse) if causal else (torch.zeros_like(out), torch.full_like(lse, -1e9))

        wrong = cp.prefix_attention(q[:, :, first : first + rows], k, v, first, scale, square_only)
        assert not torch.allclose(wrong, expected, atol=1e-3, rtol=1e-3)


def test_dense_kernel_names_are_checked():
    q, k, v = _inputs(256, batch=1)
    with pytest.raises(ValueError, match=r"kernel='cuDNN' is not allowed: use one of"):
        cp.context_parallel_dense_attention(q, k, v, kernel="cuDNN")


CONFIG = SampleConfig(
    estimator="stripes", alpha=0.8, window_ratio=0.1, min_seq_len=0, q_block=32, kv_block=32
)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "config",
    [CONFIG, dataclasses.replace(CONFIG, q_block=16, kv_block=64, sample_block=3)],
    ids=["32x32", "16x64"],
)
def test_rank_sums_add_up_to_single_process_scores(world, config):
    """Stage 1 per rank (no process group: each rank's sums computed here) adds up to the
    single-process scores; a sampled tile that straddles a chunk edge is split, not lost."""
    seq_len = 1000
    q, k, _ = _inputs(seq_len)
    layout = make_layout(config, seq_len, q.device)
    sums = [
        cp._local_score_sums(
            cp.shard_sequence(q, r, world, block=config.q_block),
            k,
            layout,
            cp.shard_layout(seq_len, r, world, config.q_block),
            0.25,
        )
        for r in range(world)
    ]
    n_real = int((layout.rows >= 0).sum())
    scores = sum(s for s, _ in sums) / n_real
    covered = sum(c for _, c in sums) / n_real
    expected = block_scores(q, k, layout, 0.25)
    torch.testing.assert_close(scores, expected[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(covered, expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("q_block, kv_block", [(32, 32), (16, 64), (64, 16)])
def test_shard_block_lists_are_the_rows_of_the_global_lists(q_block, kv_block):
    config = SampleConfig(
        estimator="stripes", min_seq_len=0, q_block=q_block, kv_block=kv_block, window_ratio=0.1
    )
    seq_len = 1000
    layout = make_layout(config, seq_len, torch.device("cpu"))
    stripes = torch.rand(2, 3, layout.num_kv_blocks, generator=torch.Generator().manual_seed(1))
    stripes = stripes < 0.3
    expected = torch_block_lists(stripes, layout)
    for rank in range(2):
        shard = cp.shard_layout(seq_len, rank, 2, q_block)
        got = cp.shard_block_lists(stripes, layout, shard.q_blocks())
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == torch.int32
            assert torch.equal(g, e[:, :, shard.q_blocks()])


@pytest.mark.parametrize("rank", [0, 1])
def test_shard_mask_mod_and_flex_match_the_global_mask_rows(rank):
    """The shard mask's mask_mod (what flex evaluates on partial blocks, and everywhere on its
    unfused path) maps local rows to global ones: its token mask is the global token mask's
    rows, and flex_attention (Q_LEN != KV_LEN) under it equals the CPU shard path."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention

    seq_len, world = 1000, 2
    q, k, v = _inputs(seq_len)
    layout = make_layout(CONFIG, seq_len, q.device)
    stripes = select_stripes(*block_scores(q, k, layout, 0.25), CONFIG)
    shard = cp.shard_layout(seq_len, rank, world, CONFIG.q_block)
    mask = cp.shard_block_mask(stripes, layout, shard)
    rows = torch.cat([torch.arange(*chunk) for chunk in shard.chunks])
    full = build_block_mask(stripes, layout)
    assert torch.equal(kept_blocks(mask), kept_blocks(full)[:, :, shard.q_blocks()])
    expected = token_mask(full)[:, :, rows]
    assert torch.equal(create_mask(mask.mask_mod, 2, 4, shard.length, seq_len), expected)
    qs = cp.shard_sequence(q, rank, world, block=CONFIG.q_block)
    flex = flex_attention(qs, k, v, block_mask=mask, scale=0.25, enable_gqa=True)
    ours = cp.shard_attention(qs, k, v, mask, shard, CONFIG, scale=0.25)
    torch.testing.assert_close(ours, flex, atol=2e-6, rtol=1e-5)


# --- the whole op on 2 processes (gloo) ----------------------------------------------------------


def _shards(rank, world, block, *tensors):
    return [cp.shard_sequence(x, rank, world, block=block) for x in tensors]


def _check_against_single_process(rank, world, q, k, v, config, atol, rtol):
    """CP output and mask rows == single-process `sample_attention` and its mask."""
    expected = cp.shard_sequence(
        sample_attention(q, k, v, config, enable_gqa=True), rank, world, block=config.q_block
    )
    full_keep = kept_blocks(sample_block_mask(q, k, config))
    assert full_keep.float().mean() < 0.9, "the config must be really sparse here"
    qs, ks, vs = _shards(rank, world, config.q_block, q, k, v)
    flexsample.path_counts.clear()
    out = cp.context_parallel_sample_attention(qs, ks, vs, config)
    assert flexsample.path_counts == {"sparse": 1}
    shard = cp.shard_layout(q.shape[2], rank, world, config.q_block)
    keep = kept_blocks(cp.context_parallel_block_mask(qs, k, config))
    assert torch.equal(keep, full_keep[:, :, shard.q_blocks()]), f"rank {rank}: mask differs"
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def _cp_cases(rank, world):
    # 1. odd length (1000 = 15.6 blocks of 32 per chunk), GQA 2, batch 2, fp32.
    q, k, v = _inputs(1000)
    _check_against_single_process(rank, world, q, k, v, CONFIG, atol=2e-6, rtol=1e-5)

    # 2. ragged last block (517), q_block != kv_block, one-row tiles, no GQA, batch 1.
    q, k, v = _inputs(517, batch=1, heads=3, kv_heads=3, seed=1)
    config = SampleConfig(
        estimator="stripes",
        alpha=0.7,
        window_ratio=0.05,
        min_seq_len=0,
        q_block=16,
        kv_block=64,
        sample_block=1,
    )
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)

    # 3. bf16 structured inputs, GQA 4: the same mask; outputs to bf16 rounding.
    x = structured_qkv(1, 4, 1, 768, 32, seed=2, dtype=torch.bfloat16)
    config = SampleConfig(estimator="stripes", alpha=0.9, min_seq_len=0, q_block=32, kv_block=32)
    _check_against_single_process(rank, world, x.q, x.k, x.v, config, atol=1e-2, rtol=1e-2)

    # 3b. the antidiagonal estimator (the default), which needs no collective: each rank
    # scores its chunks at their global rows. Odd length, GQA 2, batch 2, fp32; then "mean",
    # a ragged last block and q_block != kv_block; then bf16 structured inputs.
    q, k, v = _inputs(1000)
    config = SampleConfig(alpha=0.8, min_seq_len=0, q_block=32, kv_block=32)
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)
    q, k, v = _inputs(517, batch=1, heads=3, kv_heads=3, seed=1)
    config = SampleConfig(
        alpha=0.8, min_seq_len=0, q_block=16, kv_block=64, stride=8, cell_score="mean"
    )
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)
    config = SampleConfig(min_seq_len=0, q_block=32, kv_block=32)
    _check_against_single_process(rank, world, x.q, x.k, x.v, config, atol=1e-2, rtol=1e-2)
    # 3c. a dense tail spanning both ranks' chunks (rows 700-999: blocks 21-23 on rank 1, 24-31
    # on rank 0): the rule reads global rows.
    q, k, v = _inputs(1000, seed=3)
    config = SampleConfig(alpha=0.8, min_seq_len=0, q_block=32, kv_block=32, dense_tail=300)
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)

    # 3d. estimate_fp8: q rounds under the whole sequence's scale per head (one all-reduce);
    # head 0's rows on rank 1 are 2^-12 of the rest: under the whole sequence's scale they fall
    # below e4m3's normal range, under a scale of rank 1's own rows they would not (and the
    # masks would differ).
    q, k, v = _inputs(1000, seed=4)
    for first, last in cp.shard_layout(1000, 1, world, 32).chunks:
        q[:, 0, first:last] *= 2**-12
    config = SampleConfig(alpha=0.8, min_seq_len=0, q_block=32, kv_block=32, estimate_fp8=True)
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)
    # 3e. group_estimate, 6 query / 2 KV heads: a chunk's strided rows read the query head of
    # their global row (q_block / stride = 2 strided rows a block, not a multiple of the group
    # of 3, so a rank's local row numbers would pick other heads); with fp8, each group under
    # its heads' smallest whole-sequence scale: the first group's rows on rank 1 are 2^-12 of
    # the rest, so rank-local scales would round them otherwise.
    q, k, v = _inputs(1000, heads=6, kv_heads=2, seed=5)
    for first, last in cp.shard_layout(1000, 1, world, 32).chunks:
        q[:, :3, first:last] *= 2**-12
    config = dataclasses.replace(config, group_estimate=True)
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)
    config = dataclasses.replace(config, estimate_fp8=False)
    _check_against_single_process(rank, world, q, k, v, config, atol=2e-6, rtol=1e-5)

    # 4. shorter than min_seq_len: dense, like sample_attention; the dense baseline too.
    q, k, v = _inputs(300)
    qs, ks, vs = _shards(rank, world, 32, q, k, v)
    expected = cp.shard_sequence(
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        rank,
        world,
        block=32,
    )
    flexsample.path_counts.clear()
    out = cp.context_parallel_sample_attention(
        qs, ks, vs, dataclasses.replace(CONFIG, min_seq_len=301)
    )
    assert flexsample.path_counts == {"dense:short": 1}
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    dense = cp.context_parallel_dense_attention(qs, ks, vs, block=32, seq_len=300)
    torch.testing.assert_close(dense, expected, atol=2e-6, rtol=1e-5)

    # 5. halves instead of the zigzag layout: the lengths are gathered (sum 300), and every
    # rank finds its own length wrong (140 and 160 expected), so all raise and none hangs.
    halves = [x[:, :, rank * 150 : (rank + 1) * 150] for x in (q, k, v)]
    with pytest.raises(ValueError, match="zigzag layout of 300 tokens"):
        cp.context_parallel_sample_attention(*halves, CONFIG)

    # 6. memory: no S x S tensor (CPU rows in steps of 64 rows' logits).
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and func is not torch.ops.aten.as_strided.default:
                    self.largest = max(self.largest, t.numel())
            return out

    seq_len, heads = 2048, 2
    q, k, v = _inputs(seq_len, batch=1, heads=heads, kv_heads=1)
    qs, ks, vs = _shards(rank, world, 128, q, k, v)
    saved, cp.CPU_CHUNK_ELEMENTS = cp.CPU_CHUNK_ELEMENTS, heads * seq_len * 64
    try:
        with LargestOutput() as mode:
            cp.context_parallel_sample_attention(
                qs, ks, vs, SampleConfig(estimator="stripes", min_seq_len=0)
            )
    finally:
        cp.CPU_CHUNK_ELEMENTS = saved
    assert mode.largest <= heads * seq_len * 64 * 2, mode.largest  # never heads * S * S


def test_context_parallel_equals_single_process_on_two_ranks():
    run_on_ranks(_cp_cases, 2)


def _gpu_cases(rank, world):
    # The CUDA path: Triton stage-1 kernel on the strided row view, flex with Q_LEN != KV_LEN
    # (Triton, and FLASH where it can run), NCCL collectives, the dense baselines; the dense
    # tail split (tail.py) at this length too, on the rank holding the tail and single-GPU.
    from flexsample import tail

    tail.EAGER_MIN_BLOCKS = 0
    config = SampleConfig(estimator="stripes", alpha=0.9, min_seq_len=0)
    x = structured_qkv(1, 8, 2, 8192 + 200, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    for backend in ("triton", "auto"):
        config = dataclasses.replace(config, flex_backend=backend)
        _check_against_single_process(rank, world, x.q, x.k, x.v, config, atol=2e-2, rtol=2e-2)
    # The default (antidiagonal) estimator: its kernels on each rank's strided chunk view.
    config = SampleConfig(min_seq_len=0)
    _check_against_single_process(rank, world, x.q, x.k, x.v, config, atol=2e-2, rtol=2e-2)
    # e4m3 estimate dots (sm_89+), q rounded under the all-reduced scales.
    config = SampleConfig(min_seq_len=0, estimate_fp8=True)
    _check_against_single_process(rank, world, x.q, x.k, x.v, config, atol=2e-2, rtol=2e-2)
    qs, ks, vs = _shards(rank, world, 128, x.q, x.k, x.v)
    expected = cp.shard_sequence(
        F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, enable_gqa=True),
        rank,
        world,
        block=128,
    )
    for kernel in cp.DENSE_KERNELS:
        dense = cp.context_parallel_dense_attention(qs, ks, vs, kernel=kernel)
        torch.testing.assert_close(dense, expected, atol=2e-2, rtol=2e-2)
    # cuDNN takes no fp32 attention: asked for by name, a clear error (auto picks another).
    with pytest.raises(ValueError, match="kernel='cudnn': cuDNN attention does not take"):
        cp.context_parallel_dense_attention(qs.float(), ks.float(), vs.float(), kernel="cudnn")
    dense = cp.context_parallel_dense_attention(qs.float(), ks.float(), vs.float())
    torch.testing.assert_close(dense, expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_context_parallel_on_two_gpus():
    run_on_ranks(_gpu_cases, 2, backend="nccl")


@pytest.mark.slow
def test_shard_block_mask_under_compiled_flex_equals_single_process():
    """The shard's BlockMask through compiled flex_attention (the GPU path's kernel, here
    inductor's CPU flex): each rank's rows equal single-process flexsample's. Expanded
    (zero-stride) block lists passed every list comparison yet gave wrong rows here."""
    from torch.nn.attention.flex_attention import flex_attention

    seq_len, world = 2048, 2
    q, k, v = _inputs(seq_len, batch=1, heads=8, kv_heads=2, dim=64, seed=3)
    config = SampleConfig(estimator="stripes", min_seq_len=0, q_block=128, kv_block=128, alpha=0.8)
    expected = sample_attention(q, k, v, config, enable_gqa=True)
    layout = make_layout(config, seq_len, q.device)
    stripes = select_stripes(*block_scores(q, k, layout, q.shape[-1] ** -0.5), config)
    compiled = torch.compile(flex_attention, dynamic=False)
    for rank in range(world):
        shard = cp.shard_layout(seq_len, rank, world, config.q_block)
        mask = cp.shard_block_mask(stripes, layout, shard)
        rows = cp.shard_sequence(q, rank, world, block=config.q_block)
        got = compiled(rows, k, v, block_mask=mask, enable_gqa=True)
        want = cp.shard_sequence(expected, rank, world, block=config.q_block)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
