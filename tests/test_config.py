import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexsample import SampleConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("alpha", 0.0, r"\(0.0, 1.0\]"),
        ("alpha", 1.5, r"\(0.0, 1.0\]"),
        ("alpha", float("nan"), r"\(0.0, 1.0\]"),
        ("window_ratio", -0.1, r"\[0.0, 1.0\]"),
        ("sample_ratio", 0.0, r"\(0.0, 1.0\]"),
        ("min_sample_rows", 0, "integer >= 1"),
        ("min_sample_rows", 2.5, "integer >= 1"),
        ("sample_block", 0, "integer >= 1"),
        ("sample_block", 129, "1..128"),
        ("q_block", 100, "one of"),
        ("kv_block", True, "one of"),
        ("min_seq_len", -1, "integer >= 0"),
        ("max_stripe_ratio", 1.2, r"\[0.0, 1.0\]"),
        ("score_backend", "cuda", "one of"),
        ("alpha", "0.9", r"not a number: allowed a float in \(0.0, 1.0\]"),
        ("tile_alpha", 0.0, r"\(0.0, 1.0\]"),
        ("flex_backend", "fa4", "one of"),
        ("estimator", "xattention", r"one of \('antidiagonal', 'stripes'\)"),
        ("stride", 12, "power of two dividing q_block=128 and kv_block=128"),
        ("stride", 0, "power of two"),
        ("stride", 256, r"one of \[1, 2, 4, 8, 16, 32, 64, 128\]"),
        ("stride", 8.0, "power of two"),
        ("local_blocks", -1, "integer >= 0"),
        ("dense_tail", -1, "integer >= 0"),
        ("dense_tail", 1.5, "integer >= 0"),
        ("dense_tail", True, "integer >= 0"),
        ("split_tail", 1, "use True or False"),
        ("split_tail", "yes", "use True or False"),
        ("estimate_fp8", 1, "use True or False"),
        ("estimate_fp8", None, "use True or False"),
        ("group_estimate", 1, "use True or False"),
        ("graph_max_len", -1, "integer >= 0"),
        ("graph_max_len", 4096.0, "integer >= 0"),
        ("graph_max_len", None, "integer >= 0"),
    ],
)
def test_invalid_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        SampleConfig(**{field: value})
    message = str(info.value)
    assert f"{field}={value!r}" in message
    assert re.search(allowed, message), message


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        SampleConfig().alpha = 0.5  # type: ignore[misc]


@given(st.integers(1, 5000), st.floats(0.001, 1.0), st.integers(1, 200), st.integers(1, 128))
def test_sampled_rows_layout(seq_len, ratio, min_rows, sample_block):
    config = SampleConfig(sample_ratio=ratio, min_sample_rows=min_rows, sample_block=sample_block)
    table = config.sampled_rows(seq_len)
    rows = table[table >= 0]
    requested = min(max(math.ceil(ratio * seq_len), min_rows), seq_len)
    assert table.shape == (config.num_tiles(seq_len), sample_block)
    assert rows.numel() >= requested
    assert rows.numel() <= min(seq_len, config.num_tiles(seq_len) * sample_block)
    assert torch.all(rows[1:] > rows[:-1]), "rows sorted and unique"
    assert rows.min() >= 0 and rows.max() == seq_len - 1
    # Tiles are contiguous runs of rows.
    for tile in table:
        valid = tile[tile >= 0]
        assert torch.all(valid[1:] - valid[:-1] == 1)


def test_sample_block_one_is_evenly_strided():
    rows = SampleConfig(sample_ratio=0.1, min_sample_rows=1, sample_block=1).sampled_rows(1000)
    assert rows.flatten().tolist() == list(range(9, 1000, 10))


@given(
    st.integers(1, 3000),
    st.floats(0.0, 1.0),
    st.sampled_from([16, 64, 128]),
    st.sampled_from([16, 64, 128]),
)
def test_window_blocks_cover_window_and_diagonal(seq_len, ratio, q_block, kv_block):
    config = SampleConfig(window_ratio=ratio, q_block=q_block, kv_block=kv_block)
    lo, hi = config.window_blocks(seq_len)
    w = config.window_tokens(seq_len)
    for qb in range(len(lo)):
        first, last = qb * q_block, min(seq_len, (qb + 1) * q_block) - 1
        assert lo[qb] == max(0, first - w) // kv_block
        assert hi[qb] == last // kv_block
        assert lo[qb] <= first // kv_block <= hi[qb]


def test_kernel_choice_is_one_decision(monkeypatch):
    from flexsample.layout import use_kernels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_kernels(SampleConfig(), cpu)
    assert use_kernels(SampleConfig(), cuda)
    assert not use_kernels(SampleConfig(score_backend="torch"), cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_kernels(SampleConfig(score_backend="triton"), cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        use_kernels(SampleConfig(score_backend="triton"), cpu)


@pytest.mark.parametrize("field", ["q_block", "kv_block"])
@pytest.mark.parametrize("value", [128.0, True, "128"])
def test_block_sizes_must_be_integers(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is not allowed"):
        SampleConfig(**{field: value})
