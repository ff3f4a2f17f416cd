"""The door's 2-D key masks: what the op reads of them, and reading them once per forward."""

import pytest
import torch

from flexsample import key_mask


@pytest.fixture
def reads(monkeypatch):
    """Host reads of key masks' values, counted."""
    seen = []
    real = key_mask._read_values
    monkeypatch.setattr(key_mask, "_read_values", lambda mask: seen.append(1) or real(mask))
    return seen


def test_key_masks_are_read_for_what_the_op_decides_on():
    """Padding masks and sequence ids: kept keys, one sequence per row, negative ids refused,
    wrong shapes and dtypes named."""
    keep = torch.ones(2, 9, dtype=torch.bool)
    assert key_mask.checked_key_mask(keep, 2, 9) is None  # read only where a path needs it
    assert key_mask.read_key_mask(keep) == (False, True)
    keep[1, 0] = False
    assert key_mask.read_key_mask(keep) == (False, False)
    ids = torch.full((2, 9), 3)
    assert key_mask.checked_key_mask(ids, 2, 9) == (False, True)
    ids[0, 5:] = 4
    reading = key_mask.checked_key_mask(ids, 2, 9)
    assert reading == (False, False) and all(type(flag) is bool for flag in reading)
    ids[1, 0] = -1
    with pytest.raises(ValueError, match="negative sequence ids"):
        key_mask.checked_key_mask(ids, 2, 9)
    for bad, shape in ((keep.float(), (2, 9)), (keep, (2, 10)), (keep, (1, 9))):
        with pytest.raises(ValueError, match=r"padding mask or integer \[B, Skv\] sequence ids"):
            key_mask.checked_key_mask(bad, *shape)


def test_a_copy_is_read_once_when_needed_and_again_only_if_it_changes(reads):
    """`read_once` copies a key mask without reading it; the first call that needs its values
    reads them in one sync and the other layers' calls reuse that reading. A write to the
    copy, or another tensor with the same values, is read again (planted: dropping the
    version from the identity makes the in-place case return the stale reading)."""
    ids = torch.full((2, 9), 3)
    once = key_mask.read_once(ids)
    assert torch.equal(once, ids) and once.data_ptr() != ids.data_ptr() and not reads
    for _ in range(3):  # three layers
        assert key_mask.checked_key_mask(once, 2, 9) == (False, True)
    assert key_mask.read_key_mask(once[:, :]) == (False, True)  # a view of it
    assert len(reads) == 1
    assert key_mask.checked_key_mask(ids, 2, 9) == (False, True) and len(reads) == 2
    once[0, 5:] = 4  # in place: the version moves
    assert key_mask.checked_key_mask(once, 2, 9) == (False, False) and len(reads) == 3
    negative = key_mask.read_once(torch.full((1, 9), -1))
    with pytest.raises(ValueError, match="negative sequence ids"):
        key_mask.checked_key_mask(negative, 1, 9)


def test_a_padding_copy_is_not_read_until_a_path_needs_it(reads):
    """A bool padding mask is read only where the sparse path could apply: a short prompt's
    dense path takes no sync (a CUDA-graph capture of such a model would fail on one)."""
    padding = torch.ones(2, 300, dtype=torch.bool)
    padding[1, :7] = False
    once = key_mask.read_once(padding)
    assert key_mask.checked_key_mask(once, 2, 300) is None and not reads
    q = torch.randn(2, 4, 300, 16)
    config = '{"min_seq_len": 1024}'
    torch.ops.flexsample.sample_attention(q, q[:, :2], q[:, :2], once, None, True, config, "")
    assert not reads  # ran dense:short before looking
    config = '{"min_seq_len": 0, "q_block": 32, "kv_block": 32}'
    for _ in range(2):
        out = torch.ops.flexsample.sample_attention(
            q, q[:, :2], q[:, :2], once, None, True, config, ""
        )
    assert len(reads) == 1 and key_mask.checked_key_mask(once, 2, 300) == (False, False)
    expected = torch.ops.flexsample.sample_attention(
        q, q[:, :2], q[:, :2], padding, None, True, config, ""
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_inference_tensors_have_no_version_and_are_still_read_once(reads):
    """Serving code runs under inference_mode, where tensors have no version counter."""
    with torch.inference_mode():
        once = key_mask.read_once(torch.zeros(2, 9, dtype=torch.long))
        assert key_mask.checked_key_mask(once, 2, 9) == (False, True)
        assert key_mask.checked_key_mask(once, 2, 9) == (False, True)
    assert len(reads) == 1


def test_copies_are_bounded_and_dead_ones_dropped():
    ids = torch.zeros(2, 9, dtype=torch.long)
    kept = [key_mask.read_once(ids) for _ in range(2 * key_mask.MAX_ENTRIES)]
    assert len(key_mask._entries) == key_mask.MAX_ENTRIES
    assert key_mask._entry(kept[-1]) is not None
    assert key_mask._entry(kept[0]) is None  # dropped: read again if used
    assert key_mask.read_key_mask(kept[0]) == (False, True)
    del kept
    key_mask.read_once(ids)
    assert len(key_mask._entries) == 1  # the dead ones' entries went
