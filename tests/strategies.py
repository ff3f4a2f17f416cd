"""Hypothesis strategies shared by the test modules: configs and q/k/v of random shapes."""

import torch
from hypothesis import strategies as st

from flexsample import SampleConfig

from tolerance import DTYPES


@st.composite
def configs(draw, **fixed) -> SampleConfig:
    fields = {
        "estimator": "stripes",
        "alpha": draw(st.floats(0.5, 1.0)),
        "window_ratio": draw(st.sampled_from([0.0, 0.02, 0.08, 0.3, 1.0])),
        "sample_ratio": draw(st.floats(0.01, 0.5)),
        "min_sample_rows": draw(st.integers(1, 40)),
        "sample_block": draw(st.sampled_from([1, 3, 8, 16])),
        "q_block": draw(st.sampled_from([16, 32, 64])),
        "kv_block": draw(st.sampled_from([16, 32, 64])),
        "min_seq_len": 0,
        "tile_alpha": draw(st.sampled_from([None, None, 0.5, 0.9])),
        "score_backend": "torch",
    }
    fields.update(fixed)
    return SampleConfig(**fields)


@st.composite
def qkv(draw, max_len: int = 300, dtypes=tuple(DTYPES), head_dims=(16, 32)):
    """(q, k, v) with B 1-2, Hkv 1-2, group 1-3, S 1..max_len; sharp logits (a few heavy keys)
    so that sparsity matters."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, max_len))
    dim = draw(st.sampled_from(head_dims))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, heads, seq_len, dim, generator=gen) * draw(st.sampled_from([0.5, 2.0]))
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    heavy = torch.randint(0, seq_len, (3,), generator=gen)
    k[:, :, heavy] *= 3.0
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def well_separated(scores: torch.Tensor, covered: torch.Tensor, alpha: float, eps: float) -> bool:
    """True when selection cannot flip under score errors below eps: every running sum is eps
    away from alpha and the block order has no near-ties around the cut."""
    sorted_scores, _ = torch.sort(scores.double(), -1, descending=True)
    running = covered[..., None].double() + torch.cumsum(sorted_scores, -1) - sorted_scores
    n_blocks = scores.shape[-1]
    if alpha < 1.0 and torch.any((running - alpha).abs() < eps * n_blocks):
        return False
    gaps = sorted_scores[..., :-1] - sorted_scores[..., 1:]
    cut = (running < alpha)[..., 1:]  # gap just before a kept block matters
    return not torch.any((gaps < eps) & cut & (sorted_scores[..., 1:] > eps))
