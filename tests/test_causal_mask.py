"""The run-time check that an SDPA mask is exactly causal, and the dense paths' causal mask."""

import functools

import pytest
import torch

from flexsample import causal_mask


def _causal(length, batch=1, heads=1):
    return torch.ones(length, length, dtype=torch.bool).tril().expand(batch, heads, -1, -1)


def _additive(mask, blocked):
    return torch.zeros(mask.shape).masked_fill(~mask, blocked)


@pytest.fixture(params=[1 << 26, 50, "triton"], ids=["one-chunk", "many-chunks", "kernel"])
def is_causal_mask(request):
    if request.param == "triton":  # the CUDA path, in Triton's interpreter on CPU
        return functools.partial(causal_mask.is_causal_mask, kernel="triton")
    return functools.partial(causal_mask.is_causal_mask, chunk_elements=request.param)


@pytest.mark.parametrize("length", [1, 2, 17, 130])
def test_causal_masks_are_recognised(is_causal_mask, length):
    assert is_causal_mask(_causal(length, batch=2, heads=3))
    assert is_causal_mask(_causal(length).contiguous())
    assert is_causal_mask(_additive(_causal(length), float("-inf")))
    assert is_causal_mask(_additive(_causal(length), torch.finfo(torch.float32).min))
    assert is_causal_mask(_additive(_causal(length), torch.finfo(torch.float32).min).half())


@pytest.mark.parametrize("length", [2, 17, 130])
def test_other_masks_are_not(is_causal_mask, length):
    padded = _causal(length, batch=2).clone()
    padded[1, :, :, 0] = False  # one padded key in the second sequence only
    assert not is_causal_mask(padded)
    window = _causal(length).clone()
    window[..., -1, 0] = False
    assert not is_causal_mask(window)
    upper = _causal(length).clone()
    upper[..., 0, -1] = True
    assert not is_causal_mask(upper)
    assert not is_causal_mask(_additive(_causal(length), -1e4))  # not a blocking value
    assert not is_causal_mask(torch.ones(1, 1, length, length + 1, dtype=torch.bool))
    assert not is_causal_mask(_causal(length).int())


def test_every_call_reads_the_mask(is_causal_mask):
    """Nothing is remembered: a write the version counter cannot see (through .numpy()) is
    seen by the next check."""
    mask = _causal(64).clone()
    assert is_causal_mask(mask)
    version = mask._version
    mask.numpy()[..., 3, 1] = False
    assert mask._version == version
    assert not is_causal_mask(mask)
    mask[..., 3, 1] = True
    assert is_causal_mask(mask)


def test_same_row_counts_in_other_places_are_not_causal(is_causal_mask):
    mask = _causal(40).clone()
    mask[..., 5, 2] = False
    mask[..., 5, 6] = True  # row 5 still keeps 6 keys
    assert mask[0, 0].sum(-1).tolist() == list(range(1, 41))
    assert not is_causal_mask(mask)


def test_causal_padding_mask_is_end_aligned_and_padded():
    from flexsample.causal_mask import causal_padding_mask

    assert torch.equal(
        causal_padding_mask(2, 4)[0, 0], torch.tensor([[1, 1, 1, 0], [1] * 4]).bool()
    )
    padding = torch.tensor([[True] * 4, [False, True, True, True]])
    mask = causal_padding_mask(4, 4, padding)
    assert mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril() & padding[1])
