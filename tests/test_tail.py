"""The dense tail's split keys (`flexsample/tail.py`): the plan's rules, the square-only mask
rows, and the merge of square and key parts, on CPU with a float64 stand-in for flex; the
CUDA path (flex, both backends) against causal attention in tests marked gpu."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from flexsample import SampleConfig, sample_attention, sample_block_mask, tail
from flexsample.block_mask import keep_block_mask, kept_blocks

from tolerance import OUTPUT_FLOOR, rel_rms

CONFIG = SampleConfig(min_seq_len=0, q_block=16, kv_block=16, dense_tail=20)


def test_plan_rules():
    shape = torch.Size([1, 32, 32768, 128])
    default = SampleConfig()
    split = tail.plan(shape, default, 132, replayed=True)
    # 255 tail-free blocks; 32 heads x 1 tail block x parts >= 2 x 132 -> 16 (a power of two).
    assert split == tail.TailPlan(first_block=255, first_row=255 * 128, parts=16)
    assert split.first_row % split.parts == 0
    # Few heads want more parts, capped at first_block // MIN_PART_BLOCKS (31 -> 16).
    assert tail.plan(torch.Size([1, 2, 32768, 64]), default, 132, replayed=True).parts == 16
    # S mod 128 in 1..63 puts the last 64 rows in two query blocks: twice the programs a part.
    two = tail.plan(torch.Size([1, 32, 32768 + 10, 128]), default, 132, replayed=True)
    assert two == tail.TailPlan(first_block=255, first_row=255 * 128, parts=8)
    for config in (
        dataclasses.replace(default, dense_tail=0),
        dataclasses.replace(default, split_tail=False),
        dataclasses.replace(default, estimator="stripes"),
        dataclasses.replace(default, q_block=128, kv_block=64),
    ):
        assert tail.plan(shape, config, 132, replayed=True) is None
    # Too short for two parts of MIN_PART_BLOCKS blocks.
    assert tail.plan(torch.Size([1, 32, 2048, 128]), default, 132, replayed=True) is None
    # Parts always divide first_row: few heads want 64+ parts, but 257 x 16 rows admit 16.
    odd = tail.plan(torch.Size([1, 4, 4144, 64]), CONFIG, 132, replayed=True)
    assert odd.first_row == 257 * 16 and odd.parts == 16
    few = tail.plan(torch.Size([1, 1, 524480, 128]), default, 132, replayed=True)
    assert few.first_row % few.parts == 0 and few.parts == 128
    with pytest.raises(ValueError, match="32 parts do not divide 4112 keys"):
        tail._key_parts(torch.zeros(1, 4144, 8), 32, 4112)
    # Enough heads for the SMs already: no split.
    assert tail.plan(torch.Size([1, 512, 32768, 128]), default, 132, replayed=True) is None
    # Run eagerly, only from EAGER_MIN_BLOCKS blocks before the tail (host time).
    assert tail.plan(shape, default, 132, replayed=False) is None
    eager = torch.Size([1, 32, tail.EAGER_MIN_BLOCKS * 128 + 64, 128])
    assert tail.plan(eager, default, 132, replayed=False).first_block == tail.EAGER_MIN_BLOCKS


def test_for_replay_is_a_thread_local_scope():
    assert not tail.replaying()
    with tail.for_replay():
        assert tail.replaying()
        with tail.for_replay():
            assert tail.replaying()
        assert tail.replaying()
    assert not tail.replaying()


def _inputs(seq_len, heads=4, kv_heads=2, dim=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=torch.float64)
    # k, v in transformers' layout ([B, S, H, D] storage): the key parts are strided views.
    k, v = (
        torch.randn(batch, seq_len, kv_heads, dim, generator=gen, dtype=torch.float64).transpose(
            1, 2
        )
        for _ in range(2)
    )
    return q, k, v


def _masked(q, k, v, keep, block, scale, first=0):
    """Attention of q's rows (global rows `first..`) under a block keep matrix of those rows
    and causality, with its log-sum-exp (float64)."""
    rows = torch.arange(first, first + q.shape[2])
    keys = torch.arange(k.shape[2])
    allowed = keep[:, :, (rows - first) // block][..., keys // block] & (keys <= rows[:, None])
    group = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    logits = logits.masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, -1) @ v.repeat_interleave(group, 1), logits.logsumexp(-1)


def _dense_flex(q, k, v, *, scale, enable_gqa, kernel_options, return_aux):
    """flex_attention's contract for a dense call with `return_aux=AuxRequest(lse=True)`."""
    del kernel_options, return_aux
    group = q.shape[1] // k.shape[1] if enable_gqa else 1
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    out = torch.softmax(logits, -1) @ v.repeat_interleave(group, 1)
    return out, SimpleNamespace(lse=logits.logsumexp(-1))


@pytest.mark.parametrize("seq_len", [2000, 2005])
def test_square_and_key_parts_equal_the_dense_tail(monkeypatch, seq_len):
    q, k, v = _inputs(seq_len)
    scale = 16**-0.5
    mask = sample_block_mask(q.float(), k.float(), CONFIG)
    keep = kept_blocks(mask)
    expected, _ = _masked(q, k, v, keep, 16, scale)
    split = tail.plan(q.shape, CONFIG, 64, replayed=True)
    assert split is not None and split.parts >= 4

    tail.keep_square_only(mask, split)
    square = kept_blocks(mask)
    first = split.first_block
    # Tail rows: only key blocks first_block.. (causal); every other row unchanged.
    assert torch.equal(square[:, :, :first], keep[:, :, :first])
    assert not square[:, :, first:, :first].any()
    assert torch.equal(square[:, :, first:, first:], keep[:, :, first:, first:])

    out, lse = _masked(q, k, v, square, 16, scale)
    monkeypatch.setattr(tail, "run_compiled_flex", _dense_flex)
    tail.add_rectangle(out, lse, q, k, v, split, scale=scale, kernel_options=None)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)

    # Planted bug: every part reads the first slice of keys.
    planted = _masked(q, k, v, square, 16, scale)
    real_parts = tail._key_parts
    monkeypatch.setattr(
        tail,
        "_key_parts",
        lambda x, parts, length: real_parts(x, parts, length)[:1].expand(parts, -1, -1, -1),
    )
    tail.add_rectangle(*planted, q, k, v, split, scale=scale, kernel_options=None)
    assert not torch.allclose(planted[0], expected, atol=1e-3, rtol=1e-3)


def test_a_shard_ending_with_the_tail_splits_like_the_whole(monkeypatch):
    """Context parallel: the rank whose rows end the sequence (a shard starting at global row
    c0, keys global) splits its tail rows with local indices and global keys."""
    q, k, v = _inputs(2000, batch=1)
    scale = 16**-0.5
    keep = kept_blocks(sample_block_mask(q.float(), k.float(), CONFIG))
    expected, _ = _masked(q, k, v, keep, 16, scale)
    split = tail.plan(q.shape, CONFIG, 64, replayed=True)
    first_block = 48
    rows = torch.arange(first_block * 16, 2000)
    local = keep_block_mask(keep[:, :, first_block:], 2000, CONFIG, rows=rows)
    tail.keep_square_only(local, split, split.first_block - first_block)
    square = kept_blocks(local)
    assert not square[:, :, split.first_block - first_block :, : split.first_block].any()
    out, lse = _masked(q[:, :, rows], k, v, square, 16, scale, first=rows[0].item())
    monkeypatch.setattr(tail, "run_compiled_flex", _dense_flex)
    tail.add_rectangle(
        out,
        lse,
        q[:, :, rows],
        k,
        v,
        split,
        scale=scale,
        kernel_options=None,
        local_first_row=split.first_row - rows[0].item(),
    )
    torch.testing.assert_close(out, expected[:, :, rows], atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq_len, dtype",
    [
        (1, 32, 8, 8192, torch.bfloat16),
        (2, 6, 2, 8192 + 37, torch.float16),
        (1, 4, 4, 5000, torch.float32),
    ],
)
def test_split_tail_is_exact_on_gpu(monkeypatch, batch, heads, kv_heads, seq_len, dtype, backend):
    """The op's sparse path with the split tail: its tail rows equal causal attention within
    the bound of a low-precision reference, and its other rows equal the unsplit path's (the
    tail rows in the mask's flex call) within the same bound."""
    from flexsample.synthetic import structured_qkv

    x = structured_qkv(batch, heads, kv_heads, seq_len, 128, seed=1, dtype=dtype, device="cuda")
    config = SampleConfig(min_seq_len=0, flex_backend=backend)
    monkeypatch.setattr(tail, "EAGER_MIN_BLOCKS", 0)  # the path, not the eager policy
    split = tail.plan(x.q.shape, config, tail.sm_count(0), replayed=False)
    assert split is not None
    got = sample_attention(x.q, x.k, x.v, config, enable_gqa=True)
    monkeypatch.setattr(tail, "plan", lambda *args, **kwargs: None)
    unsplit = sample_attention(x.q, x.k, x.v, config, enable_gqa=True)

    first = split.first_row
    group = heads // kv_heads
    k, v = (t.repeat_interleave(group, 1) for t in (x.k, x.v))
    allowed = (
        torch.arange(seq_len, device="cuda") <= torch.arange(first, seq_len, device="cuda")[:, None]
    )

    def tail_rows(dtype_):
        logits = x.q[:, :, first:].to(dtype_) @ k.to(dtype_).transpose(-1, -2) * 128**-0.5
        return logits.masked_fill(~allowed, -math.inf).softmax(-1) @ v.to(dtype_)

    exact = tail_rows(torch.float64)
    bound = 2 * rel_rms(tail_rows(dtype), exact) + OUTPUT_FLOOR
    assert rel_rms(got[:, :, first:], exact) <= bound
    assert rel_rms(unsplit[:, :, first:], exact) <= bound
    assert rel_rms(got[:, :, :first], unsplit[:, :, :first].double()) <= bound
